"""The disk under a run: a run folder that cannot be made or written and a disk too small for collect are refused
before any work; a disk that fills up while an artifact is written is one error line, leaves no half-written
artifact under a final name (so no later stage reads one as complete) and loses no finished stage.

A full disk is a real one: a tmpfs, filled to its last block, mounted over the folder written to, inside a user and
mount namespace of the writing process's own (`unshare --user --map-root-user --mount`: no root needed, nothing
mounted outside it), so the kernel answers the write with ENOSPC. (A link from the temporary name to /dev/full no
longer works: every temporary file has a fresh name, made exclusively.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from support_run import SMALL, error_line

from saelab.cli import main

pytestmark = pytest.mark.fault

_FULL_DISK = """set -e
mount -t tmpfs -o size=64k saelab-full "$1"
mkdir "$1/d"
cp -a "$2/." "$1/d/"
dd if=/dev/zero of="$1/fill" bs=4k 2>/dev/null || true
mount --bind "$1/d" "$2"
folder=$2 listing=$3
shift 3
set +e
"$@"
rc=$?
ls -A "$folder" > "$listing"
exit $rc
"""


def on_a_full_disk(
    folder: Path, scratch: Path, argv: list[str]
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run `argv` with `folder` (its files copied) on a full file system (see the module docstring); returns the
    finished process and the names in `folder` as it left them. Outside the namespace `folder` is untouched."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"a full disk needs user namespaces (unshare -rm): {probe.stderr.decode().strip()}")
    scratch.mkdir()
    listing = scratch.with_name(scratch.name + ".listing")
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _FULL_DISK, "sh"]
    cmd += [str(scratch), str(folder), str(listing), *argv]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    return proc, listing.read_text().split() if listing.exists() else []


def collect_args(run: Path, model: Path, corpus: Path) -> list[str]:
    return [
        "collect",
        "--run-dir",
        str(run),
        "--model.name",
        str(model),
        "--data.dataset",
        str(corpus),
        *SMALL["collect"],
    ]


def stages(run: Path) -> dict[str, object]:
    return dict(json.loads((run / "manifest.json").read_text())["stages"])


@pytest.mark.bad_input
def test_run_dir_that_cannot_be_a_folder(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    run = tmp_path / "a-file" / "run"
    assert main(collect_args(run, tiny_model_dir, corpus_file)) == 1
    line = error_line(capsys.readouterr().err)
    assert str(run) in line and "pass a writable --run-dir" in line


@pytest.mark.bad_input
def test_disk_too_small_for_collect_is_refused_before_any_forward(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 50_000, 50_000))
    run = tmp_path / "run"
    assert main(collect_args(run, tiny_model_dir, corpus_file)) == 1
    line = error_line(capsys.readouterr().err)
    assert "collecting 1500 tokens needs about" in line and "--collect.n-train-tokens" in line
    assert not (run / "activations").exists() and "collect" not in stages(run)


def test_disk_full_while_writing_an_artifact(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real ENOSPC from the kernel: eval writes its metrics file onto a full file system."""
    run = tmp_path / "run"
    assert main(collect_args(run, tiny_model_dir, corpus_file)) == 0
    assert main(["train", "--run-dir", str(run), *SMALL["train"]]) == 0
    before = stages(run)
    (run / "eval").mkdir()
    evals = ["eval", "--run-dir", str(run), *SMALL["eval"]]
    proc, left = on_a_full_disk(run / "eval", tmp_path / "fs", [sys.executable, "-m", "saelab.cli", *evals])
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert "No space left on device" in line and "metrics.json" in line and "free space" in line
    assert left == []  # no half file, no temporary left behind
    assert stages(run) == before  # the finished stages are all there, eval is not recorded
    assert main(evals) == 0  # space again: the stage runs
    assert "eval" in stages(run)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    """On a full disk the old file stays, whole; the error names the file; no temporary file is left."""
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps({"v": 1}))
    script = """if True:
        import json, sys
        from pathlib import Path
        from saelab.run import atomic
        path = Path(sys.argv[1]) / "a.json"
        try:
            atomic.write_json(path, {"v": 2, "pad": "x" * 100_000})
        except OSError as err:
            print(json.dumps({"error": str(err), "filename": err.filename, "kept": json.loads(path.read_text())}))
    """
    proc, left = on_a_full_disk(folder, tmp_path / "fs", [sys.executable, "-c", script, str(folder)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert "No space left" in out["error"] and out["filename"] == str(folder / "a.json")
    assert out["kept"] == {"v": 1} and left == ["a.json"]


def test_temporary_files_are_unique_and_keep_the_umask_mode(tmp_path: Path) -> None:
    """Writers of one file at once each have their own temporary file (none finds its temporary gone, the file holds
    one whole version); a file written through a temporary one gets 0666 less the umask, as any new file does."""
    import threading

    from saelab.run import atomic

    path = tmp_path / "x.json"
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for j in range(50):
                atomic.write_json(path, {"writer": i, "n": j, "pad": "y" * 2000})
        except BaseException as err:  # collected: a thread's exception would not fail the test
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(json.loads(path.read_text())) == {"writer", "n", "pad"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "b.txt", "b")
        (tmp_path / "c.txt").write_text("c")
    finally:
        os.umask(old)
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == (tmp_path / "c.txt").stat().st_mode & 0o777 == 0o640
