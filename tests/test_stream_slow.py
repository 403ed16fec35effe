"""The whole loop on a streamed run of the real bundled model and corpus: `saelab train --collect.format stream` in
an empty folder (no
activations stored), then eval, cache, sample, explain, score and report, each as its own command (slow; runs in
CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_demo_slow import REDUCED

from saelab.cli import main

pytestmark = pytest.mark.slow


def flags(stage: str) -> list[str]:
    """The reduced demo's flags of one stage."""
    pairs = zip(REDUCED[::2], REDUCED[1::2], strict=True)
    return [x for flag, value in pairs if flag.startswith(f"--{stage}.") for x in (flag, value)]


def test_the_whole_loop_on_a_streamed_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "streamed"
    base = ["--run-dir", str(run)]
    train = [
        "--collect.format",
        "stream",
        *flags("collect"),
        *flags("train"),
        "--train.stream-buffer-rows",
        "2048",
        "--train.batch-size",
        "256",
    ]
    assert main(["train", *base, *train]) == 0
    for stage in ("eval", "cache", "sample", "explain", "score", "report"):
        assert main([stage, *base, *flags(stage)]) == 0, stage
    manifest = json.loads((run / "manifest.json").read_text())
    stages = manifest["stages"]
    assert stages["collect"]["format"] == "stream" and not (run / "activations").exists()
    assert stages["train"]["source"] == "stream" and stages["train"]["tokens"] == 2 * (6000 // 256) * 256
    blocks = [json.loads(x) for x in (run / "sae" / "train_log.jsonl").read_text().splitlines()]
    blocks = [b for b in blocks if b.get("event") == "block"]
    assert len(blocks) == 2 * 3 and all(b["documents"] >= 10 for b in blocks)
    assert stages["cache"]["dataset_split"] == "eval"  # `auto` on a streamed run: the held-out windows
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0 < m["explained_variance"] <= 1 and m["ce_clean"] < m["ce_sae"] < m["ce_zero_ablation"]
    summary = json.loads((run / "score" / "scores_summary.json").read_text())
    assert {(o["explainer"], o["scorer"]) for o in summary["overall"]} >= {("token_stats", "detection")}
    assert "report:" in capsys.readouterr().out and (run / "report.html").exists()
    assert "generated on the fly: 6000 tokens per epoch, none stored" in (run / "report.md").read_text()
