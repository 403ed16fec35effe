"""Real saelab processes on one run at once: a stage holds the run's lock (`saelab.run.lock`) from its checks to its
manifest update; a second stage started meanwhile fails at once with one line naming the run, the stage holding
the lock and its pid, and changes nothing; the kernel frees the lock when the first process ends; however the
processes interleave, the manifest's records match the artifacts on disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support_run import SMALL, error_line

from saelab.cli import main
from saelab.run.lock import LOCK
from saelab.run.manifest import Run

pytestmark = pytest.mark.fault


def saelab(*args: str, out: Path | None = None) -> subprocess.Popen[str]:
    """`python -m saelab.cli ARGS` in a subprocess; its output goes to `out` (a file) or to pipes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "saelab.cli", *args]
    if out is None:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with out.open("w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)


def holder(run: Path) -> dict[str, object] | None:
    text = (run / LOCK).read_text() if (run / LOCK).exists() else ""
    return json.loads(text) if text else None


def all_verified(run: Path) -> Run:
    """The run, after checking every recorded stage's artifacts against the manifest."""
    r = Run.open(run)
    for stage in r.stages:
        r.verify(stage)
    return r


def collect_holding_the_lock(
    run: Path, model: Path, tmp_path: Path, *flags: str
) -> tuple[subprocess.Popen[str], Path]:
    """`saelab collect FLAGS` on `run` in a subprocess, reading its corpus from a named pipe nobody writes yet, once
    it holds the run's lock (it waits there for the corpus: `feed` writes it); its output goes to collect.txt."""
    fifo, out = tmp_path / "corpus.txt", tmp_path / "collect.txt"
    os.mkfifo(fifo)
    collect = ["collect", "--run-dir", str(run), "--model.name", str(model), "--data.dataset", str(fifo)]
    first = saelab(*collect, *flags, out=out)
    deadline = time.monotonic() + 120
    while (h := holder(run)) is None or h.get("pid") != first.pid:
        assert first.poll() is None, out.read_text()
        assert time.monotonic() < deadline, "collect never took the lock"
        time.sleep(0.05)
    assert h["stage"] == "collect"
    return first, fifo


def test_a_second_stage_on_a_busy_run_fails_at_once(
    run: Path, tiny_model_dir: Path, corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """collect holds the lock while it waits for its corpus (a named pipe nobody writes yet): sample and report,
    started then, are refused naming it; once the corpus comes, collect finishes and the lock is free."""
    first, fifo = collect_holding_the_lock(run, tiny_model_dir, tmp_path, *SMALL["collect"], "--force")
    before = (run / "manifest.json").read_bytes()
    samples = (run / "samples" / "samples.json").read_bytes()

    second = saelab("sample", "--run-dir", str(run), *SMALL["sample"], "--force")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 1, err
    line = error_line(err)
    assert f"run {run} is busy: stage 'collect' (pid {first.pid} on " in line and "another --run-dir" in line
    assert main(["report", "--run-dir", str(run)]) == 1  # the same from this process
    assert f"stage 'collect' (pid {first.pid} on " in error_line(capsys.readouterr().err)
    assert first.poll() is None  # the first did not finish meanwhile: the second did not wait for it
    assert (run / "manifest.json").read_bytes() == before and (
        run / "samples" / "samples.json"
    ).read_bytes() == samples

    feed(fifo, corpus_file.read_text(), first)
    assert first.wait(timeout=300) == 0, (tmp_path / "collect.txt").read_text()
    assert holder(run) is None  # released, and no stale holder written down
    all_verified(run)
    assert main(["report", "--run-dir", str(run)]) == 0  # the lock is free again


def feed(fifo: Path, text: str, reader: subprocess.Popen[str]) -> None:
    """Write `text` into the named pipe once `reader` opens it (never blocking on a reader that died)."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as err:
            assert err.errno == errno.ENXIO and reader.poll() is None, (
                "collect stopped before reading its corpus"
            )
            time.sleep(0.05)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def test_a_killed_stage_leaves_no_lock(run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL the stage holding the lock: the kernel drops it, the next stage runs."""
    first, _ = collect_holding_the_lock(run, tiny_model_dir, tmp_path, "--force")
    first.kill()
    assert first.wait(timeout=60) == -signal.SIGKILL
    assert holder(run) is not None  # its note stays behind; the lock itself went with the process
    assert main(["report", "--run-dir", str(run)]) == 0


def test_eval_and_sample_at_once_leave_a_consistent_manifest(run: Path) -> None:
    """The user's case: eval and sample started together. Each finishes or is refused with the busy line; the
    manifest then records what is on disk (no update lost: sample's record is the new samples')."""
    procs = {
        "eval": saelab("eval", "--run-dir", str(run), *SMALL["eval"]),
        "sample": saelab(
            "sample", "--run-dir", str(run), *SMALL["sample"], "--sample.n-latents", "3", "--force"
        ),
    }
    codes = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        codes[name] = proc.returncode
        assert proc.returncode in (0, 1), err
        if proc.returncode == 1:
            assert f"run {run} is busy: stage " in error_line(err)
    assert 0 in codes.values()
    r = all_verified(run)
    if codes["sample"] == 0:
        head = (run / "samples" / "samples.json").read_text().splitlines()[0]
        assert r.stages["sample"]["n_latents"] == json.loads(head.removesuffix("[") + "[]}")["n_latents"] <= 3


def test_concurrent_reports(run: Path) -> None:
    """Four `saelab report` at once: none fails but with the busy line, and the report on disk is one whole report
    that its manifest record vouches for, with no temporary file left."""
    procs = [saelab("report", "--run-dir", str(run)) for _ in range(4)]
    codes = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        codes.append(proc.returncode)
        assert "Traceback" not in err, err
        assert proc.returncode == 0 or "is busy: stage 'report'" in error_line(err), err
    assert 0 in codes
    all_verified(run)
    assert not list(run.rglob("*.tmp")), list(run.rglob("*.tmp"))


def test_manifest_updates_merge(run: Path) -> None:
    """Two processes' views of one manifest, each recording its own stage: both records are kept (an update
    re-reads the manifest and changes only its own keys)."""
    before = set(Run.open(run).stages)
    a, b = Run.open(run), Run.open(run)
    with a.stage("probe_a", {}) as rec:
        rec["n"] = 1
    b.set_hash("probe", "ab" * 32)  # b read the manifest before a's record: it keeps it all the same
    with b.stage("probe_b", {}) as rec:
        rec["n"] = 2
    final = Run.open(run)
    assert set(final.stages) == {*before, "probe_a", "probe_b"}
    assert final.stages["probe_a"]["n"] == 1 and final.stages["probe_b"]["n"] == 2
    assert final.data["hashes"]["probe"] == "ab" * 32 and set(final.data["hashes"]) == {
        "model",
        "data",
        "sae",
        "probe",
    }
