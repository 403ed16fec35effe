"""`saelab compare`: before/after deltas with paired bootstrap CIs on planted score changes, success rates,
changed parameters, and refusal of an altered score artifact."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from saelab.autointerp.results import (
    SCORE_DIR,
    OverallScore,
    ScoreRow,
    ScoreSummary,
    run_score_files,
    write_scores,
)
from saelab.cli import main
from saelab.eval.core import METRICS, EvalResult, Provenance
from saelab.metrics import BinaryMetrics, paired_bootstrap_delta
from saelab.run.manifest import Run

N_LATENTS = 40


def fake_run(
    folder: Path,
    f1: np.ndarray,
    lr: float = 1e-3,
    seed: int = 0,
    others: dict[str, tuple[np.ndarray, int]] | None = None,
    sae: tuple[float, float] | None = None,
) -> Path:
    """A run folder whose score stage wrote per-latent metrics (every metric set to the given F1) for the
    explainer "llm", and for each of `others` (name: (F1s, tokens per explanation)); with `sae` = (L0, EV), an
    eval stage too."""
    run = Run.create(folder, {"train": {"lr": lr, "k": 8}, "score": {"scorers": ["detection"]}}, seed)
    explainers = {"llm": (f1, 500), **(others or {})}
    with run.stage("explain", {}) as rec:
        (folder / "explain").mkdir()
        lines = [
            {"latent": i, "explainer": e, "model": f"model-{e}", "explanation": "x", "raw": "x", "ok": True,
             "error": None, "prompt_tokens": tokens, "completion_tokens": 0, "latency_s": 0.1}
            for e, (v, tokens) in explainers.items() for i in range(len(v))
        ]  # fmt: skip
        (folder / "explain" / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        rec["outputs"].append("explain/explanations.jsonl")
    with run.stage("score", {"score": {"scorers": ["detection"]}}) as rec:
        rows, overall = [], []
        for e, (v, _) in explainers.items():
            base = {"accuracy": 0.0, "specificity": 0.6, "auc": None, "n_failed": 0}
            rows += [
                ScoreRow(i, e, "detection", "x", BinaryMetrics(**{**base, "f1": x, "precision": x, "recall": x,
                         "balanced_accuracy": x, "n_pos": 20, "n_neg": 20}), None, [])
                for i, x in enumerate(v)
            ]  # fmt: skip
            pooled = {
                "f1": float(v.mean()),
                "precision": 0.5,
                "recall": float(v.mean()),
                "balanced_accuracy": 0.5,
            }
            micro = BinaryMetrics(**{**base, **pooled, "n_pos": 800, "n_neg": 800})
            overall.append(OverallScore(e, "detection", micro, {}, len(v), None, {}))
        write_scores(ScoreSummary(rows, overall, 0, {}), folder / SCORE_DIR)
        rec["outputs"] += [str(p.relative_to(folder)) for p in run_score_files(folder)]
    if sae is not None:
        (folder / "eval").mkdir()
        with run.stage("eval", {}) as rec:
            fields = {f.name: 0.0 for f in dataclasses.fields(EvalResult)}
            summary = {"l0": sae[0], "explained_variance": sae[1], "ce_loss_score": sae[1], "kl_score": 0.9}
            result = EvalResult(
                **{
                    **fields,
                    **summary,
                    "n_tokens": 100,
                    "n_ce_tokens": 10,
                    "excluded": "",
                    "log10_frequency": [],
                }
            )
            result.save(folder / METRICS, Provenance(sae_config={"architecture": "topk", "d_sae": 64}))
            rec["outputs"].append(METRICS)
            rec["summary"] = {**summary, "dead_fraction": 0.0}
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
    assert f1_row.endswith("| improved |  |")  # no flag: both judges answer both classes
    assert "| F1 > 0.3 |" in real and "| F1 > 0.7 |" in real
    noise = section(md, "## llm / detection: rerun against before")
    assert next(line for line in noise.splitlines() if line.startswith("| f1 |")).endswith(
        "| no significant change |  |"
    )
    changed = section(md, "## after against before")
    assert "| config.train.lr | 0.001 | 0.003 |" in changed
    assert "| seed | 0 | 1 |" in section(md, "## rerun against before")
    record = json.loads((out / "compare.json").read_text())
    d = next(x for x in record["comparisons"][0]["deltas"] if x["metric"] == "f1")
    assert d["lo"] > 0 and d["delta"] == pytest.approx(d["after"] - d["before"])
    assert d["pct_change"] == pytest.approx(100 * (d["after"] - d["before"]) / d["before"])
    assert "Per-latent metrics per run" in md and "## Flags" in md
    assert (out / "report.html").read_text().count(
        "data:image/png;base64,"
    ) == 4  # two scatters, per-model distributions, cost/quality
    with (out / "ranking.csv").open() as fh:
        ranking = list(csv.DictReader(fh))
    assert [r["entry"] for r in ranking] == [
        "after: llm",
        "rerun: llm",
        "before: llm",
    ]  # by balanced accuracy
    assert [r["balanced_accuracy_rank"] for r in ranking] == ["1", "2", "3"]
    assert {r["scorer"] for r in ranking} == {"detection"} and not any(r["flag"] for r in ranking)
    means = [float(r["balanced_accuracy"]) for r in ranking]
    assert means == sorted(means, reverse=True)
    assert "## Time and LLM tokens per run" in md and "## Per-latent scores per model" in md


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


def test_explainers_ranked_with_cost_and_saes_at_matched_l0(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    good = rng.uniform(0.6, 0.9, 12)
    poor = rng.uniform(0.1, 0.4, 12)
    a = fake_run(tmp_path / "a", good - 0.05, others={"token_stats": (poor, 0)}, sae=(10.0, 0.7))
    b = fake_run(tmp_path / "b", good, others={"token_stats": (poor, 0)}, sae=(11.0, 0.8))
    c = fake_run(tmp_path / "c", good[:8], sae=(40.0, 0.75))  # fewer latents: rankings use the common ones
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), str(c), "--out", str(out), "--compare.n-boot", "200"]) == 0
    md = (out / "report.md").read_text()
    ranking = section(md, "## Explainers ranked per scorer")
    assert "mean over 8 latents scored for all 5 explainers" in ranking
    rows = [line for line in ranking.splitlines() if line.startswith("| ") and "rank" not in line]
    assert rows[0].startswith("| c: llm |") or rows[0].startswith("| b: llm |")
    assert [r.split(" | ")[2] for r in rows] == ["1", "1", "3", "4", "4"]  # ties share a rank
    assert rows[-1].split(" | ")[0].endswith("token_stats")
    cost = section(md, "## Explainers: token usage and latency")
    assert "| a: token_stats | model-token_stats | 12 | 0 | 0 | 0 |" in cost
    assert "| c: llm | model-llm | 8 | 0 | 4000 | 500 |" in cost
    assert (out / "plots" / "cost_quality.png").stat().st_size > 5000
    matched = section(md, "## SAEs at matched L0")
    assert "**b**" in matched and "| a |" in matched and "| c |" in matched
    assert (out / "plots" / "runs_pareto_explained_variance.png").exists()


def test_mark_dominated() -> None:
    from saelab.eval.matched_l0 import mark_dominated

    entries = [
        {"l0": 10.0, "explained_variance": 0.7, "ce_loss_score": 0.9},
        {"l0": 11.0, "explained_variance": 0.8, "ce_loss_score": 0.8},
        {"l0": 40.0, "explained_variance": 0.75, "ce_loss_score": 0.95},
    ]
    marked = mark_dominated(entries)
    assert [e["dominated_ev"] for e in marked] == [False, False, True]
    assert [e["dominated_ce"] for e in marked] == [False, True, False]


def test_compare_says_first_when_runs_studied_different_latents(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = fake_run(tmp_path / "a", rng.uniform(0.2, 0.8, 20))
    b = fake_run(tmp_path / "b", rng.uniform(0.2, 0.8, 12))  # latents 0-11 of a's 0-19
    same = fake_run(tmp_path / "same", rng.uniform(0.2, 0.8, 20))
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out), "--compare.n-boot", "200"]) == 0
    md = (out / "report.md").read_text()
    first = md.split("\n## ", 1)[0]  # before the first section: the top of the report
    assert "The runs studied different latents: b scored 12 latents, 12 of them among the 20 of a" in first
    assert (
        main(["compare", str(a), str(same), "--out", str(tmp_path / "cmp2"), "--compare.n-boot", "200"]) == 0
    )
    assert "All runs scored the same 20 latents." in (tmp_path / "cmp2" / "report.md").read_text()
