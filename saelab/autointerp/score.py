"""Scorers: each explanation is used as a binary classifier of its latent's held-out examples.

Labels: `test_pos` examples (the latent fires) are 1, `test_neg` examples (it never fires) are 0; explainer
(`train`) examples are never scored.

- `detection`: the judge LLM reads the explanation and one example and answers Yes or No to "does the text match
  the description?".
- `fuzzing` (Delphi): positives are activating examples with the tokens at >= `fuzz_threshold` x the example's max
  marked `<<like this>>`; negatives are non-activating examples with as many random tokens marked (seeded). The
  judge answers whether the marked tokens are what the description describes.
- `embedding`: MiniLM cosine similarity of explanation and example text is the score. The Yes/No threshold must not
  see the test labels: it is the midpoint between the mean similarity to the latent's own `train` examples and
  the mean similarity to a calibration set of random non-activating text, namely the *other* latents' `test_neg`
  examples (random windows; any that are scoring examples of this latent are dropped). With no other latent, the
  calibration mean is taken as 0 (MiniLM's similarity to unrelated text is near 0).

Judges are asked for one token with its top log-probabilities (one forward on the local backend, no generation):
P(yes) = p(yes-like tokens) / (p(yes-like) + p(no-like)), predicted 1 when > 0.5, and the AUC is computed from it.
A backend without log-probabilities is read from the answer's text (no AUC then). An answer that is neither yes
nor no, or a failed request, is a failed judgement: excluded from the metrics and counted (`n_failed`). Prompts
put the instructions, then the explanation, then the example, so the local backend runs the shared parts once.

Outputs (`run_score`): `scores.jsonl`, one row per (latent, explainer, scorer) with the metrics and the per-example
predictions, and `scores_summary.json` with micro (pooled over latents) and macro (mean over latents) metrics.
Run it through `saelab score --run-dir RUN`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from saelab.autointerp.explain import ExplanationRecord, quote_example, render_tokens
from saelab.autointerp.llm.base import LLMClient, LLMError, gather_with_progress, run_sync
from saelab.autointerp.prompts import DETECTION_USER, FUZZING_USER, JUDGE_SYSTEM
from saelab.config import ScoreConfig
from saelab.latents.sampling import Example, LatentExamples, SampleSet
from saelab.metrics import BinaryMetrics, binary_metrics, macro_mean, paired_bootstrap
from saelab.run import atomic

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- settings

LLM_SCORERS = ("detection", "fuzzing", "simulation")
"""Scorers that need the judge LLM."""
TOP_LOGPROBS = 20
"""Alternatives asked for the judge's first token (OpenAI's maximum)."""


def judge_messages(template: str, explanation: str, text: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": template.format(explanation=explanation, quoted=quote_example(text))},
    ]


def _word(token: str) -> str:
    return token.strip().strip(".,!:;\"'*").lower()


def yes_probability(top_logprobs: dict[str, float]) -> float | None:
    """P(yes) / (P(yes) + P(no)) summed over case and space variants; None when neither is among the tokens."""
    p_yes = sum(math.exp(lp) for tok, lp in top_logprobs.items() if _word(tok) == "yes")
    p_no = sum(math.exp(lp) for tok, lp in top_logprobs.items() if _word(tok) == "no")
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else None


def parse_yes_no(text: str) -> int | None:
    """1 for an answer starting with yes, 0 for no, None otherwise."""
    words = text.split()
    first = _word(words[0]) if words else ""
    return {"yes": 1, "no": 0}.get(first)


# ------------------------------------------------------------------------------------------------- scorers


Failure = Literal["request", "unparseable"]


@dataclass(frozen=True)
class Prediction:
    """One scored example."""

    example_id: str
    label: int
    pred: int | None
    """Predicted label; None for a failed judgement."""
    score: float | None
    """P(yes) (LLM judges) or cosine similarity (embedding); None when unavailable."""
    quantile: int = -1
    """Activation quantile of a positive example (0 = lowest, see `Example.quantile`); -1 for negatives."""
    failure: Failure | None = None
    """Why the judgement failed: `request` (no answer from the LLM; asked again on a rerun) or `unparseable` (an
    answer that is not a judgement; cached, so a rerun gets the same)."""


@dataclass(frozen=True)
class ScorerOutput:
    predictions: list[Prediction]
    threshold: float | None = None
    """Decision threshold on the score (embedding scorer)."""
    extra: dict[str, float | None] = field(default_factory=dict)
    """Scorer-specific per-latent scores (simulation: `correlation`)."""


class Scorer(Protocol):
    name: str

    async def score(self, le: LatentExamples, explanation: str) -> ScorerOutput: ...


def scoring_examples(le: LatentExamples) -> list[tuple[Example, int]]:
    return [(ex, 1) for ex in le.test_pos] + [(ex, 0) for ex in le.test_neg]


def quantiles_of(le: LatentExamples) -> dict[str, int]:
    """Activation quantile by example id of the latent's positive scoring examples."""
    return {ex.example_id: ex.quantile for ex in le.test_pos}


