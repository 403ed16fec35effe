"""A judge model that says "Yes" to everything, served over HTTP on loopback: the score stage finishes, the
scores show it (recall 1, specificity 0, balanced accuracy 0.5, no better than the shuffled-explanation control)
and the report flags the scorer as answering one class, instead of reporting a high recall as a success."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llm_server import LocalOpenAIServer
from support_llm import RuleClient
from test_pipeline import run_stages

from saelab.cli import main

pytestmark = pytest.mark.fault


def test_a_judge_that_says_yes_to_everything_is_reported_and_flagged(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    run = tmp_path / "run"
    run_stages(run, tiny_model_dir, corpus_file, until="explain")
    with LocalOpenAIServer(RuleClient(judge_text="Yes")) as server:  # type: ignore[arg-type]
        score = [
            "score",
            "--run-dir",
            str(run),
            "--llm.url",
            server.url,
            "--score.scorers",
            "detection",
            "fuzzing",
        ]
        assert main(score) == 0
    summary = json.loads((run / "score" / "scores_summary.json").read_text())
    overall = {(o["explainer"], o["scorer"]): o for o in summary["overall"]}
    for scorer in ("detection", "fuzzing"):
        o = overall[("token_stats", scorer)]
        assert o["n_failed"] == 0 and o["n_pos"] > 0 and o["n_neg"] > 0
        assert (o["recall"], o["specificity"], o["balanced_accuracy"]) == (1.0, 0.0, 0.5)
        control = overall[("shuffled", scorer)]
        assert control["balanced_accuracy"] == 0.5  # the explanations do no better than the wrong ones
    assert main(["report", "--run-dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "answers positive for (almost) everything: recall 1.000, specificity 0.000" in report
    assert (
        "Failed judgements (excluded from the metrics, counted): 0 requests the LLM did not answer" in report
    )
