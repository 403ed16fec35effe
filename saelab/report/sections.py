"""Sections of `saelab compare` that put models side by side rather than before against after.

- Model against model: every (run, explainer) scored by each scorer on the latents all of them scored, ranked per
  metric and score type; the explainers' token usage and latency; a cost-against-quality plot.
- SAE against SAE: each run's evaluated SAE (and the SAEs of its `eval/matched_l0.json`) in matched-L0 groups, and
  explained variance / CE-loss score against L0 with the Pareto frontier (`report.pareto_plot`).
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from saelab.autointerp.explain import load_run_explanations
from saelab.eval.core import load_run_metrics
from saelab.eval.matched_l0 import MatchedL0, mark_dominated
from saelab.report.doc import Doc, PlotDir, pareto_plot
from saelab.run.manifest import Run

RANK_METRICS = ("balanced_accuracy", "f1", "precision", "recall")


def explainer_costs(names: list[str], runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per "run: explainer": model, explanations, failures, tokens and latency (from explanations.jsonl)."""
    out: dict[str, dict[str, Any]] = {}
    for name, run in zip(names, runs):
        expl = load_run_explanations(run.folder)
        for e in dict.fromkeys(r.explainer for r in expl):
            group = [r for r in expl if r.explainer == e]
            tokens = sum(r.prompt_tokens + r.completion_tokens for r in group)
            out[f"{name}: {e}"] = {
                "model": group[0].model,
                "n": len(group),
                "failed": sum(not r.ok for r in group),
                "tokens": tokens,
                "tokens_per_latent": tokens / len(group),
                "latency_mean_s": float(np.mean([r.latency_s for r in group])),
            }
    return out


def ranking_section(
    doc: Doc, names: list[str], scores: list[dict[Any, dict[int, dict[str, float]]]]
) -> dict[str, dict[str, float]]:
    """Explainers ranked per scorer and metric on the latents all of them scored; returns each one's mean
    balanced accuracy per scorer."""
    doc.heading("Explainers ranked per scorer (latents scored by all)")
    by_scorer: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for name, s in zip(names, scores):
        for (explainer, scorer), latents in s.items():
            by_scorer.setdefault(scorer, {})[f"{name}: {explainer}"] = latents
    quality: dict[str, dict[str, float]] = {}
    for scorer, entries in by_scorer.items():
        common = sorted(set.intersection(*(set(v) for v in entries.values())))
        if not common:
            doc.para(f"{scorer}: no latent was scored for every explainer.")
            continue
        means = {
            k: {m: float(np.mean([v[i][m] for i in common])) for m in RANK_METRICS}
            for k, v in entries.items()
        }
        # competition ranking: ties share the better rank
        ranks = {
            m: {k: 1 + sum(o[m] > v[m] for o in means.values()) for k, v in means.items()}
            for m in RANK_METRICS
        }
        rows = [
            [k, *[x for m in RANK_METRICS for x in (means[k][m], ranks[m][k])]]
            for k in sorted(means, key=lambda k: (ranks["balanced_accuracy"][k], k))
        ]
        doc.para(
            f"Scorer {scorer}: mean over {len(common)} latents scored for all {len(entries)} explainers."
        )
        doc.table(["run: explainer", *[h for m in RANK_METRICS for h in (m, "rank")]], rows)
        for k, v in means.items():
            quality.setdefault(k, {})[scorer] = v["balanced_accuracy"]
    return quality