def plain_text(ex: Example) -> str:
    return render_tokens(ex.token_strs, [False] * len(ex.token_strs))


class JudgeScorer:
    """Asks the judge LLM one Yes/No question per example (shared by detection and fuzzing)."""

    name = "judge"
    template = DETECTION_USER

    def __init__(self, client: LLMClient) -> None:
        self.client = client

    def texts(self, le: LatentExamples) -> list[tuple[str, str, int]]:
        """(example_id, text shown to the judge, label) per scoring example."""
        return [(ex.example_id, plain_text(ex), label) for ex, label in scoring_examples(le)]

    async def score(self, le: LatentExamples, explanation: str) -> ScorerOutput:
        items = self.texts(le)
        judged = await asyncio.gather(*(self.judge(explanation, text) for _, text, _ in items))
        q = quantiles_of(le)
        return ScorerOutput(
            [
                Prediction(eid, label, p, s, q.get(eid, -1), failure)
                for (eid, _, label), (p, s, failure) in zip(items, judged)
            ]
        )

    async def judge(self, explanation: str, text: str) -> tuple[int | None, float | None, Failure | None]:
        """(prediction, P(yes), None), or (None, None, why) for a failed judgement."""
        try:
            resp = await self.client.chat(
                judge_messages(self.template, explanation, text), max_tokens=1, logprobs=TOP_LOGPROBS
            )
        except LLMError as err:
            log.debug("judgement failed: %s", err)
            return None, None, "request"
        if resp.top_logprobs is not None:
            p = yes_probability(resp.top_logprobs)
            return (None, None, "unparseable") if p is None else (int(p > 0.5), p, None)
        pred = parse_yes_no(resp.text)
        return pred, None, None if pred is not None else "unparseable"


class DetectionScorer(JudgeScorer):
    name = "detection"
    template = DETECTION_USER


class FuzzingScorer(JudgeScorer):
    name = "fuzzing"
    template = FUZZING_USER

    def __init__(self, client: LLMClient, fuzz_threshold: float, seed: int) -> None:
        super().__init__(client)
        self.fuzz_threshold = fuzz_threshold
        self.seed = seed

    def texts(self, le: LatentExamples) -> list[tuple[str, str, int]]:
        marked = fuzz_marks(le, self.fuzz_threshold, self.seed)
        return [(ex.example_id, render_tokens(ex.token_strs, marks), label) for ex, marks, label in marked]


def fuzz_marks(le: LatentExamples, threshold: float, seed: int) -> list[tuple[Example, list[bool], int]]:
    """(example, marked positions, label): positives mark tokens at >= `threshold` x their max; negatives mark
    as many random tokens as a positive does (cycling through the positives' counts), drawn with a generator
    seeded by `seed` and the latent."""
    out: list[tuple[Example, list[bool], int]] = []
    counts: list[int] = []
    for ex in le.test_pos:
        marks = [a >= threshold * ex.max_act for a in ex.acts]
        counts.append(sum(marks))
        out.append((ex, marks, 1))
    rng = np.random.default_rng([seed, le.latent])
    for i, ex in enumerate(le.test_neg):
        n = min(counts[i % len(counts)] if counts else 1, len(ex.acts))
        chosen = set(rng.choice(len(ex.acts), size=n, replace=False).tolist())
        out.append((ex, [j in chosen for j in range(len(ex.acts))], 0))
    return out


