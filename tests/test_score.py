"""Scorers: yes/no reading, fuzzing marks, the label-free embedding threshold, metrics and output files."""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support_llm import PLANTED, RuleClient, synthetic_samples

from saelab.autointerp.explain import ExplanationRecord
from saelab.autointerp.llm.base import ChatResponse, LLMError
from saelab.autointerp.score import run_score, score_async
from saelab.autointerp.scorers.base import parse_yes_no, yes_probability
from saelab.autointerp.scorers.detection import DetectionScorer
from saelab.autointerp.scorers.embedding import EmbeddingScorer
from saelab.autointerp.scorers.fuzzing import FuzzingScorer, fuzz_marks
from saelab.config import ScoreConfig
from saelab.metrics import binary_metrics


class BagOfWords:
    """A tiny real embedder (hashed word counts, unit length) with the Embedder interface."""

    name = "bag-of-words"

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, sum(map(ord, w)) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def similarity(self, query: str, texts: list[str]) -> np.ndarray:
        v = self.embed([query, *texts])
        return v[1:] @ v[0]


def explanations(n: int, explainer: str = "default") -> list[ExplanationRecord]:
    return [
        ExplanationRecord(i, explainer, "rule-client", f"the token {PLANTED[i]}", "", True, None)
        for i in range(n)
    ]


def test_yes_probability_sums_variants() -> None:
    top = {
        " Yes": math.log(0.3),
        "yes": math.log(0.1),
        "YES.": math.log(0.1),
        " No": math.log(0.25),
        "The": -0.1,
    }
    assert yes_probability(top) == pytest.approx(0.5 / 0.75)
    assert yes_probability({"The": -0.1, "A": -2.0}) is None
    assert yes_probability({"no": -0.01}) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"), [("Yes", 1), (" no.", 0), ("YES, it does", 1), ("Maybe", None), ("", None)]
)
def test_parse_yes_no(text: str, expected: int | None) -> None:
    assert parse_yes_no(text) == expected


def test_detection_and_fuzzing_on_synthetic_latents() -> None:
    samples = synthetic_samples(n_latents=3)
    scorers = [DetectionScorer(RuleClient()), FuzzingScorer(RuleClient(), 0.3, seed=0)]
    rows = asyncio.run(score_async(samples, explanations(3), scorers))
    assert len(rows) == 6
    for row in rows:
        m = row.metrics
        assert (m.n_pos, m.n_neg, m.n_failed) == (4, 4, 0)
        assert m.balanced_accuracy == 1.0 and m.auc == 1.0
        assert all(
            p.score is not None and p.score == pytest.approx(0.9 if p.label else 0.2) for p in row.predictions
        )


def test_scored_examples_are_exactly_the_test_sets() -> None:
    samples = synthetic_samples(n_latents=2)
    rows = asyncio.run(score_async(samples, explanations(2), [DetectionScorer(RuleClient())]))
    for row, le in zip(rows, samples.latents):
        ids = [p.example_id for p in row.predictions]
        assert ids == [ex.example_id for ex in (*le.test_pos, *le.test_neg)]
        assert [p.label for p in row.predictions] == [1] * len(le.test_pos) + [0] * len(le.test_neg)
        assert not set(ids) & {ex.example_id for ex in le.train}


def test_wrong_explanation_scores_at_chance_or_below() -> None:
    samples = synthetic_samples(n_latents=2)
    wrong = [replace(e, explanation=f"the token {PLANTED[1 - e.latent]}") for e in explanations(2)]
    rows = asyncio.run(score_async(samples, wrong, [DetectionScorer(RuleClient())]))
    assert all(r.metrics.recall == 0.0 for r in rows)


@pytest.mark.fault
def test_unparseable_judgements_are_counted_not_guessed() -> None:
    samples = synthetic_samples(n_latents=1)
    rows = asyncio.run(
        score_async(samples, explanations(1), [DetectionScorer(RuleClient(judge_text="Maybe"))])
    )
    m = rows[0].metrics
    assert m.n_failed == 8 and m.n_pos == m.n_neg == 0
    assert all(p.pred is None and p.score is None for p in rows[0].predictions)
    assert {p.failure for p in rows[0].predictions} == {"unparseable"}


