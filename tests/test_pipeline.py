"""Every stage from the CLI on the previous stage's artifacts, on a tiny real model and a synthetic corpus."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from saelab.cli import COMMANDS, main

SMALL = {
    "collect": ["--data.ctx-len", "32", "--collect.n-train-tokens", "1500", "--collect.batch-size", "8"],
    "train": ["--train.expansion", "4", "--train.k", "4", "--train.batch-size", "128", "--train.epochs", "4"],
    "eval": ["--eval.n-windows", "8", "--eval.n-ce-windows", "4", "--eval.batch-size", "4"],
    "cache": [],
    "sample": [
        "--sample.n-latents", "4", "--sample.example-ctx-len", "8", "--sample.min-examples", "8",
        "--sample.n-examples-train", "4", "--sample.n-examples-test", "4", "--sample.n-quantiles", "2",
        "--sample.n-non-activating", "4",
    ],
    "explain": ["--explain.explainers", "token_stats"],
    "score": ["--score.scorers", "embedding"],
}  # fmt: skip


def error_line(stderr: str) -> str:
    """The one error line saelab writes (progress bars of model loading may precede it)."""
    lines = [line for line in stderr.splitlines() if "saelab:" in line]
    assert len(lines) == 1, stderr
    assert stderr.rstrip().endswith(lines[0].split("saelab:", 1)[1]), "the error is the last thing written"
    return lines[0]


def run_stages(run_dir: Path, model: Path, corpus: Path) -> None:
    for stage, extra in SMALL.items():
        args = [stage, "--run-dir", str(run_dir), *extra]
        if stage == "collect":
            args += ["--model.name", str(model), "--data.dataset", str(corpus)]
        assert main(args) == 0, stage


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, corpus_file: Path) -> Path:
    folder = tmp_path_factory.mktemp("run") / "r"
    run_stages(folder, tiny_model_dir, corpus_file)
    assert main(["report", "--run-dir", str(folder)]) == 0
    return folder


def test_every_stage_recorded_with_hashes(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {*SMALL, "report"}
    for name, st in manifest["stages"].items():
        assert st["seconds"] >= 0, name
        for rel, digest in st["outputs"].items():
            assert (run_dir / rel).exists() and len(digest) == 64, rel
    assert set(manifest["hashes"]) == {"model", "data", "sae"}
    assert manifest["config"]["train"]["k"] == 4
    assert manifest["stages"]["collect"]["hookpoint"] == "model.layers.2"


def test_metrics_in_valid_ranges(run_dir: Path) -> None:
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert 0 < m["l0"] <= 4
    assert m["explained_variance"] <= 1 and m["cosine_similarity"] <= 1
    assert 0 <= m["dead_fraction"] <= 1 and 0 <= m["dense_fraction"] <= 1
    assert m["ce_zero_ablation"] > 0 and m["ce_clean"] > 0
    summary = json.loads((run_dir / "score" / "scores_summary.json").read_text())
    for row in summary["overall"]:
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy"):
            assert 0 <= row[key] <= 1, key


def test_report_has_tables_and_a_plot(run_dir: Path) -> None:
    md = (run_dir / "report.md").read_text()
    assert "explained_variance" in md and "token_stats" in md and "plots/feature_density.png" in md
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2
    assert (run_dir / "plots" / "feature_density.png").stat().st_size > 1000


def test_altered_artifact_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with (copy / "sae" / "sae.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    assert main(["cache", "--run-dir", str(copy)]) == 1
    assert "sae/sae.safetensors was altered" in error_line(capsys.readouterr().err)


def test_stage_without_its_input_names_the_missing_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--run-dir", str(tmp_path / "none")]) == 1
    assert "saelab collect" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["collect", "--run-dir", str(tmp_path / "x"), "--model.name", str(tiny_model_dir)]
    assert main([*base, "--data.dataset", str(corpus_file), "--collect.hookpoint", "layers.99"]) == 1
    assert "hookpoint 'layers.99' is not a module" in error_line(capsys.readouterr().err)
    (tmp_path / "empty.txt").write_text("")
    assert main([*base, "--data.dataset", str(tmp_path / "empty.txt")]) == 1
    assert "fewer than two windows" in capsys.readouterr().err
    assert main(["collect", "--run-dir", str(tmp_path / "y"), "--model.name", str(tmp_path / "nomodel")]) == 1
    assert "never downloads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # tyro reports the config error with the usage
        main(["train", "--run-dir", str(tmp_path / "x"), "--train.lr", "-1"])
    assert exc.value.code == 2
    assert "train.lr must be > 0" in capsys.readouterr().err


def test_unreachable_llm_url(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with socket.socket() as s:  # a port on loopback that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    args = ["explain", "--run-dir", str(copy), "--llm.url", url, "--llm.max-retries", "0"]
    assert main([*args, "--explain.explainers", "default"]) == 1
    err = error_line(capsys.readouterr().err)
    assert url in err and "--llm.url" in err
    assert (copy / "explain" / "explanations.jsonl").read_bytes() == (
        run_dir / "explain" / "explanations.jsonl"
    ).read_bytes()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_is_generated_from_the_config(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--run-dir" in out
    if command == "train":
        assert "Active latents per token" in out  # the field's docstring in config.py