class EmbeddingScorer:
    """Cosine similarity of explanation and example (see module docstring for the label-free threshold)."""

    name = "embedding"

    def __init__(self, embedder: Any, samples: SampleSet) -> None:
        self.embedder = embedder
        self.samples = samples
        texts = {plain_text(ex) for le in samples.latents for ex in (*le.train, *le.test_pos, *le.test_neg)}
        embedder.embed(sorted(texts))  # one batched pass; later calls hit the cache

    def calibration(self, le: LatentExamples) -> list[Example]:
        """Other latents' non-activating examples that are not among this latent's examples."""
        own = {ex.example_id for ex in (*le.train, *le.test_pos, *le.test_neg)}
        seen: set[str] = set()
        out = []
        for other in self.samples.latents:
            if other.latent == le.latent:
                continue
            for ex in other.test_neg:
                if ex.example_id not in own and ex.example_id not in seen:
                    seen.add(ex.example_id)
                    out.append(ex)
        return out

    def threshold(self, le: LatentExamples, explanation: str) -> float:
        sim_train = self.embedder.similarity(explanation, [plain_text(ex) for ex in le.train])
        calib = self.calibration(le)
        sim_calib = (
            self.embedder.similarity(explanation, [plain_text(ex) for ex in calib]) if calib else [0.0]
        )
        return float((np.mean(sim_train) + np.mean(sim_calib)) / 2)

    async def score(self, le: LatentExamples, explanation: str) -> ScorerOutput:
        items = scoring_examples(le)
        sims = self.embedder.similarity(explanation, [plain_text(ex) for ex, _ in items])
        thr = self.threshold(le, explanation)
        preds = [
            Prediction(ex.example_id, label, int(s > thr), float(s), ex.quantile if label else -1)
            for (ex, label), s in zip(items, sims)
        ]
        return ScorerOutput(preds, thr)


# ------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ScoreRow:
    """One (latent, explainer, scorer): metrics and per-example predictions (one line of scores.jsonl)."""

    latent: int
    explainer: str
    scorer: str
    explanation: str
    metrics: BinaryMetrics
    threshold: float | None
    predictions: list[Prediction]
    extra: dict[str, float | None] = field(default_factory=dict)
    """Scorer-specific scores (see `ScorerOutput.extra`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "latent": self.latent,
            "explainer": self.explainer,
            "scorer": self.scorer,
            "explanation": self.explanation,
            **self.metrics.to_dict(),
            **self.extra,
            "threshold": self.threshold,
            "predictions": [asdict(p) for p in self.predictions],
        }


@dataclass(frozen=True)
class OverallScore:
    """Metrics of one (explainer, scorer) over all latents."""

    explainer: str
    scorer: str
    micro: BinaryMetrics
    """All judged examples of all latents pooled."""
    macro: dict[str, float | None]
    """Mean of each latent's metric."""
    n_latents: int
    frequency_weighted_f1: float | None
    """Each latent's F1 weighted by its firing frequency (None when no latent fires)."""
    quantile_recall: dict[int, float]
    """Recall of the positive examples of each activation quantile (0 = lowest), pooled over latents."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "explainer": self.explainer,
            "scorer": self.scorer,
            **self.micro.to_dict(),
            "n_latents": self.n_latents,
            "macro": self.macro,
            "frequency_weighted_f1": self.frequency_weighted_f1,
            "quantile_recall": {str(q): r for q, r in self.quantile_recall.items()},
        }


@dataclass(frozen=True)
class ScoreSummary:
    rows: list[ScoreRow]
    overall: list[OverallScore]
    failed_explanations: int
    """Explanations not scored because the explainer failed."""
    models: dict[str, str | None]
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    """Explainers compared per latent (see `compare_explainers`)."""

    def failures(self) -> dict[str, int]:
        """Failed judgements by kind: `failed_requests` (asked again on a rerun) and `unparseable_answers`."""
        kinds = Counter(p.failure for r in self.rows for p in r.predictions if p.failure)
        return {"failed_requests": kinds["request"], "unparseable_answers": kinds["unparseable"]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "overall": [o.to_dict() for o in self.overall],
            "failed_explanations": self.failed_explanations,
            **self.failures(),
            "comparisons": self.comparisons,
        }


def row_metrics(preds: Sequence[Prediction]) -> BinaryMetrics:
    judged = [p for p in preds if p.pred is not None]
    scores = [p.score for p in judged]
    has_scores = bool(judged) and all(s is not None for s in scores)
    return binary_metrics(
        [p.label for p in judged],
        [p.pred for p in judged if p.pred is not None],
        [float(s) for s in scores if s is not None] if has_scores else None,
        n_failed=len(preds) - len(judged),
    )


def frequency_weighted_f1(rows: Sequence[ScoreRow], frequency: dict[int, float]) -> float | None:
    """sum_l freq_l F1_l / sum_l freq_l over the rows' latents (METRICS.md: frequency-weighted F1)."""
    w = np.array([frequency[r.latent] for r in rows], dtype=np.float64)
    if w.sum() <= 0:
        return None
    return float(np.dot(w, [r.metrics.f1 for r in rows]) / w.sum())


