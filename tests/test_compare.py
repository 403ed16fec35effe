"""`saelab compare`: before/after deltas with paired bootstrap CIs on planted score changes, success rates,
changed parameters, and refusal of an altered score artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from saelab.cli import main
from saelab.metrics import paired_bootstrap_delta
from saelab.runs import Run

N_LATENTS = 40


def fake_run(folder: Path, f1: np.ndarray, lr: float = 1e-3, seed: int = 0) -> Path:
    """A run folder whose score stage wrote per-latent metrics (every metric set to the given F1)."""
    run = Run.create(folder, {"train": {"lr": lr, "k": 8}, "score": {"scorers": ["detection"]}}, seed)
    with run.stage("score", {"score": {"scorers": ["detection"]}}) as rec:
        (folder / "score").mkdir()
        base = {"explainer": "llm", "scorer": "detection", "accuracy": 0.0, "specificity": 0.6, "auc": None}
        rows = [
            {
                **base,
                "latent": i,
                "f1": v,
                "precision": v,
                "recall": v,
                "balanced_accuracy": v,
                "n_pos": 20,
                "n_neg": 20,
            }
            for i, v in enumerate(f1)
        ]
        (folder / "score" / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        overall = {**base, "f1": float(f1.mean()), "precision": 0.5, "recall": float(f1.mean()), "n_pos": 800}
        summary = {"models": {}, "overall": [{**overall, "balanced_accuracy": 0.5, "n_neg": 800}]}
        (folder / "score" / "scores_summary.json").write_text(json.dumps(summary))
        rec["outputs"] += ["score/scores.jsonl", "score/scores_summary.json"]
    return folder


@pytest.fixture
def three_runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.8, N_LATENTS)  # latents differ a lot; the change is small beside that spread
    better = np.clip(base + 0.06 + rng.normal(0, 0.02, N_LATENTS), 0, 1)
    noise = np.clip(base + rng.normal(0, 0.02, N_LATENTS), 0, 1)
    return (
        fake_run(tmp_path / "before", base),
        fake_run(tmp_path / "after", better, lr=3e-3),
        fake_run(tmp_path / "rerun", noise, seed=1),
    )


def section(md: str, heading: str) -> str:
    return md.split(heading, 1)[1].split("\n## ", 1)[0]


def test_compare_calls_a_real_change_and_not_noise(
    three_runs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    before, after, rerun = three_runs
    out = tmp_path / "cmp"
    assert (
        main(["compare", str(before), str(after), str(rerun), "--out", str(out), "--compare.n-boot", "500"])
        == 0
    )
    md = (out / "report.md").read_text()
    real = section(md, "## llm / detection: after against before")
    f1_row = next(line for line in real.splitlines() if line.startswith("| f1 |"))
    assert f1_row.endswith("| improved |")
    assert "| F1 > 0.3 |" in real and "| F1 > 0.7 |" in real
    noise = section(md, "## llm / detection: rerun against before")
    assert next(line for line in noise.splitlines() if line.startswith("| f1 |")).endswith(
        "| no significant change |"
    )
    changed = section(md, "## after against before")
    assert "| config.train.lr | 0.001 | 0.003 |" in changed
    assert "| seed | 0 | 1 |" in section(md, "## rerun against before")
    record = json.loads((out / "compare.json").read_text())
    d = next(x for x in record["comparisons"][0]["deltas"] if x["metric"] == "f1")
    assert d["lo"] > 0 and d["delta"] == pytest.approx(d["after"] - d["before"])
    assert d["pct_change"] == pytest.approx(100 * (d["after"] - d["before"]) / d["before"])
    assert "Per-latent metrics per run" in md and "## Flags" in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2


def test_compare_refuses_an_altered_score_artifact(
    three_runs: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, after, _ = three_runs
    scores = after / "score" / "scores.jsonl"
    scores.write_text(scores.read_text().replace('"f1": 0.', '"f1": 0.9', 1))
    assert main(["compare", str(before), str(after), "--out", str(tmp_path / "cmp")]) == 1
    assert "score/scores.jsonl was altered" in capsys.readouterr().err


def test_compare_needs_two_runs(
    three_runs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", str(three_runs[0])]) == 1
    assert "at least two run folders" in capsys.readouterr().err


def test_paired_bootstrap_is_paired() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, 60)
    b = a + 0.03 + rng.normal(0, 0.01, 60)
    d, lo, hi = paired_bootstrap_delta(a, b, n_boot=1000)
    assert d == pytest.approx(float(np.mean(b - a)))
    assert 0 < lo < d < hi
    # resampling the runs independently mixes in the spread of latents and cannot see the same change
    ia = rng.integers(0, 60, (1000, 60))
    ib = rng.integers(0, 60, (1000, 60))
    unpaired = np.quantile(b[ib].mean(1) - a[ia].mean(1), [0.025, 0.975])
    assert unpaired[0] < 0 < unpaired[1]
    assert paired_bootstrap_delta(a, a, n_boot=200) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal in length"):
        paired_bootstrap_delta(a, a[:3])
