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
from saelab.report.doc import Doc, PlotDir, pareto_plot, violins
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
    doc: Doc,
    names: list[str],
    scores: list[dict[Any, dict[int, dict[str, float]]]],
    flags: dict[tuple[str, str], str] | None = None,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Explainers ranked per scorer and metric on the latents all of them scored (by balanced accuracy, the
    class-balance-invariant metric); a "run: explainer" whose judge answered one class is flagged in its row and
    ranked after the others. `flags` maps ("run: explainer", scorer) to the reason. Returns each one's mean balanced
    accuracy per scorer, and the table's rows as records (for the CSV)."""
    flags = flags or {}
    doc.heading("Explainers ranked per scorer (latents scored by all)")
    doc.para(
        "Ranked by balanced accuracy, which a judge cannot raise by answering one class more often (F1 and recall "
        "can); an entry whose judge answered one class for everything is flagged in its row and ranked last."
    )
    by_scorer: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for name, s in zip(names, scores):
        for (explainer, scorer), latents in s.items():
            by_scorer.setdefault(scorer, {})[f"{name}: {explainer}"] = latents
    quality: dict[str, dict[str, float]] = {}
    records: list[dict[str, Any]] = []
    for scorer, entries in by_scorer.items():
        common = sorted(set.intersection(*(set(v) for v in entries.values())))
        if not common:
            doc.para(f"{scorer}: no latent was scored for every explainer.")
            continue
        means = {
            k: {m: float(np.mean([v[i][m] for i in common])) for m in RANK_METRICS}
            for k, v in entries.items()
        }

        # competition ranking (ties share the better rank); flagged entries rank after every unflagged one
        bad = {k: (k, scorer) in flags for k in means}
        ranks = {
            m: {k: 1 + sum(bad[o] < bad[k] or (bad[o] == bad[k] and means[o][m] > means[k][m]) for o in means)
                for k in means}
            for m in RANK_METRICS
        }  # fmt: skip
        order = sorted(means, key=lambda k: (ranks["balanced_accuracy"][k], k))
        rows = [
            [k, *[x for m in RANK_METRICS for x in (means[k][m], ranks[m][k])], flags.get((k, scorer), "")]
            for k in order
        ]
        doc.para(
            f"Scorer {scorer}: mean over {len(common)} latents scored for all {len(entries)} explainers."
        )
        doc.table(["run: explainer", *[h for m in RANK_METRICS for h in (m, "rank")], "flags"], rows)
        for k, v in means.items():
            quality.setdefault(k, {})[scorer] = v["balanced_accuracy"]
        records += [
            {"scorer": scorer, "entry": k, "n_latents": len(common),
             **{f"{m}{suffix}": x for m in RANK_METRICS for suffix, x in (("", means[k][m]), ("_rank", ranks[m][k]))},
             "flag": flags.get((k, scorer), "")}
            for k in order
        ]  # fmt: skip
    return quality, records


def distribution_section(
    doc: Doc, names: list[str], scores: list[dict[Any, dict[int, dict[str, float]]]], plots: PlotDir
) -> list[Any]:
    """Per-latent balanced accuracy of every "run: explainer", one panel per scorer (violins with the box)."""
    scorers = sorted({scorer for s in scores for _, scorer in s})
    if not scorers:
        return []
    doc.heading("Per-latent scores per model")
    fig, axes = plt.subplots(1, len(scorers), figsize=(max(5.0, 3.4 * len(scorers)), 3.8), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        keys = [(n, e) for n, s in zip(names, scores) for (e, sc) in s if sc == scorer]
        data = [
            [v["balanced_accuracy"] for v in dict(zip(names, scores))[n][(e, scorer)].values()]
            for n, e in keys
        ]
        violins(ax, data, [f"{n}\n{e}" for n, e in keys])
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{scorer}: per-latent balanced accuracy", fontsize=9)
    path = plots.save(fig, "model_distributions.png")
    doc.image(path, f"plots/{path.name}", "per-latent balanced accuracy per model and scorer")
    return [path]


def time_section(doc: Doc, names: list[str], runs: list[Run]) -> None:
    """Wall time and LLM tokens of the explain and score stages of every run (from the manifests)."""
    doc.heading("Time and LLM tokens per run")
    rows = []
    for name, run in zip(names, runs):
        for stage in ("explain", "score"):
            st = run.stages.get(stage)
            if st is None:
                continue
            rows.append(
                [name, stage, st.get("model"), st.get("seconds"), st.get("llm_calls"), st.get("llm_cache_hits"),
                 st.get("llm_prompt_tokens"), st.get("llm_completion_tokens")]
            )  # fmt: skip
    doc.table(
        ["run", "stage", "model", "seconds", "LLM calls", "cache hits", "prompt tokens", "completion tokens"],
        rows,
    )


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