def quantile_recall(preds: Sequence[Prediction]) -> dict[int, float]:
    """Recall per activation quantile of the judged positive examples (a quantile with none judged is left out)."""
    out: dict[int, float] = {}
    for q in sorted({p.quantile for p in preds if p.label == 1 and p.quantile >= 0}):
        judged = [p.pred for p in preds if p.label == 1 and p.quantile == q and p.pred is not None]
        if judged:
            out[q] = float(np.mean(judged))
    return out


def _macro_extra(rows: Sequence[ScoreRow]) -> dict[str, float | None]:
    """Mean over latents of each scorer-specific score (latents where it is undefined left out)."""
    out: dict[str, float | None] = {}
    for key in dict.fromkeys(k for r in rows for k in r.extra):
        values = [v for r in rows if (v := r.extra.get(key)) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def summarise(rows: Sequence[ScoreRow], frequency: dict[int, float]) -> list[OverallScore]:
    """Micro, macro and frequency-weighted metrics and per-quantile recall of each (explainer, scorer);
    `frequency` is each latent's firing frequency."""
    keys = list(dict.fromkeys((r.explainer, r.scorer) for r in rows))
    out = []
    for explainer, scorer in keys:
        group = [r for r in rows if (r.explainer, r.scorer) == (explainer, scorer)]
        pooled = [p for r in group for p in r.predictions]
        out.append(
            OverallScore(
                explainer,
                scorer,
                row_metrics(pooled),
                macro_mean([r.metrics for r in group]) | _macro_extra(group),
                len(group),
                frequency_weighted_f1(group, frequency),
                quantile_recall(pooled),
            )
        )
    return out


# ------------------------------------------------------------------------------------- controls, comparisons

SHUFFLED = "shuffled"
COMPARED_METRICS = ("f1", "balanced_accuracy", "auc", "correlation")


def shuffled_explanations(explanations: Sequence[ExplanationRecord], seed: int) -> list[ExplanationRecord]:
    """The first explainer's successful explanations moved to other latents by a seeded derangement (no latent
    keeps its own), as explainer `shuffled`; empty when fewer than two latents have one."""
    ok = [r for r in explanations if r.ok and r.explanation]
    if not ok:
        return []
    first = [r for r in ok if r.explainer == ok[0].explainer]
    if len(first) < 2:
        log.warning("shuffled control skipped: it needs explanations of at least two latents")
        return []
    order = np.random.default_rng([seed, 7]).permutation(len(first))
    donor = {
        int(order[i]): int(order[(i + 1) % len(order)]) for i in range(len(order))
    }  # a cycle: no fixed point
    return [
        ExplanationRecord(
            r.latent, SHUFFLED, first[donor[i]].model, first[donor[i]].explanation,
            f"explanation of latent {first[donor[i]].latent} ({r.explainer})", True, None,
        )
        for i, r in enumerate(first)
    ]  # fmt: skip


def _metric(row: ScoreRow, name: str) -> float | None:
    value = row.extra.get(name) if name in row.extra else getattr(row.metrics, name, None)
    return None if value is None else float(value)


def compare_explainers(rows: Sequence[ScoreRow], seed: int) -> list[dict[str, Any]]:
    """For each scorer, metric and pair of explainers (in the order they appear): the mean per-latent difference
    over the latents both scored, with a paired bootstrap 95% interval (`metrics.paired_bootstrap`)."""
    out: list[dict[str, Any]] = []
    by_key = {(r.scorer, r.explainer, r.latent): r for r in rows}
    for scorer in dict.fromkeys(r.scorer for r in rows):
        explainers = list(dict.fromkeys(r.explainer for r in rows if r.scorer == scorer))
        for i, a in enumerate(explainers):
            for b in explainers[i + 1 :]:
                for name in COMPARED_METRICS:
                    pairs = [
                        (va, vb)
                        for (sc, ex, lat), row in by_key.items()
                        if sc == scorer and ex == a and (other := by_key.get((scorer, b, lat))) is not None
                        if (va := _metric(row, name)) is not None and (vb := _metric(other, name)) is not None
                    ]
                    if not pairs:
                        continue
                    d = paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs], seed=seed)
                    out.append({"scorer": scorer, "metric": name, "a": a, "b": b, **d._asdict()})
    return out


