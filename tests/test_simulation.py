"""Simulation scorer: answer parsing, the correlation, and scoring with a rule-based simulator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support_llm import RuleClient, synthetic_samples
from test_score import explanations

from saelab.autointerp.llm.base import run_sync
from saelab.autointerp.score import run_score
from saelab.autointerp.scorers.simulation import (
    MAX_VALUE,
    SimulationScorer,
    correlation,
    parse_simulation,
    simulation_messages,
)
from saelab.config import ScoreConfig


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2: 7\n4: 10", [0, 7, 0, 10, 0]),
        ("none", [0, 0, 0, 0, 0]),
        ("None.", [0, 0, 0, 0, 0]),
        ("token 1 = 3\n#5: 99", [3, 0, 0, 0, MAX_VALUE]),  # labels tolerated, values clipped
        ("9: 5\n3: 2", [0, 0, 2, 0, 0]),  # an index past the last token is ignored
        ("The tokens about rivers.", None),  # no reading: a failure, not zeros
        ("9: 5", None),
    ],
)
def test_parse_simulation(text: str, expected: list[float] | None) -> None:
    got = parse_simulation(text, 5)
    assert (got is None) if expected is None else got is not None and got.tolist() == expected


def test_correlation_is_pearson_over_all_tokens() -> None:
    rng = np.random.default_rng(0)
    true = [rng.random(7), rng.random(5)]
    pred = [t + rng.normal(0, 0.3, t.shape) for t in true]
    assert correlation(true, pred) == pytest.approx(
        np.corrcoef(np.concatenate(true), np.concatenate(pred))[0, 1]
    )
    assert correlation(true, [np.zeros(7), np.zeros(5)]) is None  # constant prediction: undefined, not 0
    assert correlation([], []) is None


def test_tokens_are_quoted_one_per_line() -> None:
    le = synthetic_samples(1).latents[0]
    ex = le.test_pos[0]
    user = simulation_messages('say "hi"\nignore this', ex)[-1]["content"]
    lines = user.split("\nTokens:\n", 1)[1].splitlines()
    assert [json.loads(line.split(" ", 1)[1]) for line in lines] == list(ex.token_strs)


def test_right_explanation_correlates_and_wrong_one_does_not() -> None:
    le = synthetic_samples(2).latents[0]
    scorer = SimulationScorer(RuleClient())
    right = run_sync(scorer.score(le, "the token Paris"))
    wrong = run_sync(scorer.score(le, "the token guitar"))
    assert right.extra["correlation"] is not None and right.extra["correlation"] > 0.8
    assert wrong.extra["correlation"] is None  # predicts 0 everywhere
    assert all(p.pred == p.label for p in right.predictions)
    assert {p.quantile for p in right.predictions if p.label} == {ex.quantile for ex in le.test_pos}


@pytest.mark.fault
def test_unreadable_answers_are_failed_judgements() -> None:
    le = synthetic_samples(1).latents[0]
    out = run_sync(SimulationScorer(RuleClient(judge_text="I cannot tell")).score(le, "the token Paris"))
    assert all(p.pred is None for p in out.predictions) and out.extra["correlation"] is None


def test_run_score_records_correlation(tmp_path: Path) -> None:
    samples = synthetic_samples(3)
    summary = run_score(
        samples,
        explanations(3),
        ScoreConfig(scorers=("simulation",), shuffled_control=False),
        RuleClient(),
        tmp_path,
        0,
    )
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["scorer"] for r in rows] == ["simulation"] * 3 and all(r["correlation"] > 0.8 for r in rows)
    (overall,) = summary.overall
    assert overall.macro["correlation"] == pytest.approx(np.mean([r["correlation"] for r in rows]))
    assert overall.micro.balanced_accuracy == 1.0
