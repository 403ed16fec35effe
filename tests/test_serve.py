"""The feature browser over HTTP on loopback: a real server thread on a tiny real run, read with urllib; and end to
end in headless Chromium (Debian's chromium driven by Playwright, see browser.py): open the list, search an
explanation, open the latent, check its highlighted tokens (activation colour, hover value) and scores, screenshot
it; the explanation holding a <script> tag shows as text and runs nothing."""

from __future__ import annotations

import html
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import chromium_page
from support_run import run_stages

from saelab.autointerp.explain import load_explanations, write_explanations
from saelab.cli import ServeArgs, main
from saelab.config import ServeConfig
from saelab.latents.sampling import SampleSet
from saelab.web.data import RunData
from saelab.web.server import Browser, BrowserServer, make_server, serve_in_thread, server_urls, url_of

SCRIPT = "<script>alert(1)</script> closing brackets"


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, corpus_file: Path
) -> tuple[Path, Path]:
    """A real tiny run `a` (one explanation replaced by a script tag) and a copy `b` with other explanations."""
    root = tmp_path_factory.mktemp("serve")
    a = root / "a"
    run_stages(a, tiny_model_dir, corpus_file)
    assert main(["report", "--run-dir", str(a)]) == 0
    path = a / "explain" / "explanations.jsonl"
    records = load_explanations(path)
    first = records[0]
    records[0] = type(first)(**{**first.__dict__, "explanation": SCRIPT})
    write_explanations(records, path)
    b = root / "b"
    shutil.copytree(a, b)
    write_explanations(
        [type(r)(**{**r.__dict__, "explanation": f"other {r.latent}"}) for r in records],
        b / "explain" / "explanations.jsonl",
    )
    (root / "secret.txt").write_text("TOP SECRET")
    return a, b


@pytest.fixture(scope="module")
def url(runs: tuple[Path, Path]) -> Iterator[str]:
    server = make_server(list(runs))
    serve_in_thread(server)
    yield url_of(server)
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def studied(run: Path) -> list[int]:
    return [le.latent for le in SampleSet.load(run / "samples" / "samples.json").latents]


def test_default_bind_is_loopback(runs: tuple[Path, Path]) -> None:
    assert ServeConfig().host == "127.0.0.1"
    server = make_server([runs[0]])
    try:
        assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0
    finally:
        server.server_close()
    assert url_of(server).startswith("http://127.0.0.1:")


