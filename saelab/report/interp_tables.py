"""The tables and plots of a run report's "Explanations and scores" section (`run_report._interp_section`
assembles them): frequency-weighted and per-quantile scores, explainers compared on the same latents, the scoring
sets' class balance, per-latent score distributions, each explainer's tokens and latency, and the per-latent table.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from saelab.autointerp.explain import ExplanationRecord
from saelab.latents.sampling import SampleSet
from saelab.report.doc import Doc, fmt, violins


def latent_weighted(doc: Doc, overall: list[dict[str, Any]]) -> None:
    """Frequency-weighted F1, the simulation correlation and recall per activation quantile (0 = lowest)."""
    if not overall:
        return
    n_q = max((len(o.get("quantile_recall", {})) for o in overall), default=0)
    doc.table(
        [
            "explainer",
            "scorer",
            "frequency-weighted F1",
            "mean correlation",
            *[f"recall q{q}" for q in range(n_q)],
        ],
        [
            [
                o["explainer"],
                o["scorer"],
                o.get("frequency_weighted_f1"),
                o.get("macro", {}).get("correlation"),
                *[o.get("quantile_recall", {}).get(str(q)) for q in range(n_q)],
            ]
            for o in overall
        ],
    )


def explainer_comparisons(doc: Doc, comparisons: list[dict[str, Any]]) -> None:
    """Per-latent differences between explainers (the shuffled control included), paired bootstrap 95% CIs."""
    if not comparisons:
        return
    doc.heading("Explainers compared on the same latents")
    doc.para(
        "Mean per-latent difference a − b with a paired bootstrap 95% interval over latents; `shuffled` scores each "
        "latent with another latent's explanation (chance). Only an interval that excludes 0 calls a difference."
    )

    def verdict(c: dict[str, Any]) -> str:
        return f"{c['a']} higher" if c["lo"] > 0 else f"{c['b']} higher" if c["hi"] < 0 else "not shown"

    doc.table(
        ["scorer", "metric", "a", "b", "mean a", "mean b", "a − b", "95% CI", "latents", "difference"],
        [
            [c["scorer"], c["metric"], c["a"], c["b"], c["mean_a"], c["mean_b"], c["diff"],
             f"[{fmt(c['lo'])}, {fmt(c['hi'])}]", c["n"], verdict(c)]
            for c in comparisons
        ],
    )  # fmt: skip


def class_balance(doc: Doc, rows: list[dict[str, Any]]) -> None:
    """Positives and negatives each scorer judged, and the failed judgements, summed over latents."""
    doc.heading("Scoring sets: class balance and failed judgements")
    table = []
    for key in dict.fromkeys((r["explainer"], r["scorer"]) for r in rows):
        group = [r for r in rows if (r["explainer"], r["scorer"]) == key]
        pos, neg = sum(r["n_pos"] for r in group), sum(r["n_neg"] for r in group)
        shares = [r["n_pos"] / (r["n_pos"] + r["n_neg"]) for r in group if r["n_pos"] + r["n_neg"]]
        table.append(
            [*key, len(group), pos, neg, pos / (pos + neg) if pos + neg else None,
             min(shares, default=None), max(shares, default=None), sum(r["n_failed"] for r in group)]
        )  # fmt: skip
    doc.table(
        ["explainer", "scorer", "latents", "positives", "negatives", "positive share", "min share per latent",
         "max share per latent", "failed judgements"],
        table,
    )  # fmt: skip


def distribution_plot(rows: list[dict[str, Any]]) -> Any:
    """Per-latent balanced accuracy and F1 per (explainer, scorer): violins with the box inside."""
    keys = list(dict.fromkeys((r["explainer"], r["scorer"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(6.5, 1.6 * len(keys) * 2), 3.6), sharey=True)
    for ax, metric in zip(axes, ("balanced_accuracy", "f1")):
        data = [[r[metric] for r in rows if (r["explainer"], r["scorer"]) == k] for k in keys]
        violins(ax, data, [f"{e}\n{s}" for e, s in keys])
        ax.set_title(f"per-latent {metric}", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    axes[0].axhline(0.5, color="gray", linestyle="--", linewidth=1)
    return fig


def explainer_cost(doc: Doc, expl: list[ExplanationRecord]) -> None:
    doc.heading("Explainers: tokens and latency")
    table = []
    for e, model in dict.fromkeys((r.explainer, r.model) for r in expl):
        group = [r for r in expl if (r.explainer, r.model) == (e, model)]
        lat = [r.latency_s for r in group]
        table.append(
            [e, model, len(group), sum(not r.ok for r in group), sum(r.prompt_tokens for r in group),
             sum(r.completion_tokens for r in group), sum(lat), float(np.mean(lat)) if lat else None]
        )  # fmt: skip
    doc.table(
        ["explainer", "model", "explanations", "failed", "prompt tokens", "completion tokens", "latency s (total)",
         "latency s (mean)"],
        table,
    )  # fmt: skip


def score_plot(overall: list[dict[str, Any]]) -> Any:
    scorers = sorted({o["scorer"] for o in overall})
    explainers = sorted({o["explainer"] for o in overall})
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / max(1, len(explainers))
    for i, e in enumerate(explainers):
        vals = [
            next(
                (o["balanced_accuracy"] for o in overall if o["explainer"] == e and o["scorer"] == s), np.nan
            )
            for s in scorers
        ]
        ax.bar(np.arange(len(scorers)) + i * width, vals, width, label=e)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(np.arange(len(scorers)) + width * (len(explainers) - 1) / 2, scorers)
    ax.set_ylim(0, 1)
    ax.set_ylabel("balanced accuracy (pooled)")
    ax.legend(fontsize=8)
    ax.set_title("Scores per explainer: LLM vs token-statistics baseline")
    return fig


def per_latent(
    expl: list[ExplanationRecord], rows: list[dict[str, Any]], samples: SampleSet, doc: Doc
) -> None:
    freq = {le.latent: le.frequency for le in samples.latents}
    by_key = {(r["latent"], r["explainer"], r["scorer"]): r for r in rows}
    scorers = sorted({r["scorer"] for r in rows})
    doc.heading("Per latent")
    table = []
    for e in sorted(expl, key=lambda r: (freq.get(r.latent, 0), r.explainer)):
        text = e.explanation if e.ok else f"FAILED: {e.error}"
        scores = [by_key.get((e.latent, e.explainer, s), {}).get("balanced_accuracy") for s in scorers]
        table.append([e.latent, freq.get(e.latent), e.explainer, text, *scores])
    doc.table(["latent", "frequency", "explainer", "explanation", *[f"{s} bal.acc" for s in scorers]], table)
