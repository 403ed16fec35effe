"""A run folder keeps its results consistent with each other under a hostile but realistic user.

- A stage run again over artifacts that later stages were made from is refused unless `--force`; with it, those
  stages are dropped from the manifest (the report never shows them beside artifacts they were not made from).
- An altered artifact gets one verdict and one command at every stage: rerun the stage that wrote it.
- A manifest that is garbage or no object, a malformed corpus line, a corpus text that is no string, a binary
  predictions file: one line naming the file (and line), and nothing already computed is lost.
- A stage asked for more than there is: the cache's tokens (refused before anything is written), the sample's
  latents (all are taken, with a warning naming how many there were).
- An LLM's explanation holding HTML reaches report.md escaped.

Every test works on a copy of one small run built through the CLI once for the module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from support_llm import ScriptedServer, completion_body
from support_run import SMALL, error_line

from saelab.cli import COMMANDS, main
from saelab.run.manifest import sha256_file


def manifest(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / "manifest.json").read_text()))


def collect_args(run: Path, model: Path, corpus: Path) -> list[str]:
    return ["collect", "--run-dir", str(run), "--model.name", str(model), "--data.dataset", str(corpus)]


# --- rerunning an earlier stage -------------------------------------------------------------------------------


@pytest.mark.bad_input
def test_collect_on_a_finished_run_is_refused_then_forced(
    run: Path, tiny_model_dir: Path, corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = manifest(run)
    windows = (run / "data" / "windows.npz").read_bytes()
    args = [*collect_args(run, tiny_model_dir, corpus_file), *SMALL["collect"], "--seed", "1"]
    assert main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert "collect would replace the artifacts that train, eval, cache, sample, explain, score" in line
    assert "--force" in line and "another --run-dir" in line
    assert manifest(run) == before and (run / "data" / "windows.npz").read_bytes() == windows

    assert main([*args, "--force"]) == 0  # other windows (another seed's split): every later stage is dropped
    after = manifest(run)
    assert list(after["stages"]) == ["collect"]
    assert set(after["hashes"]) == {"data", "model"} and after["hashes"]["data"] != before["hashes"]["data"]
    assert after["invalidated"] == dict.fromkeys(
        ["train", "eval", "cache", "sample", "explain", "score", "report"], "collect"
    )
    assert after["seed"] == 1 and after["config"]["seed"] == 1
    capsys.readouterr()
    assert main(["sample", "--run-dir", str(run), *SMALL["sample"]]) == 1
    line = error_line(capsys.readouterr().err)
    assert "stage 'train' was dropped" in line and "when 'collect' ran again" in line  # the first to rerun
    # the report shows the new data, and no result made from the old (whose files are still in the folder)
    assert main(["report", "--run-dir", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert f"| sha256 data | {after['hashes']['data']} |" in md and "sha256 sae" not in md
    assert "The eval stage has not run" in md and "explained_variance" not in md
    assert "The sample / explain / score stages have not all run." in md and "token_stats" not in md


def test_a_rerun_that_writes_the_same_files_keeps_the_later_stages(
    run: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    """collect --force with the run's own settings writes the same bytes: nothing made from them is dropped."""
    before = manifest(run)
    assert main([*collect_args(run, tiny_model_dir, corpus_file), *SMALL["collect"], "--force"]) == 0
    after = manifest(run)
    assert list(after["stages"]) == list(before["stages"])
    assert after["hashes"] == before["hashes"] and "invalidated" not in after


def test_a_later_stage_rerun_drops_only_the_report(run: Path) -> None:
    """eval again (no stage reads its files but the report): runs without --force; the report's record goes."""
    assert main(["eval", "--run-dir", str(run), *SMALL["eval"], "--eval.n-windows", "6"]) == 0
    after = manifest(run)
    assert list(after["stages"]) == ["collect", "train", "eval", "cache", "sample", "explain", "score"]
    assert after["invalidated"] == {"report": "eval"}
    assert main(["report", "--run-dir", str(run)]) == 0
    assert "invalidated" not in manifest(run)