def test_foreign_host_header_refused(url: str) -> None:
    """DNS rebinding: a page at evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", "/run/a/", headers={"Host": f"evil.example:{parts.port}"})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 421 and "latent-link" not in body
    assert get(url.replace("127.0.0.1", "localhost") + "run/a/")[0] == 200


def test_serve_help_from_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--host" in out and "--port" in out and "Address to bind" in out


def test_cli_parses_runs_and_host() -> None:
    import tyro

    args = tyro.cli(ServeArgs, args=["r1", "r2", "--host", "0.0.0.0", "--port", "8123"])
    assert args.runs == ("r1", "r2") and args.serve.host == "0.0.0.0" and args.serve.port == 8123
    assert tyro.cli(ServeArgs, args=["r1"]).serve.host == "127.0.0.1"


def test_serve_command_prints_url_and_answers(runs: tuple[Path, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saelab.cli", "serve", str(runs[0]), str(runs[1])],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert found, line
        status, page, _ = get(found.group(0))
        assert status == 200 and "/run/a/" in page and "/compare/a/b" in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_samples_index_matches_the_file(runs: tuple[Path, Path]) -> None:
    """The byte-offset index reads back every latent exactly as SampleSet.load does."""
    data = RunData("a", runs[0])
    samples = SampleSet.load(runs[0] / "samples" / "samples.json").latents
    assert sorted(data.index.samples.spans) == sorted(le.latent for le in samples)
    for le in samples:
        assert data.examples(le.latent) == le
    assert data.examples(max(data.index.samples.spans) + 1) is None


def test_opening_reads_nothing(tmp_path: Path) -> None:
    """Start-up reads no run data: a folder without artifacts serves, and its pages say what is missing."""
    empty = tmp_path / "empty"
    empty.mkdir()
    server = make_server([empty])
    serve_in_thread(server)
    try:
        status, page, _ = get(url_of(server) + "run/empty/")
        assert status == 404 and "saelab cache" in page
    finally:
        server.shutdown()
        server.server_close()


def test_list_sorts_filters_and_searches(url: str, runs: tuple[Path, Path]) -> None:
    status, page, headers = get(url + "run/a/")
    assert status == 200 and "script-src 'none'" in headers["Content-Security-Policy"]
    ids = [int(x) for x in re.findall(r'class="latent-link" href="/run/a/latent/(\d+)"', page)]
    d_sae = int(re.search(r"of (\d+) latents", page).group(1))  # type: ignore[union-attr]
    assert ids == list(range(min(50, d_sae)))  # default: by id, 50 per page
    _, page, _ = get(url + "run/a/?sort=frequency&order=desc&per_page=500")
    data = RunData("a", runs[0])
    freq = [float(x) for x in re.findall(r'<td class="num">([0-9.e+-]+)</td><td class="num">', page)]
    assert freq == sorted(freq, reverse=True) and freq[0] == pytest.approx(
        float(data.index.frequency.max()), rel=1e-2
    )
    # search: only latents whose explanation contains the text
    target = studied(runs[0])[1]
    word = f"other {target}"
    _, page, _ = get(f"{url}run/b/?q={word.replace(' ', '+')}")
    assert re.findall(r'class="latent-link" href="/run/b/latent/(\d+)"', page) == [str(target)]
    _, page, _ = get(url + "run/a/?explained=1")
    listed = {int(x) for x in re.findall(r'class="latent-link" href="/run/a/latent/(\d+)"', page)}
    assert listed == set(data.index.explanations)
    _, page, _ = get(url + "run/a/?freq_min=1.5")
    assert "latent-link" not in page
    # explainer model: token_stats records "none"; no explanation comes from another model
    _, page, _ = get(url + "run/a/?model=none")
    assert {int(x) for x in re.findall(r'href="/run/a/latent/(\d+)"', page)} == set(data.index.explanations)
    _, page, _ = get(url + "run/a/?model=gpt-4")
    assert "latent-link" not in page
    lo = float(sorted(data.index.max_act)[len(data.index.max_act) // 2])
    _, page, _ = get(f"{url}run/a/?act_min={lo}&sort=max_act&per_page=500")
    acts = [float(x) for x in re.findall(r'</td><td class="num">([0-9.]+)</td>', page)]
    assert acts == sorted(acts) and acts[0] >= round(lo, 3) - 1e-3
    assert len(acts) == int((data.index.max_act >= lo).sum())
    key = sorted(data.index.metrics())[0]
    _, page, _ = get(f"{url}run/a/?score_key={key}&score_min=0&sort={key}&order=desc")
    scored = [int(x) for x in re.findall(r'class="latent-link" href="/run/a/latent/(\d+)"', page)]
    col = data.index.metrics()[key]
    assert scored and [col[i] for i in scored] == sorted((col[i] for i in scored), reverse=True)
    # another metric: its values are shown and sorted by
    _, page, _ = get(f"{url}run/a/?metric=balanced_accuracy&score_key={key}&score_min=0&sort={key}")
    bal = data.index.metrics("balanced_accuracy")[key]
    shown = [int(x) for x in re.findall(r'class="latent-link" href="/run/a/latent/(\d+)"', page)]
    assert [bal[i] for i in shown] == sorted(bal[i] for i in shown)
    assert f"balanced_accuracy {key}" in page and f"{bal[shown[0]]:.3f}" in page


@pytest.mark.bad_input
def test_broken_artifact_is_500_without_traceback(runs: tuple[Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(runs[0], broken)
    (broken / "score" / "scores.jsonl").write_text("{not json\n")
    server = make_server([broken])
    serve_in_thread(server)
    try:
        status, page, _ = get(url_of(server) + "run/broken/")
        assert status == 500 and "Traceback" not in page and "log says why" in page
        assert "score/scores.jsonl is unreadable" in page and "saelab score --run-dir" in page
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.bad_input
def test_corrupt_explanations_page_names_the_artifact_and_the_fix(
    runs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt explanations.jsonl: the run's pages answer 500 naming the file, the run and `saelab explain`
    (HTML-escaped: the run's name holds markup); its report and the other run are still served, and the run
    recovers once the file is written again, without a restart."""
    broken = tmp_path / "x<i>y"
    shutil.copytree(runs[0], broken)
    path = broken / "explain" / "explanations.jsonl"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2] + b"\n{<b>not json\n")
    server = make_server([broken, runs[1]])
    serve_in_thread(server)
    base = url_of(server)
    try:
        for page_path in (
            "run/x%3Ci%3Ey/",
            f"run/x%3Ci%3Ey/latent/{studied(runs[0])[0]}",
            "compare/b/x%3Ci%3Ey",
        ):
            status, page, _ = get(base + page_path)
            assert status == 500, page_path
            assert "explain/explanations.jsonl is unreadable" in page and "JSONDecodeError" in page
            assert f"saelab explain --run-dir {shlex.quote(str(broken.resolve()))}" in html.unescape(page)
            assert "x&lt;i&gt;y" in page and "<i>" not in page and "<b>" not in page
            assert "Traceback" not in page
        assert "Traceback" in caplog.text  # the log keeps the whole story
        assert get(base + "run/x%3Ci%3Ey/report")[0] == 200
        assert get(base + "run/b/")[0] == 200 and get(base)[0] == 200
        path.write_bytes(good)
        status, page, _ = get(base + "run/x%3Ci%3Ey/")
        assert status == 200 and "latent-link" in page
    finally:
        server.shutdown()
        server.server_close()


