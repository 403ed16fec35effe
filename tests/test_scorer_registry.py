"""The scorer registry: a scorer registered the documented way (a class and one `register_scorer` line, here in
this file) is accepted by the config and the CLI and runs through the real score stage; unknown names are one
clear error naming the registered ones."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from support_llm import synthetic_samples
from support_run import run_stages
from test_score import explanations

from saelab.autointerp.explain import EXPLANATIONS, load_explanations, quote_example
from saelab.autointerp.llm.base import LLMClient
from saelab.autointerp.results import SCORE_DIR as SCORES
from saelab.autointerp.results import load_scores
from saelab.autointerp.score import run_score
from saelab.autointerp.scorers import (
    SCORERS,
    check_scorer_names,
    llm_scorers,
    make_scorers,
    register_scorer,
)
from saelab.autointerp.scorers.base import Prediction, ScorerOutput, scoring_examples
from saelab.autointerp.scorers.detection import DetectionScorer
from saelab.cli import main
from saelab.config import ConfigError, ScoreConfig
from saelab.latents.sampling import SAMPLES, LatentExamples, SampleSet


class QuotedTokenScorer:
    """A toy scorer without an LLM: an example is predicted activating when one of its tokens is quoted in the
    explanation (token_stats explanations quote tokens); its score is the share of its tokens that are."""

    name = "quoted_token"

    @classmethod
    def from_config(
        cls, cfg: ScoreConfig, client: LLMClient | None, samples: SampleSet, seed: int
    ) -> QuotedTokenScorer:
        return cls()

    async def score(self, le: LatentExamples, explanation: str) -> ScorerOutput:
        preds = []
        for ex, label in scoring_examples(le):
            hits = [t for t in ex.token_strs if quote_example(t) in explanation]
            share = len(hits) / len(ex.token_strs)
            preds.append(
                Prediction(ex.example_id, label, int(bool(hits)), share, ex.quantile if label else -1)
            )
        return ScorerOutput(preds, extra={"explanation_chars": float(len(explanation))})


register_scorer("quoted_token", QuotedTokenScorer.from_config, needs_llm=False)


def test_builtin_and_registered_scorers() -> None:
    assert list(SCORERS)[:4] == ["detection", "fuzzing", "embedding", "simulation"]
    assert set(llm_scorers()) == {"detection", "fuzzing", "simulation"}  # not embedding nor the toy scorer
    register_scorer("quoted_token", QuotedTokenScorer.from_config, needs_llm=False)  # the same again: a no-op
    assert ScoreConfig(scorers=("quoted_token", "detection")).scorers == ("quoted_token", "detection")


@pytest.mark.bad_input
def test_unknown_scorer_is_one_error_naming_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        check_scorer_names(["detection", "detecton"])
    message = str(err.value)
    assert message.startswith("score.scorers: no scorer named 'detecton'; registered: detection, fuzzing, ")
    assert all(name in message for name in SCORERS)
    cfg = ScoreConfig(
        scorers=("detecton",)
    )  # the config holds names; the registry is asked when they are used
    with pytest.raises(ConfigError, match="no scorer named 'detecton'; registered: detection"):
        run_score(synthetic_samples(1), explanations(1), cfg, None, tmp_path, 0)
    assert not list(tmp_path.iterdir())


@pytest.mark.bad_input
def test_unknown_scorer_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["score", "--run-dir", str(run), "--score.scorers", "quoted_token", "no_such_scorer"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(
        "saelab: config error: score.scorers: no scorer named 'no_such_scorer'; registered: detection,"
    )
    assert not run.exists()  # refused before any work


@pytest.mark.bad_input
def test_registering_a_taken_name_or_a_misnamed_scorer_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="a scorer named 'detection' is already registered"):
        register_scorer("detection", QuotedTokenScorer.from_config, needs_llm=False)
    assert SCORERS["detection"].make == DetectionScorer.from_config
    monkeypatch.setitem(SCORERS, "renamed", SCORERS["quoted_token"])
    with pytest.raises(ValueError, match="registered as 'renamed' calls itself 'quoted_token'"):
        make_scorers(ScoreConfig(scorers=("renamed",)), None, synthetic_samples(1), 0)
    check_scorer_names(["renamed", "quoted_token"])  # both registered: no error


def test_registered_scorer_in_run_score(tmp_path: Path) -> None:
    samples = synthetic_samples(n_latents=3)
    cfg = ScoreConfig(scorers=("quoted_token",), shuffled_control=False)
    summary = run_score(samples, explanations(3), cfg, None, tmp_path, seed=0)  # no LLM client needed
    assert [r.scorer for r in summary.rows] == ["quoted_token"] * 3
    assert summary.models["judge_llm"] is None
    assert load_scores(tmp_path) == summary


def test_registered_scorer_runs_in_the_score_stage(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    """collect -> ... -> explain (token_stats) from the CLI, then `saelab score --score.scorers quoted_token`."""
    run = tmp_path / "run"
    run_stages(run, tiny_model_dir, corpus_file, until="explain")
    assert main(["score", "--run-dir", str(run), "--score.scorers", "quoted_token"]) == 0

    summary = load_scores(run / SCORES)
    samples = {le.latent: le for le in SampleSet.load(run / SAMPLES).latents}
    explained = [r for r in load_explanations(run / EXPLANATIONS) if r.ok]
    rows = [r for r in summary.rows if r.scorer == "quoted_token"]
    assert rows == summary.rows and len(explained) >= 2
    latents = sorted(r.latent for r in explained)
    assert [r.latent for r in rows if r.explainer == "token_stats"] == latents  # rows ordered by latent
    assert [r.latent for r in rows if r.explainer == "shuffled"] == latents
    for row in rows:  # exactly what the toy scorer says of these examples and this explanation
        out = asyncio.run(QuotedTokenScorer().score(samples[row.latent], row.explanation))
        assert row.predictions == out.predictions and row.extra == out.extra
        assert row.metrics.n_pos + row.metrics.n_neg == len(out.predictions) > 0
    token_stats = [r for r in rows if r.explainer == "token_stats"]
    assert sum(p.pred == 1 for r in token_stats for p in r.predictions if p.label == 1) > 0
    assert {(o.explainer, o.scorer) for o in summary.overall} == {
        ("token_stats", "quoted_token"),
        ("shuffled", "quoted_token"),
    }
    assert {c["metric"] for c in summary.comparisons} >= {"f1", "balanced_accuracy"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["score"]["model"] == "none"  # a scorer that needs no LLM: none was started
    assert manifest["stages"]["score"]["config"]["score"]["scorers"] == ["quoted_token"]
