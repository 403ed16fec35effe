"""The score stage: every successful explanation scored by every configured scorer, summarised and written.

Scorers (`saelab.autointerp.scorers`, one module each, looked up by name in its registry) turn an explanation
into predictions on the latent's held-out examples; `run_score` adds the shuffled-explanation control, turns the
predictions into per-latent metrics and the summary over latents (`saelab.autointerp.results`), and writes
`scores.jsonl` (one row per (latent, explainer, scorer) with the metrics and the per-example predictions) and
`scores_summary.json` (micro and macro metrics, failure counts, paired differences between explainers) in the
score folder. Read them back with `results.load_scores`. Run it through `saelab score --run-dir RUN`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from saelab.autointerp.explain import ExplanationRecord
from saelab.autointerp.llm.base import LLMClient, gather_with_progress, run_sync
from saelab.autointerp.results import (
    ScoreRow,
    ScoreSummary,
    paired_explainer_deltas,
    row_metrics,
    shuffled_explanations,
    summarise,
    write_scores,
)
from saelab.autointerp.scorers import llm_scorers, make_scorers
from saelab.autointerp.scorers.base import Scorer
from saelab.config import ScoreConfig
from saelab.latents.sampling import SampleSet

log = logging.getLogger(__name__)


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
    """Score the explanations (and, with `cfg.shuffled_control`, the shuffled control) and write `SCORES_FILE`
    and `SUMMARY_FILE` under `out_dir`."""
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
            if client is not None and any(name in llm_scorers() for name in cfg.scorers)
            else None,
            "embedding": "all-MiniLM-L6-v2" if "embedding" in cfg.scorers else None,
        },
        comparisons=paired_explainer_deltas(rows, seed),
    )
    failures = summary.failures()
    if failures["failed_requests"]:
        log.warning(
            "%d judgements got no answer from the LLM (request errors); they are excluded and counted, and "
            "running the stage again asks only these and any unusable answers again (the usable answers are "
            "cached)",
            failures["failed_requests"],
        )
    if failures["unparseable_answers"]:
        log.warning(
            "%d judgements were answers that are neither yes nor no (simulation: no activation lines); excluded "
            "from the metrics and counted; such answers are not reused from the LLM answer cache, so running the "
            "stage again asks for these again",
            failures["unparseable_answers"],
        )
    write_scores(summary, out_dir)
    return summary