@pytest.mark.fault
def test_temporaries_a_killed_stage_left_are_removed_by_the_next_stage(
    run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGKILL between writing a temporary file and renaming it leaves `<name>.<random>.tmp`; the next stage on
    the run (holding its lock) removes them all, and nothing else."""
    left = [run / "manifest.json.0a1b2c3d.tmp", run / "latents" / "stats.safetensors.deadbeef.tmp"]
    kept = [run / "notes.0a1b2c3d.tmp.txt", run / "mine.tmp"]  # not written by saelab: left alone
    for path in [*left, *kept]:
        path.write_bytes(b"half")
    with caplog.at_level("INFO", logger="saelab"):
        assert main(["report", "--run-dir", str(run)]) == 0
    assert [p for p in left if p.exists()] == [] and all(p.exists() for p in kept)
    assert "removed 2 temporary file(s) a killed stage left" in caplog.text


# --- one verdict for an altered artifact ----------------------------------------------------------------------


def _verdicts(run: Path, stages: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """The error line of each of `stages`, run on `run` as it is (with --force: the rerun is not what stops it)."""
    out = {}
    for stage in stages:
        assert main([stage, "--run-dir", str(run), *SMALL.get(stage, []), "--force"]) == 1, stage
        out[stage] = error_line(capsys.readouterr().err)
    return out


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "another SAE of the same shape"])
def test_an_altered_sae_gets_one_verdict_at_every_stage(
    run: Path, damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saelab.sae import base as sae_lib

    weights = run / "sae" / "sae.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        other = sae_lib.build(sae_lib.load(run / "sae").cfg)  # same config, other weights
        sae_lib.save(other, tmp_path / "other")
        shutil.copy(tmp_path / "other" / "sae.safetensors", weights)
    before = manifest(run)
    fix = f"rerun `saelab train --run-dir {run} --force`"
    # train is not asked: it does not read the SAE, it writes it (the fix)
    for stage, line in _verdicts(
        run, ["eval", "cache", "sample", "explain", "score", "report"], capsys
    ).items():
        assert "artifact sae/sae.safetensors was altered after stage 'train'" in line and fix in line, stage
    assert manifest(run) == before  # nothing recorded, nothing dropped


@pytest.mark.bad_input
def test_verification_reads_again_only_what_was_written_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stages verify upstream artifacts by file state (size, inode, mtime, ctime) and hash only files written
    since they were recorded, so a stored run's activations are not read whole by every later stage; an edit that
    puts size and mtime back is still caught (ctime cannot be set back)."""
    import os

    from saelab.run import manifest as m

    folder = tmp_path / "r"
    run = m.Run.create(folder, {}, 0)
    with run.stage("collect", {}) as rec:
        for name in ("a.bin", "b.bin"):
            (folder / name).write_bytes(b"x" * 1000)
        rec["outputs"] += ["a.bin", "b.bin"]
    hashed: list[str] = []
    sha256 = m.sha256_file
    monkeypatch.setattr(m, "sha256_file", lambda p: hashed.append(p.name) or sha256(p))
    run = m.Run.open(folder)
    run.verify("collect")
    assert hashed == []
    (folder / "a.bin").write_bytes(b"x" * 1000)  # the same bytes written again: read again, and accepted
    run.verify("collect")
    assert hashed == ["a.bin"]
    b = folder / "b.bin"
    st = b.stat()
    b.write_bytes(b"y" * 1000)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert b.stat().st_mtime_ns == st.st_mtime_ns and b.stat().st_size == st.st_size
    with pytest.raises(m.RunError, match=r"artifact b\.bin was altered after stage 'collect'"):
        run.verify("collect")


@pytest.mark.bad_input
def test_altered_activations_name_collect_at_every_stage(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acts = run / "activations" / "acts.safetensors"
    data = bytearray(acts.read_bytes())
    data[-1] ^= 0xFF
    acts.write_bytes(bytes(data))
    fix = f"rerun `saelab collect --run-dir {run} --force`"
    stages = ["train", "eval", "cache", "sample", "explain", "score", "report"]
    for stage, line in _verdicts(run, stages, capsys).items():
        assert "artifact activations/acts.safetensors was altered after stage 'collect'" in line, stage
        assert fix in line, stage


# --- a manifest that is no manifest ---------------------------------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize("stage", list(COMMANDS))
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"stages": {"collect": ', "is not valid JSON"),
        ("[1, 2, 3]", "is not a saelab manifest (a JSON array"),
    ],
)
def test_a_broken_manifest_is_one_line_at_every_stage(
    stage: str, content: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(content)
    assert main([stage, "--run-dir", str(run)]) == 1
    line = error_line(capsys.readouterr().err)
    assert f"{run / 'manifest.json'} {problem}" in line and "restore it" in line
    assert (run / "manifest.json").read_text() == content  # left as it was


# --- a bad corpus ------------------------------------------------------------------------------------------


@pytest.mark.bad_input
def test_a_bad_corpus_line_is_named_and_the_run_is_kept(
    run: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """collect --force over a finished run with a corpus whose second line has no text (tests/test_data.py tries
    the other bad lines): one line naming file and line, and the run is as it was."""
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "the cat sat"}), '{"text": null}', json.dumps({"text": "a dog"})]
    corpus.write_text("\n".join(lines) + "\n")
    message = ":2: field 'text' is null (null), not a string"
    before = manifest(run)
    windows = (run / "data" / "windows.npz").read_bytes()
    assert main([*collect_args(run, tiny_model_dir, corpus), "--force"]) == 1
    assert f"{corpus}{message}" in error_line(capsys.readouterr().err)
    assert manifest(run) == before and (run / "data" / "windows.npz").read_bytes() == windows