# ------------------------------------------------------------------------------------------------- running


def make_scorers(cfg: ScoreConfig, client: LLMClient | None, samples: SampleSet, seed: int) -> list[Scorer]:
    scorers: list[Scorer] = []
    for name in cfg.scorers:
        if name in LLM_SCORERS and client is None:
            raise LLMError(
                f"the {name} scorer needs an LLM client; configure --llm or use the embedding scorer"
            )
        if name == "detection":
            assert client is not None
            scorers.append(DetectionScorer(client))
        elif name == "fuzzing":
            assert client is not None
            scorers.append(FuzzingScorer(client, cfg.fuzz_threshold, seed))
        elif name == "simulation":
            from saelab.autointerp.simulation import SimulationScorer

            assert client is not None
            scorers.append(SimulationScorer(client))
        elif name == "embedding":
            from saelab.autointerp.embed import Embedder

            scorers.append(EmbeddingScorer(Embedder(), samples))
    return scorers


async def score_async(
    samples: SampleSet, explanations: Sequence[ExplanationRecord], scorers: Sequence[Scorer]
) -> list[ScoreRow]:
    """Score every successful explanation with every scorer; rows ordered by explainer (as they first appear),
    scorer, latent."""
    by_latent = {le.latent: le for le in samples.latents}
    unknown = sorted({r.latent for r in explanations} - set(by_latent))
    if unknown:
        raise ValueError(
            f"explanations of latents {unknown[:5]} that the sample set does not hold; re-run explain"
        )
    jobs = [
        (rec.latent, rec.explainer, rec.explanation, scorer)
        for rec in explanations
        if rec.ok and rec.explanation
        for scorer in scorers
    ]
    rank = {name: i for i, name in enumerate(dict.fromkeys(rec.explainer for rec in explanations))}
    jobs.sort(key=lambda j: (rank[j[1]], j[3].name, j[0]))
    outputs = await gather_with_progress((s.score(by_latent[lat], e) for lat, _, e, s in jobs), desc="score")
    return [
        ScoreRow(lat, explainer, s.name, e, row_metrics(o.predictions), o.threshold, o.predictions, o.extra)
        for (lat, explainer, e, s), o in zip(jobs, outputs)
    ]


def run_score(
    samples: SampleSet,
    explanations: list[ExplanationRecord],
    cfg: ScoreConfig,
    client: LLMClient | None,
    out_dir: Path,
    seed: int,
) -> ScoreSummary:
    """Score the explanations and write `scores.jsonl` and `scores_summary.json` under `out_dir`."""
    scorers = make_scorers(cfg, client, samples, seed)
    control = shuffled_explanations(explanations, seed) if cfg.shuffled_control else []
    rows = run_sync(score_async(samples, [*explanations, *control], scorers), client)
    failed = sum(not r.ok for r in explanations)
    llm_models = sorted({r.model for r in explanations if r.ok and r.model != "none"})
    summary = ScoreSummary(
        rows=rows,
        overall=summarise(rows, {le.latent: le.frequency for le in samples.latents}),
        failed_explanations=failed,
        models={
            "explainer_llm": ", ".join(llm_models) or None,
            "judge_llm": client.model_name
            if client is not None and any(s.name != "embedding" for s in scorers)
            else None,
            "embedding": "all-MiniLM-L6-v2" if "embedding" in cfg.scorers else None,
        },
        comparisons=compare_explainers(rows, seed),
    )
    failures = summary.failures()
    if failures["failed_requests"]:
        log.warning(
            "%d judgements got no answer from the LLM (request errors); they are excluded and counted, and "
            "running the stage again asks only these (the answers it has are cached)",
            failures["failed_requests"],
        )
    if failures["unparseable_answers"]:
        log.warning(
            "%d judgements were answers that are neither yes nor no; excluded from the metrics and counted",
            failures["unparseable_answers"],
        )
    write_scores(summary, out_dir)
    return summary


def write_scores(summary: ScoreSummary, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_dir / "scores.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in summary.rows))
    atomic.write_text(out_dir / "scores_summary.json", json.dumps(summary.to_dict(), indent=2) + "\n")
