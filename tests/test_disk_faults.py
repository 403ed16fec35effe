"""The disk under a run: a run folder that cannot be made or written and a disk too small for collect are refused
before any work; a disk that fills up while an artifact is written is one error line, leaves no half-written
artifact under a final name (so no later stage reads one as complete) and loses no finished stage."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from test_pipeline import SMALL, error_line

from saelab.cli import main
from saelab.run import atomic

pytestmark = pytest.mark.fault


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
    """A real ENOSPC from the kernel: eval's metrics file is written through /dev/full."""
    run = tmp_path / "run"
    assert main(collect_args(run, tiny_model_dir, corpus_file)) == 0
    assert main(["train", "--run-dir", str(run), *SMALL["train"]]) == 0
    before = stages(run)
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json.tmp").symlink_to("/dev/full")
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), *SMALL["eval"]]) == 1
    line = error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "metrics.json" in line and "free space" in line
    assert sorted(p.name for p in (run / "eval").iterdir()) == []  # no half file, no temporary left behind
    assert stages(run) == before  # the finished stages are all there, eval is not recorded
    assert main(["eval", "--run-dir", str(run), *SMALL["eval"]]) == 0  # space again: the stage runs
    assert "eval" in stages(run)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic.write_json(path, {"v": 1})
    (tmp_path / "a.json.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left") as err:
        atomic.write_json(path, {"v": 2})
    assert err.value.filename == str(path)
    assert json.loads(path.read_text()) == {"v": 1} and not (tmp_path / "a.json.tmp").exists()
