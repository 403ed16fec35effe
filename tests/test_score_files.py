"""The score stage's files: `write_scores` then `load_scores` gives back equal objects, and the browser's lazy
reader (`index_score_lines`, `read_score_row`) agrees with a full parse of every line."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
from support_llm import RuleClient, synthetic_samples
from test_score import BagOfWords, explanations

from saelab.autointerp.results import (
    SCORES_FILE,
    SUMMARY_FILE,
    ScoreRow,
    ScoreSummary,
    index_score_lines,
    load_scores,
    paired_explainer_deltas,
    read_score_row,
    summarise,
    write_scores,
)
from saelab.autointerp.score import run_score, score_async
from saelab.autointerp.scorers import make_scorers
from saelab.autointerp.scorers.detection import DetectionScorer
from saelab.autointerp.scorers.embedding import EmbeddingScorer
from saelab.config import ScoreConfig


def summary_of_every_kind(tmp_path: Path) -> ScoreSummary:
    """Rows of every built-in scorer (the embedding one on a bag-of-words embedder): thresholds, AUCs and
    correlations both set and None, failed judgements, a failed explanation and the shuffled control."""
    samples = synthetic_samples(n_latents=4)
    recs = explanations(4) + explanations(4, "token_stats")
    recs[2] = replace(recs[2], explanation="the token nothing")  # never said yes to: constant simulation
    recs[3] = replace(recs[3], ok=False, explanation=None, error="no explanation")
    cfg = ScoreConfig(scorers=("detection", "fuzzing", "simulation"))
    judged = run_score(samples, recs, cfg, RuleClient(), tmp_path / "judged", seed=1)
    embedded = asyncio.run(score_async(samples, recs, [EmbeddingScorer(BagOfWords(), samples)]))
    failing = asyncio.run(score_async(samples, recs[:1], [DetectionScorer(RuleClient(judge_text="Maybe"))]))
    rows = [*judged.rows, *embedded, *[replace(r, explainer="unparsed") for r in failing]]
    overall = summarise(rows, {le.latent: le.frequency for le in samples.latents})
    return ScoreSummary(rows, overall, 1, judged.models, paired_explainer_deltas(rows, seed=1))


def test_save_then_load_gives_equal_objects(tmp_path: Path) -> None:
    summary = summary_of_every_kind(tmp_path)
    kinds = {(r.scorer, r.threshold is None, r.metrics.auc is None, bool(r.extra)) for r in summary.rows}
    assert {("embedding", False, False, False), ("simulation", True, False, True)} <= kinds
    assert any(p.failure == "unparseable" for r in summary.rows for p in r.predictions)
    assert any(v is None for r in summary.rows for v in r.extra.values())
    write_scores(summary, tmp_path / "score")
    assert sorted(p.name for p in (tmp_path / "score").iterdir()) == sorted([SCORES_FILE, SUMMARY_FILE])
    loaded = load_scores(tmp_path / "score")
    assert loaded == summary
    assert loaded.failures() == summary.failures() and loaded.failures()["unparseable_answers"] > 0
    assert all(isinstance(q, int) for o in loaded.overall for q in o.quantile_recall)


def test_load_scores_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"scores.jsonl is missing; run `saelab score` first"):
        load_scores(tmp_path)


def test_index_and_read_one_row_agree_with_the_whole_file(tmp_path: Path) -> None:
    summary = summary_of_every_kind(tmp_path)
    tricky = replace(summary.rows[0], explanation='quotes ", "predictions": [ and a newline\n inside')
    summary = replace(summary, rows=[tricky, *summary.rows])
    write_scores(summary, tmp_path)
    path = tmp_path / SCORES_FILE
    index = index_score_lines(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(index) == len(lines) == len(summary.rows)
    for entry, line, row in zip(index, lines, summary.rows):
        full = json.loads(line)
        assert (entry.latent, entry.explainer, entry.scorer) == (row.latent, row.explainer, row.scorer)
        keep = {k: v for k, v in full.items() if k not in ("latent", "explainer", "scorer", "explanation")}
        assert entry.metrics == {k: v for k, v in keep.items() if k != "predictions"}
        assert read_score_row(path, entry.offset, entry.length) == row
    assert index[0].metrics["f1"] == tricky.metrics.f1


def test_predictions_come_last_in_a_row() -> None:
    """`index_score_lines` parses only what comes before a line's predictions: ScoreRow.to_dict must keep them
    last, after the scorer-specific scores."""
    samples = synthetic_samples(n_latents=1)
    cfg = ScoreConfig(scorers=("simulation",), shuffled_control=False)
    rows = asyncio.run(score_async(samples, explanations(1), make_scorers(cfg, RuleClient(), samples, 0)))
    row: ScoreRow = rows[0]
    assert row.extra
    keys = list(row.to_dict())
    assert keys[-1] == "predictions" and "correlation" in keys
    assert ScoreRow.from_dict(json.loads(json.dumps(row.to_dict()))) == row