def test_text_answers_without_logprobs_are_parsed() -> None:
    samples = synthetic_samples(n_latents=1)
    rows = asyncio.run(
        score_async(samples, explanations(1), [DetectionScorer(RuleClient(judge_text="Yes."))])
    )
    m = rows[0].metrics
    assert (m.n_pos, m.n_neg, m.n_failed, m.recall, m.specificity, m.auc) == (4, 4, 0, 1.0, 0.0, None)


@pytest.mark.fault
def test_request_errors_are_failed_judgements() -> None:
    samples = synthetic_samples(n_latents=1)
    rows = asyncio.run(score_async(samples, explanations(1), [DetectionScorer(RuleClient(fail_with="down"))]))
    assert rows[0].metrics.n_failed == 8
    assert {p.failure for p in rows[0].predictions} == {"request"}


class HalfDown(RuleClient):
    """Every third request fails, every third answer is neither yes nor no, the rest are judged by rule."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    async def chat(self, messages: list[dict[str, str]], **kw: Any) -> ChatResponse:
        self.n += 1
        if self.n % 3 == 0:
            raise LLMError("HTTP 503 after 3 tries")
        if self.n % 3 == 1:
            return ChatResponse("Perhaps", 10, 1, 0.0, None, self.model_name)
        return await super().chat(messages, **kw)


@pytest.mark.fault
def test_failed_requests_and_unparseable_answers_are_counted_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    samples = synthetic_samples(n_latents=3)
    cfg = ScoreConfig(scorers=("detection",), shuffled_control=False)
    summary = run_score(samples, explanations(3), cfg, HalfDown(), tmp_path, seed=0)
    data = json.loads((tmp_path / "scores_summary.json").read_text())
    assert (data["failed_requests"], data["unparseable_answers"]) == (8, 8)  # of 24 judgements
    assert sum(r.metrics.n_failed for r in summary.rows) == 16
    assert "8 judgements got no answer from the LLM" in caplog.text and "asks only these" in caplog.text
    assert "8 judgements were answers that are neither yes nor no" in caplog.text


def test_fuzzing_marks() -> None:
    le = synthetic_samples(n_latents=1).latents[0]
    items = fuzz_marks(le, 0.3, seed=0)
    pos = [(ex, marks) for ex, marks, label in items if label == 1]
    neg = [(ex, marks) for ex, marks, label in items if label == 0]
    assert [ex for ex, _ in pos] == list(le.test_pos) and [ex for ex, _ in neg] == list(le.test_neg)
    for ex, marks in pos:  # exactly the firing tokens (all >= 0.3 x max here), i.e. the planted word
        assert marks == [a > 0 for a in ex.acts]
        assert {t for t, m in zip(ex.token_strs, marks) if m} == {" " + PLANTED[0]}
    assert [sum(m) for _, m in neg] == [sum(m) for _, m in pos]  # as many random marks as the positives
    assert items == fuzz_marks(le, 0.3, seed=0)  # seeded
    assert [m for _, m, _ in items] != [m for _, m, _ in fuzz_marks(le, 0.3, seed=1)]
    texts = FuzzingScorer(RuleClient(), 0.3, seed=0).texts(le)
    assert all(f"{PLANTED[0]}>>" in text for _, text, label in texts if label == 1)


def test_fuzzing_threshold_controls_positive_marks() -> None:
    le = synthetic_samples(n_latents=1).latents[0]
    ex = le.test_pos[0]
    strict = fuzz_marks(le, 1.0, 0)[0][1]
    assert strict == [a == ex.max_act for a in ex.acts]


def test_embedding_threshold_ignores_test_labels() -> None:
    samples = synthetic_samples(n_latents=3)
    scorer = EmbeddingScorer(BagOfWords(), samples)
    le = samples.latents[0]
    thr = scorer.threshold(le, "the token Paris")
    own_ids = {ex.example_id for ex in (*le.train, *le.test_pos, *le.test_neg)}
    assert not own_ids & {ex.example_id for ex in scorer.calibration(le)}
    # Swapping this latent's test labels (positives <-> negatives) cannot move the threshold.
    swapped = replace(le, test_pos=le.test_neg, test_neg=le.test_pos)
    assert scorer.threshold(swapped, "the token Paris") == thr
    out = asyncio.run(scorer.score(le, "the token Paris"))
    assert out.threshold == thr
    m = binary_metrics([p.label for p in out.predictions], [p.pred or 0 for p in out.predictions])
    assert m.balanced_accuracy > 0.5


def test_run_score_files_and_summary(tmp_path: Path) -> None:
    samples = synthetic_samples(n_latents=3)
    recs = explanations(3) + explanations(3, "token_stats")
    recs[1] = replace(recs[1], ok=False, explanation=None, error="no explanation")
    cfg = ScoreConfig(scorers=("detection", "fuzzing"))
    summary = run_score(samples, recs, cfg, RuleClient(), tmp_path, seed=0)
    assert summary.failed_explanations == 1
    assert len(summary.rows) == (2 + 3 + 2) * 2  # the failed explanation is not scored; 2 shuffled controls
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 14
    first = rows[0]
    for key in (
        "latent",
        "explainer",
        "scorer",
        "explanation",
        "accuracy",
        "precision",
        "recall",
        "specificity",
    ):
        assert key in first
    for key in ("f1", "balanced_accuracy", "auc", "n_pos", "n_neg", "n_failed", "predictions"):
        assert key in first
    assert set(first["predictions"][0]) == {"example_id", "label", "pred", "score", "quantile", "failure"}
    data = json.loads((tmp_path / "scores_summary.json").read_text())
    assert data["models"] == {"explainer_llm": "rule-client", "judge_llm": "rule-client", "embedding": None}
    assert data["failed_explanations"] == 1
    overall = {(o["explainer"], o["scorer"]): o for o in data["overall"]}
    assert set(overall) == {
        (e, s) for e in ("default", "token_stats", "shuffled") for s in ("detection", "fuzzing")
    }
    det = overall[("default", "detection")]
    assert det["n_latents"] == 2 and det["n_pos"] == 8 and det["balanced_accuracy"] == 1.0
    assert det["macro"]["balanced_accuracy"] == 1.0 and det["macro"]["auc"] == 1.0


def test_micro_and_macro_differ_when_latents_differ(tmp_path: Path) -> None:
    samples = synthetic_samples(n_latents=2)
    recs = explanations(2)
    recs[1] = replace(recs[1], explanation="the token nothing")  # latent 1 never says yes
    summary = run_score(
        samples,
        recs,
        ScoreConfig(scorers=("detection",), shuffled_control=False),
        RuleClient(),
        tmp_path,
        seed=0,
    )
    (overall,) = summary.overall
    assert overall.macro["recall"] == pytest.approx(0.5)
    assert overall.micro.recall == pytest.approx(0.5)
    assert overall.macro["precision"] == pytest.approx(
        0.5
    )  # latent 1 has precision 0 (no positive predictions)
    assert overall.micro.precision == pytest.approx(1.0)


def test_frequency_weighted_f1_and_quantile_recall(tmp_path: Path) -> None:
    """Frequency-weighted F1 = sum freq_l F1_l / sum freq_l (scikit-learn's F1 per latent); per-quantile recall
    pools the positives of each activation quantile over latents."""
    from sklearn.metrics import f1_score

    samples = synthetic_samples(n_latents=3)
    for le, freq in zip(samples.latents, (0.01, 0.2, 0.05)):
        object.__setattr__(le, "frequency", freq)
    recs = explanations(3)
    recs[1] = replace(recs[1], explanation="the token nothing")  # the frequent latent is explained badly
    summary = run_score(
        samples,
        recs,
        ScoreConfig(scorers=("detection",), shuffled_control=False),
        RuleClient(),
        tmp_path,
        seed=0,
    )
    (overall,) = summary.overall
    f1s = [f1_score([p.label for p in r.predictions], [p.pred for p in r.predictions]) for r in summary.rows]
    expected = np.average(f1s, weights=[0.01, 0.2, 0.05])
    assert overall.frequency_weighted_f1 == pytest.approx(expected) and expected < overall.macro["f1"]
    pos = [p for r in summary.rows for p in r.predictions if p.label == 1]
    assert {p.quantile for p in pos} == {
        q for le in samples.latents for q in (ex.quantile for ex in le.test_pos)
    }
    for q, rec in overall.quantile_recall.items():
        assert rec == pytest.approx(np.mean([p.pred for p in pos if p.quantile == q]))
    data = json.loads((tmp_path / "scores_summary.json").read_text())["overall"][0]
    assert data["frequency_weighted_f1"] == pytest.approx(expected) and set(data["quantile_recall"])


def test_shuffled_control_and_paired_comparisons(tmp_path: Path) -> None:
    """Each latent is also scored with another latent's explanation (never its own); the summary compares the
    explainers per latent with paired bootstrap intervals: right explanations beat the shuffled ones."""
    samples = synthetic_samples(n_latents=5)
    recs = explanations(5)
    summary = run_score(samples, recs, ScoreConfig(scorers=("detection",)), RuleClient(), tmp_path, seed=3)
    own = {r.latent: r.explanation for r in recs}
    control = [r for r in summary.rows if r.explainer == "shuffled"]
    assert sorted(r.latent for r in control) == list(range(5))
    assert all(r.explanation != own[r.latent] for r in control)
    assert sorted(r.explanation for r in control) == sorted(own.values())  # every explanation used once
    (cmp,) = [c for c in summary.comparisons if c["metric"] == "balanced_accuracy"]
    assert (cmp["a"], cmp["b"], cmp["n"]) == ("default", "shuffled", 5)
    assert (
        cmp["diff"] == pytest.approx(cmp["mean_a"] - cmp["mean_b"]) and cmp["lo"] <= cmp["diff"] <= cmp["hi"]
    )
    assert cmp["mean_a"] > 0.9 > 0.6 > cmp["mean_b"] and cmp["lo"] > 0  # a difference the latents support
    saved = json.loads((tmp_path / "scores_summary.json").read_text())["comparisons"]
    assert saved == json.loads(json.dumps(summary.comparisons))


@pytest.mark.bad_input
def test_llm_scorer_without_client_is_an_error(tmp_path: Path) -> None:
    from saelab.autointerp.llm.base import LLMError

    with pytest.raises(LLMError, match="needs an LLM client"):
        run_score(
            synthetic_samples(1), explanations(1), ScoreConfig(scorers=("detection",)), None, tmp_path, 0
        )


# ------------------------------------------------------------------------------------------ real, slow


@pytest.mark.slow
def test_minilm_embeddings() -> None:
    from saelab.autointerp.embed import Embedder

    emb = Embedder()
    texts = ["The capital of France is Paris.", "Paris is the French capital.", "Photosynthesis in plants."]
    vecs = emb.embed(texts)
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sims = emb.similarity(texts[0], texts[1:])
    assert sims[0] > 0.8 > 0.3 > sims[1]
    alone = Embedder(batch_size=1).embed(texts)
    assert np.allclose(alone, vecs, atol=1e-5)  # padding in a batch does not change an embedding


@pytest.mark.slow
def test_run_score_with_bundled_model_and_minilm(tmp_path: Path) -> None:
    from saelab.autointerp.llm.local import LocalChatClient
    from saelab.models.loading import BUNDLED_SMOLLM2, load_model

    samples = synthetic_samples(n_latents=2, n_train=4, n_test=3)
    client = LocalChatClient(load_model(BUNDLED_SMOLLM2, device="cpu"))
    summary = run_score(samples, explanations(2), ScoreConfig(), client, tmp_path, seed=0)
    assert {o.scorer for o in summary.overall} == {"detection", "fuzzing", "embedding"}
    for row in summary.rows:
        m = row.metrics
        assert m.n_pos + m.n_neg + m.n_failed == 6
        if row.scorer == "embedding":
            assert row.threshold is not None and m.auc is not None
        assert all(
            p.score is None or 0.0 <= p.score <= 1.0 for p in row.predictions if row.scorer != "embedding"
        )
    assert summary.models["judge_llm"] == BUNDLED_SMOLLM2