# --- asking for more than there is --------------------------------------------------------------------------------


@pytest.mark.bad_input
def test_cache_of_more_tokens_than_collected_is_refused_before_any_write(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = manifest(run)
    latents = {p.name: sha256_file(p) for p in (run / "latents").iterdir()}
    assert main(["cache", "--run-dir", str(run), "--cache.n-tokens", "99999999999", "--force"]) == 1
    n = before["stages"]["collect"]["n_tokens"]
    line = error_line(capsys.readouterr().err)
    assert f"more than the {n} tokens the train split holds; pass --cache.n-tokens {n}" in line
    assert not (run / "latents.tmp").exists()
    assert {p.name: sha256_file(p) for p in (run / "latents").iterdir()} == latents and manifest(
        run
    ) == before


@pytest.mark.bad_input
def test_more_latents_than_eligible_are_all_taken_with_a_warning(
    run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = ["sample", "--run-dir", str(run), *SMALL["sample"], "--sample.n-latents", "100000000", "--force"]
    assert main(args) == 0
    samples = json.loads(
        (run / "samples" / "samples.json").read_text().splitlines()[0].removesuffix("[") + "[]}"
    )
    d_sae = manifest(run)["stages"]["cache"]["d_sae"]
    eligible = d_sae - samples["n_ineligible"]
    assert samples["n_latents"] + samples["n_skipped"] == eligible
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        f"--sample.n-latents 100000000 is more than the {eligible} eligible latents" in w for w in warnings
    ), warnings


# --- the report escapes what an LLM wrote ---------------------------------------------------------------------------


@pytest.mark.bad_input
def test_an_explanation_holding_html_is_escaped_in_report_md(run: Path) -> None:
    script = "<script>alert(1)</script>"
    models = json.dumps({"data": [{"id": "scripted"}]})
    with ScriptedServer([(200, models), (200, completion_body(script))]) as server:
        explain = [
            "explain",
            "--run-dir",
            str(run),
            "--explain.explainers",
            "default",
            "--llm.url",
            server.url,
        ]
        assert main([*explain, "--force"]) == 0
    records = [json.loads(x) for x in (run / "explain" / "explanations.jsonl").read_text().splitlines()]
    assert any(r["explanation"] == script for r in records)
    assert main(["score", "--run-dir", str(run), *SMALL["score"]]) == 0
    assert main(["report", "--run-dir", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "&lt;script>alert(1)&lt;/script>" in md and "<script" not in md
    assert "<script" not in (run / "report.html").read_text()


# --- a model that changed under the run ---------------------------------------------------------------------------


@pytest.mark.bad_input
def test_a_subject_model_changed_in_place_is_refused(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    run = tmp_path / "run"
    assert main([*collect_args(run, model, corpus_file), *SMALL["collect"]]) == 0
    assert main(["train", "--run-dir", str(run), *SMALL["train"]]) == 0
    lm = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        next(lm.parameters()).add_(1.0)
    lm.save_pretrained(model)  # the same folder, other weights
    before = manifest(run)
    assert main(["eval", "--run-dir", str(run), *SMALL["eval"]]) == 1
    line = error_line(capsys.readouterr().err)
    assert f"the subject model {model} is not the one the activations of {run} came from" in line
    assert f"saelab collect --run-dir {run} --force" in line and manifest(run) == before