def test_bad_query_is_400(url: str) -> None:
    assert get(url + "run/a/?sort=nope")[0] == 400
    assert get(url + "run/a/?freq_min=abc")[0] == 400
    assert get(url + "run/a/?freq_min=nan")[0] == 400
    assert get(url + "run/a/?metric=os.system")[0] == 400
    assert get(url + "compare/a/b?metric=nope")[0] == 400


def test_latent_page_shows_everything(url: str, runs: tuple[Path, Path]) -> None:
    latent = studied(runs[0])[0]
    status, page, _ = get(f"{url}run/a/latent/{latent}")
    assert status == 200
    le = next(x for x in SampleSet.load(runs[0] / "samples" / "samples.json").latents if x.latent == latent)
    # highlighted tokens carry their value on hover
    acts = [float(a) for a in re.findall(r'<span class="act" title="[^"]+" data-act="([^"]+)"', page)]
    expected = [a for ex in (*le.train, *le.test_pos) for a in ex.acts if a > 0]
    assert sorted(acts) == pytest.approx(sorted(expected))
    assert page.count('<tr class="non-activating">') == len(le.test_neg)
    # each scorer's judgement of each scoring example, as in scores.jsonl
    rows = [json.loads(x) for x in (runs[0] / "score" / "scores.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["latent"] == latent]
    assert mine and page.count('class="score-row"') == len(mine)
    n_correct = sum(p["pred"] == p["label"] for r in mine for p in r["predictions"] if p["pred"] is not None)
    assert page.count('class="judgement correct"') == n_correct
    assert page.count('class="judgement incorrect"') == sum(len(r["predictions"]) for r in mine) - n_correct
    assert f"{mine[0]['f1']:.3f}" in page
    assert '<svg id="histogram"' in page and page.count("<rect ") >= 1
    neighbours = re.search(r'<table id="neighbours">(.*?)</table>', page, re.S)
    assert neighbours and len(re.findall(r"/run/a/latent/(\d+)", neighbours.group(1))) == 10


def test_neighbours_are_decoder_cosine(runs: tuple[Path, Path]) -> None:
    from safetensors.numpy import load_file

    w = load_file(str(runs[0] / "sae" / "sae.safetensors"))["W_dec_FD"]
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    got = RunData("a", runs[0]).neighbours(3, k=5)
    cos = w @ w[3]
    cos[3] = -2
    assert [i for i, _ in got] == list(np.argsort(-cos)[:5])
    assert [c for _, c in got] == pytest.approx(sorted(cos, reverse=True)[:5], abs=1e-5)


def test_script_explanation_is_escaped(url: str, runs: tuple[Path, Path]) -> None:
    latent = load_explanations(runs[0] / "explain" / "explanations.jsonl")[0].latent
    for path in (f"run/a/latent/{latent}", "run/a/?q=script", "compare/a/b", f"compare/a/b/latent/{latent}"):
        _, page, _ = get(url + path)
        assert "<script>" not in page, path
        assert html.escape(SCRIPT, quote=False) in page or html.escape(SCRIPT) in page, path


def test_report_and_compare(url: str, runs: tuple[Path, Path]) -> None:
    status, page, _ = get(url + "run/a/report")
    assert status == 200 and page == (runs[0] / "report.html").read_text()
    status, page, _ = get(url + "compare/a/b")
    latent = studied(runs[0])[1]
    assert status == 200 and f"other {latent}" in page and "different SAEs" not in page
    assert page.count("<tr>") - 1 == len(load_explanations(runs[0] / "explain" / "explanations.jsonl"))
    status, page, _ = get(f"{url}compare/a/b/latent/{latent}")
    assert status == 200 and f"other {latent}" in page and page.count('class="score-row"') >= 2
    assert page.count('<span class="act"') > 0
    assert get(f"{url}compare/a/b/latent/100000")[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/run/a/../../secret.txt",
        "/run/a/%2e%2e/%2e%2e/secret.txt",
        "/run/%2e%2e/latent/0",
        "/run/a%2f..%2f..%2fsecret.txt/",
        "/etc/passwd",
        "//etc/passwd",
        "/run/a/manifest.json",
        "/run/a/score/scores.jsonl",
        "/run/secret.txt/",
        "/run/c/",
        "/run/a/latent/-1",
        "/run/a/latent/999999",
        "/run/a/latent/..%2f..%2fsecret.txt",
        "/compare/a/..",
        "/compare/a/b/latent/%2e%2e",
        "/run/a/latent/%C2%B2",
        "/run/a/latent/99999999999999999999999",
        "/compare/a/c/latent/0",
    ],
)
def test_traversal_and_unknown_paths_refused(url: str, path: str, runs: tuple[Path, Path]) -> None:
    import http.client
    from urllib.parse import urlsplit

    host = urlsplit(url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
    conn.request("GET", path)  # sent as is: urllib would normalise some of these
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status in (400, 404), path
    assert "TOP SECRET" not in body and "root:" not in body and '"stages"' not in body


# ------------------------------------------------------------------------------------- headless Chromium


@pytest.fixture()
def page() -> Iterator[object]:
    with chromium_page() as p:
        yield p


def test_search_open_latent_and_screenshot(
    page: object,
    url: str,
    runs: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    import matplotlib.image as mpimg
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url + "run/a/")
    rows = page.locator("tr.latent-row")
    assert rows.count() > 1
    # search an explanation: the list narrows to the latent explained with a script tag, shown as text
    page.fill("#search", "alert(1)")
    page.click("#apply")
    page.wait_for_load_state("load")
    latent = load_explanations(runs[0] / "explain" / "explanations.jsonl")[0].latent
    expect(rows).to_have_count(1)
    expect(page.locator("tr.latent-row .explanation").first).to_contain_text("<script>alert(1)</script>")
    page.click("a.latent-link")
    page.wait_for_load_state("load")
    assert page.url.endswith(f"/run/a/latent/{latent}")
    expect(page.locator("#explanations")).to_contain_text(SCRIPT)
    # highlighted tokens: the activation colour and the value on hover
    acts = page.locator("span.act")
    assert acts.count() > 0
    first = acts.first
    assert float(first.get_attribute("title") or "nan") > 0
    assert "(255, 120, 0" in first.evaluate("e => getComputedStyle(e).backgroundColor")
    first.hover()
    # scores and judgements
    assert page.locator("#scores tr.score-row").count() > 0
    assert page.locator("td.judgement.correct, td.judgement.incorrect").count() > 0
    assert page.locator("#histogram rect").count() > 0
    png = tmp_path / "latent.png"
    page.screenshot(path=str(png), full_page=True)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pixels = mpimg.imread(io.BytesIO(data), format="png")
    assert pixels.shape[0] >= 900 and float(np.asarray(pixels)[..., :3].std()) > 0.05  # not one flat colour
    orange = (
        (pixels[..., 0] > 0.9) & (pixels[..., 1] > 0.4) & (pixels[..., 1] < 0.85) & (pixels[..., 2] < 0.6)
    )
    assert orange.sum() > 50, "no highlighted token drawn"
    assert dialogs == [], "a script from run data ran"


# ------------------------------------------------------------------------- confinement to the run folder


def served(folders: list[Path], **kw: Any) -> Iterator[str]:
    server = make_server(folders, **kw)
    serve_in_thread(server)
    try:
        yield url_of(server)
    finally:
        server.shutdown()
        server.server_close()


def _link_out(run: Path, rel: str, target: Path) -> None:
    """Replace `run/rel` by a symbolic link to `target` (a copy of it first, when `target` does not exist)."""
    path = run / rel
    if not target.exists() and not target.is_symlink():
        (shutil.copytree if path.is_dir() else shutil.copyfile)(path, target)
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(target)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("rel", "pages"),
    [
        ("report.html", ["report"]),  # to /etc/passwd, as found
        ("latents", ["", "latent/3"]),  # a folder
        ("explain/explanations.jsonl", ["", "latent/3"]),
        ("samples/samples.json", ["", "latent/3"]),
        ("score", ["", "latent/3"]),
        ("sae", ["latent/3"]),
        ("latents/stats.safetensors", [""]),  # a file inside a folder the cache reads
    ],
)
def test_symlink_out_of_the_run_is_refused(
    runs: tuple[Path, Path], tmp_path: Path, rel: str, pages: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    outside = Path("/etc/passwd") if rel == "report.html" else tmp_path / "outside" / rel.replace("/", "_")
    outside.parent.mkdir(exist_ok=True)
    _link_out(run, rel, outside)
    for base in served([run]):
        for page_path in pages:
            status, body, _ = get(f"{base}run/run/{page_path}")
            assert status == 403, (rel, page_path)
            assert "root:" not in body and "latent-link" not in body and "fires on" not in body
            assert f"{rel.split('/')[0]}" in body and "outside" in body
        assert get(base)[0] == 200  # the index reads no run file
    assert f"refused: {rel}" in caplog.text and str(outside) in caplog.text


@pytest.mark.bad_input
def test_link_through_a_folder_link_inside_is_refused(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """`score` links to a folder inside the run, which holds a link out: the walk follows the inner link."""
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / "score").rename(run / "score-real")
    (run / "score").symlink_to(run / "score-real")
    for base in served([run]):
        assert get(f"{base}run/run/")[0] == 200  # a link that stays inside is followed
        _link_out(run / "score-real", "scores.jsonl", tmp_path / "scores-outside.jsonl")
        status, body, _ = get(f"{base}run/run/latent/3")
        assert status == 403 and "score/scores.jsonl" in body


def test_report_link_inside_the_run_is_served(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / "report.html").rename(run / "report-v1.html")
    (run / "report.html").symlink_to("report-v1.html")
    for base in served([run]):
        status, body, _ = get(f"{base}run/run/report")
        assert status == 200 and body == (run / "report-v1.html").read_text()


@pytest.mark.fault
def test_what_a_forced_rerun_dropped_is_not_shown(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """`cache` run again with other settings (`--force`) drops sample, explain, score and report from the manifest and leaves their files: the
    browser shows none of them beside the new latents (nor the old report)."""
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    before = RunData("run", run)
    latent = next(iter(before.index.explanations))
    text = before.index.explanations[latent][0].explanation
    assert before.index.metrics() and before.index.samples is not None
    assert main(["cache", "--run-dir", str(run), "--cache.value-dtype", "float32", "--force"]) == 0
    assert list(json.loads((run / "manifest.json").read_text())["stages"]) == [
        "collect",
        "train",
        "eval",
        "cache",
    ]
    assert (run / "score" / "scores.jsonl").exists() and (run / "report.html").exists()  # kept on disk
    after = RunData("run", run)
    assert after.index.explanations == {} and after.index.metrics() == {} and after.index.samples is None
    assert after.scores(latent) == [] and after.examples(latent) is None
    for base in served([run]):
        assert get(f"{base}run/run/report")[0] == 404
        status, page, _ = get(f"{base}run/run/latent/{latent}")
        assert status == 200 and html.escape(text) not in page


# ---------------------------------------------------------------------------------------------- load


def _answer(sock: socket.socket, request: bytes) -> int:
    """Send one request and read its whole response (Content-Length body); its status."""
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the response"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(head.split()[1])


@pytest.mark.fault
def test_200_simultaneous_connections_all_answered(runs: tuple[Path, Path]) -> None:
    """A burst of 200 connections before the server accepts any: all complete (http.server's listen queue of 5
    drops all but 6, whose clients retry their SYN only after 1 s, 3 s, 7 s...), then each gets two answers on its
    keep-alive connection, within a bounded time."""
    server = make_server([runs[0]])
    host, port = server.server_address[:2]
    request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    socks: list[socket.socket] = []
    thread = None
    try:
        for _ in range(200):  # each handshake is done by the kernel, into the listen queue
            socks.append(socket.create_connection((str(host), port), timeout=0.5))
        thread = serve_in_thread(server)
        for s in socks:
            s.settimeout(60)
        with ThreadPoolExecutor(200) as pool:
            statuses = list(pool.map(lambda s: [_answer(s, request), _answer(s, request)], socks))
        assert statuses == [[200, 200]] * 200
    finally:
        for s in socks:
            s.close()
        if thread is not None:  # shutdown() waits for a serve_forever that never started
            server.shutdown()
        server.server_close()


@pytest.mark.fault
def test_more_keepalive_clients_than_slots_all_answered(runs: tuple[Path, Path]) -> None:
    """40 keep-alive clients, 4 connection slots: while a client waits, connections close after their response
    (http.client reconnects), so none starves."""
    import http.client

    server = BrowserServer("127.0.0.1", 0, Browser([runs[0]]), max_connections=4)
    serve_in_thread(server)
    port = int(server.server_address[1])

    def client(_: int) -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        out = []
        for _ in range(5):
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            out.append(resp.status)
        conn.close()
        return out

    try:
        with ThreadPoolExecutor(40) as pool:
            assert list(pool.map(client, range(40))) == [[200] * 5] * 40
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------- binding off loopback


def _raw(base: str, path: str, host: str, cookie: str | None = None) -> tuple[int, str, Any]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(base)
    conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=30)
    conn.request("GET", path, headers={"Host": host, **({"Cookie": cookie} if cookie else {})})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, body, resp.headers


@pytest.mark.bad_input
def test_any_address_warns_checks_host_and_requires_the_token(
    runs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server([runs[0]], host="0.0.0.0")
    serve_in_thread(server)
    port, token = server.access.port, server.access.token
    base = f"http://127.0.0.1:{port}/"
    try:
        warning = caplog.text
        assert "WARNING" in warning and "0.0.0.0" in warning and f"a ({runs[0].resolve()})" in warning
        assert token and server_urls(server) == [
            f"http://{socket.gethostname()}:{port}/?token={token}",
            f"http://127.0.0.1:{port}/?token={token}",
        ]
        # a page at evil.example that resolved its name to this machine: refused, token or not
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"10.9.8.7:{port}"):
            assert _raw(base, f"/?token={token}", host)[0] == 421, host
        # the right Host, but no token (or a wrong one): refused, and nothing of the run shown
        status, body, _ = _raw(base, "/run/a/", f"127.0.0.1:{port}")
        assert status == 403 and "token" in body and "latent-link" not in body
        assert _raw(base, "/run/a/?token=guess", f"127.0.0.1:{port}")[0] == 403
        assert _raw(base, "/", f"127.0.0.1:{port}", cookie=f"saelab-token-{port}=guess")[0] == 403
        # the printed URL: the token becomes a cookie, and the redirect drops it from the address
        status, _, headers = _raw(base, f"/run/a/?sort=frequency&token={token}", f"127.0.0.1:{port}")
        cookie = headers["Set-Cookie"].split(";")[0]
        assert status == 303 and headers["Location"] == "/run/a/?sort=frequency"
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"0.0.0.0:{port}",
            f"{socket.gethostname()}:{port}",
        ):
            status, body, _ = _raw(base, "/run/a/", host, cookie=cookie)
            assert status == 200 and "latent-link" in body, host
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.bad_input
def test_any_address_without_token_still_checks_host(runs: tuple[Path, Path]) -> None:
    server = make_server([runs[0]], host="0.0.0.0", token=False)
    serve_in_thread(server)
    port = server.access.port
    base = f"http://127.0.0.1:{port}/"
    try:
        assert server.access.token is None and server_urls(server)[1] == base
        assert _raw(base, "/run/a/", f"evil.example:{port}")[0] == 421
        assert _raw(base, "/run/a/", f"127.0.0.1:{port}")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_serve_command_off_loopback_warns_and_prints_the_token(runs: tuple[Path, Path]) -> None:
    import http.cookiejar

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saelab.cli", "serve", str(runs[0]), "--host", "0.0.0.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=[\w-]+", second)
        assert "?token=" in first and found, (first, second)
        warning = proc.stderr.readline()
        assert "WARNING" in warning and str(runs[0].resolve()) in warning and "0.0.0.0" in warning
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with opener.open(found.group(0), timeout=30) as r:  # follows the redirect with the cookie
            assert r.status == 200 and "/run/a/" in r.read().decode() and "token" not in r.url
        with opener.open(found.group(0).split("?")[0] + "run/a/", timeout=30) as r:
            assert r.status == 200
        assert get(found.group(0).split("?")[0])[0] == 403  # no cookie, no token
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------- the CLI


@pytest.mark.fault
def test_help_into_a_closed_pipe_exits_quietly() -> None:
    """`saelab serve --help | head`: the reader leaves; no BrokenPipeError traceback, whether the pipe is closed
    before the first write or after the first lines (a real `head`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    cmd = [sys.executable, "-m", "saelab.cli", "serve", "--help"]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == b"", proc.stderr.decode()
    shell = subprocess.run(
        ["bash", "-c", f"{shlex.join(cmd)} | head -n 2"], capture_output=True, env=env, timeout=120
    )
    assert shell.stdout.decode().startswith("usage: saelab serve") and len(shell.stdout.splitlines()) == 2
    assert b"Traceback" not in shell.stderr and b"BrokenPipe" not in shell.stderr