def cost_section(
    doc: Doc, names: list[str], runs: list[Run], quality: dict[str, dict[str, float]], plots: PlotDir
) -> list[Any]:
    """Token usage and latency per explainer, and the cost-against-quality plot."""
    costs = explainer_costs(names, runs)
    doc.heading("Explainers: token usage and latency")
    doc.table(
        [
            "run: explainer",
            "model",
            "explanations",
            "failed",
            "tokens",
            "tokens per latent",
            "mean latency (s)",
        ],
        [
            [k, c["model"], c["n"], c["failed"], c["tokens"], c["tokens_per_latent"], c["latency_mean_s"]]
            for k, c in costs.items()
        ],
    )
    points = [
        (k, costs[k]["tokens_per_latent"], q)
        for k, qs in quality.items()
        if k in costs
        for q in [float(np.mean(list(qs.values())))]
    ]
    if not points:
        return []
    fig, ax = plt.subplots(figsize=(5.4, 4))
    for k, x, y in points:
        ax.scatter(x, y, s=40)
        ax.annotate(k, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("LLM tokens per explained latent")
    ax.set_ylabel("balanced accuracy (mean over scorers)")
    ax.set_title("Cost against quality per explainer", fontsize=9)
    path = plots.save(fig, "cost_quality.png")
    doc.image(path, f"plots/{path.name}", "cost against quality per explainer")
    return [path]


def sae_entries(names: list[str], runs: list[Run]) -> list[dict[str, Any]]:
    """Each run's evaluated SAE and the SAEs of its eval/matched_l0.json, with L0 and the core metrics."""
    out: list[dict[str, Any]] = []
    for name, run in zip(names, runs):
        if "eval" not in run.stages:
            continue
        run.verify("eval", "eval")
        compared = MatchedL0.load_run(run.folder)
        if compared is not None:
            for e in compared.saes:
                out.append({**e, "name": f"{name}: {e['name']}", "run": name})
            continue
        loaded = load_run_metrics(run.folder)
        if loaded is None:
            continue
        result, source = loaded
        cfg = source.sae_config or {}
        summary = {k: v for k, v in result.to_json().items() if k != "log10_frequency"}
        out.append(
            {
                "name": name,
                "run": name,
                "architecture": cfg.get("architecture"),
                "d_sae": cfg.get("d_sae"),
                **summary,
            }
        )
    return out


def l0_group(l0: float, ratio: float) -> int:
    """Matched-L0 groups: log-spaced bins whose edges are powers of `ratio`."""
    return math.floor(math.log(max(l0, 1e-9), ratio))


def sae_section(doc: Doc, names: list[str], runs: list[Run], plots: PlotDir, ratio: float = 1.5) -> list[Any]:
    """Matched-L0 tables (SAEs whose L0 lies within one factor of `ratio`) and Pareto plots against L0."""
    entries = mark_dominated([e for e in sae_entries(names, runs) if e.get("l0") is not None])
    if len(entries) < 2:
        return []
    doc.heading("SAEs at matched L0")
    data_hashes = {r.data.get("hashes", {}).get("data") for r in runs if "eval" in r.stages}
    doc.para(
        f"SAEs grouped by L0 in bins a factor {ratio:g} wide; best per group in bold (**). "
        + (
            "The runs' held-out data differ (data hashes differ): compare with care."
            if len(data_hashes) > 1
            else ""
        )
    )
    rows = []
    for g in sorted({l0_group(e["l0"], ratio) for e in entries}):
        group = sorted(
            (e for e in entries if l0_group(e["l0"], ratio) == g), key=lambda e: -e["explained_variance"]
        )
        lo, hi = ratio**g, ratio ** (g + 1)
        for i, e in enumerate(group):
            mark = "**" if i == 0 and len(group) > 1 else ""
            rows.append([f"{lo:.3g}–{hi:.3g}", f"{mark}{e['name']}{mark}", e.get("architecture"), e.get("d_sae"), e["l0"],
                         e["explained_variance"], e.get("ce_loss_score"), e.get("kl_score"), e.get("dead_fraction")])  # fmt: skip
    doc.table(
        ["L0 range", "SAE", "architecture", "latents", "L0", "EV", "CE-loss score", "KL score", "dead"], rows
    )
    written = []
    for metric, flag, label in (
        ("explained_variance", "dominated_ev", "explained variance"),
        ("ce_loss_score", "dominated_ce", "CE-loss score"),
    ):
        if all(e.get(metric) is not None for e in entries):
            path = plots.save(pareto_plot(entries, metric, flag, label), f"runs_pareto_{metric}.png")
            doc.image(path, f"plots/{path.name}", f"{label} against L0 over the runs' SAEs")
            written.append(path)
    return written
