"""`saelab compare RUN_A RUN_B [...]`: before/after comparison of runs' explanation scores.

The first run is the baseline; every later run is compared with it on the latents both runs scored, per
(explainer, scorer): overall deltas of F1, precision, recall and balanced accuracy (mean over latents) with % change
and a paired bootstrap CI over latents, so that noise is not called progress; success rates (share of latents with
F1 above 0.3/0.4/0.5/0.7) with their CIs; mean/std/range per run; the latents that improved or declined; and which
parameters changed between the runs (config, seed, code version, model hashes). The score artifacts are verified
against each run's manifest first: an altered one is refused by name.

    saelab compare runs/before runs/after --out runs/compare --compare.n-boot 2000
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from saelab.autointerp.results import OverallScore, load_run_overall, load_run_scores
from saelab.config import CompareConfig, ReportConfig
from saelab.metrics import paired_bootstrap_delta
from saelab.report.doc import Doc, PlotDir, flags_section, write_documents
from saelab.report.flags import Flag, TargetGap
from saelab.report.run_report import run_flags
from saelab.report.sections import (
    cost_section,
    distribution_section,
    ranking_section,
    sae_section,
    time_section,
)
from saelab.run import atomic
from saelab.run.manifest import Run, RunError

COMPARISON = "compare.json"
RANKING_CSV = "ranking.csv"
"""The comparison's numbers and its ranking table as CSV, beside its report.md and report.html."""
METRICS = ("balanced_accuracy", "f1", "precision", "recall")
DECIDING = "balanced_accuracy"
"""The metric whose interval decides a comparison's verdict: balanced accuracy is invariant to the share of positive
examples, so a judge that moves its answers towards "yes" cannot pass for a better explainer (F1 and recall can)."""
Key = tuple[str, str]
"""(explainer, scorer)."""


@dataclass(frozen=True)
class Delta:
    """One metric of one (explainer, scorer): baseline, new, difference and its paired bootstrap CI."""

    explainer: str
    scorer: str
    metric: str
    before: float
    after: float
    delta: float
    pct_change: float | None
    """(after − before) / before in %; None when before is 0."""
    lo: float
    hi: float
    n_latents: int
    not_comparable: str | None = None
    """Why the two sides cannot be compared (a one-class judge, too many failed judgements), or None."""

    @property
    def verdict(self) -> str:
        if self.not_comparable:
            return f"not comparable ({self.not_comparable})"
        if self.lo > 0:
            return "improved"
        if self.hi < 0:
            return "declined"
        return "no significant change"


def load_latent_scores(run: Run) -> dict[Key, dict[int, dict[str, float]]]:
    """Per (explainer, scorer), each latent's metrics, after checking the score artifacts' hashes."""
    run.verify("score", "score")
    out: dict[Key, dict[int, dict[str, float]]] = {}
    scores = load_run_scores(run.folder)
    for r in (row.to_dict() for row in (scores.rows if scores is not None else [])):
        out.setdefault((r["explainer"], r["scorer"]), {})[r["latent"]] = {m: r[m] for m in METRICS}
    return out


def why_not_comparable(overall: OverallScore, tolerance: float, max_failed_share: float) -> str | None:
    """Why one run's pooled scores of an (explainer, scorer) cannot stand in a comparison, or None: its judge
    answered one class for (almost) every example, or left more than `max_failed_share` of its judgements failed."""
    m = overall.micro
    if m.n_pos and m.n_neg and (m.recall <= tolerance or m.specificity <= tolerance):
        return f"answers {'negative' if m.recall <= tolerance else 'positive'} for everything"
    total = m.n_pos + m.n_neg + m.n_failed
    if total and m.n_failed / total > max_failed_share:
        return f"left {m.n_failed / total:.0%} of its judgements failed or unparsed"
    return None


def degenerate_sides(run: Run, report_cfg: ReportConfig, cfg: CompareConfig) -> dict[Key, str]:
    """(explainer, scorer) -> why the run's scores of it cannot be compared, for those that cannot."""
    out = {}
    for o in load_run_overall(run.folder) or []:
        why = why_not_comparable(o, report_cfg.one_class_tolerance, cfg.max_failed_share)
        if why:
            out[(o.explainer, o.scorer)] = why
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_parameters(a: Run, b: Run) -> list[tuple[str, Any, Any]]:
    """Config fields, seed, code version and hashes that differ between two runs' manifests."""
    keys = ("config", "seed", "saelab_version", "git_commit", "hashes", "packages")
    fa = _flatten({k: a.data.get(k) for k in keys})
    fb = _flatten({k: b.data.get(k) for k in keys})
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _pct(before: float, after: float) -> float | None:
    return 100.0 * (after - before) / before if before else None


def deltas(
    before: dict[int, dict[str, float]],
    after: dict[int, dict[str, float]],
    key: Key,
    cfg: CompareConfig,
    not_comparable: str | None = None,
) -> list[Delta]:
    """Mean-over-latents delta of every metric on the latents both runs scored."""
    common = sorted(set(before) & set(after))
    if not common:
        return []
    out = []
    for m in METRICS:
        a = np.array([before[i][m] for i in common])
        b = np.array([after[i][m] for i in common])
        d, lo, hi = paired_bootstrap_delta(a, b, n_boot=cfg.n_boot, alpha=cfg.alpha, seed=cfg.seed)
        out.append(
            Delta(
                *key,
                m,
                float(a.mean()),
                float(b.mean()),
                d,
                _pct(a.mean(), b.mean()),
                lo,
                hi,
                len(common),
                not_comparable,
            )
        )
    return out


def _share_above(t: float) -> Callable[[np.ndarray], np.ndarray]:
    def share(x: np.ndarray) -> np.ndarray:
        return np.asarray((x > t).mean(axis=-1))

    return share


def success_rates(
    before: dict[int, dict[str, float]], after: dict[int, dict[str, float]], cfg: CompareConfig
) -> list[list[Any]]:
    """Rows (threshold, share before, share after, delta, CI low, CI high) of the share of latents with F1 > t."""
    common = sorted(set(before) & set(after))
    a = np.array([before[i]["f1"] for i in common])
    b = np.array([after[i]["f1"] for i in common])
    rows = []
    for t in cfg.thresholds:
        d, lo, hi = paired_bootstrap_delta(
            a, b, _share_above(t), n_boot=cfg.n_boot, alpha=cfg.alpha, seed=cfg.seed
        )
        rows.append([f"F1 > {t:g}", float((a > t).mean()), float((b > t).mean()), d, lo, hi])
    return rows


def spread(name: str, key: Key, scores: dict[int, dict[str, float]]) -> list[list[Any]]:
    rows = []
    for m in METRICS:
        v = np.array([s[m] for s in scores.values()])
        rows.append([name, f"{key[0]} / {key[1]}", m, len(v), v.mean(), v.std(), v.min(), v.max()])
    return rows


def write_compare(folders: list[Path], out: Path, cfg: CompareConfig, report_cfg: ReportConfig) -> list[Path]:
    """report.md, report.html, compare.json, ranking.csv and plots/ under `out`; returns the paths written."""
    if len(folders) < 2:
        raise RunError("saelab compare needs at least two run folders (the first is the baseline)")
    runs = [Run.open(f) for f in folders]
    scores = [load_latent_scores(r) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    plots = PlotDir(out / "plots", report_cfg.pdf)
    names = _names(folders)
    doc = Doc(f"saelab compare: {' vs '.join(names)}")
    doc.para(
        f"Baseline: {names[0]}. Deltas are means over the latents both runs scored, with {1 - cfg.alpha:.0%} "
        f"paired bootstrap intervals over latents ({cfg.n_boot} resamples); a change counts only when its interval "
        "excludes 0."
    )
    _latent_sets(doc, names, scores)
    written: list[Path] = []
    record: dict[str, Any] = {"baseline": str(folders[0]), "comparisons": []}
    for j in range(1, len(runs)):
        degenerate = (degenerate_sides(runs[0], report_cfg, cfg), degenerate_sides(runs[j], report_cfg, cfg))
        rec, paths = _pair_section(
            doc, (names[0], names[j]), (runs[0], runs[j]), (scores[0], scores[j]), plots, cfg, degenerate
        )
        record["comparisons"].append(rec)
        written += paths
    _spread_section(doc, names, scores)
    sides = [degenerate_sides(r, report_cfg, cfg) for r in runs]
    flagged = {(f"{n}: {e}", sc): why for n, d in zip(names, sides) for (e, sc), why in d.items()}
    quality, ranking = ranking_section(doc, names, scores, flagged)
    written += distribution_section(doc, names, scores, plots)
    written += cost_section(doc, names, runs, quality, plots)
    time_section(doc, names, runs)
    written += sae_section(doc, names, runs, plots)
    flags: list[Flag] = []
    gaps: list[TargetGap] = []
    for name, run in zip(names, runs):
        f, g = run_flags(run, report_cfg)
        flags += [Flag(x.kind, f"{name}: {x.subject}", x.message) for x in f]
        gaps += [g_._replace(subject=f"{name}: {g_.subject}") for g_ in g]
    flags_section(doc, flags, gaps)
    atomic.write_json(out / COMPARISON, record)
    atomic.write_text(out / RANKING_CSV, _csv(ranking))
    return [*write_documents(doc, out), out / COMPARISON, out / RANKING_CSV, *written]


def _csv(rows: list[dict[str, Any]]) -> str:
    """The ranking as CSV, one row per (scorer, run: explainer)."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def _latent_sets(doc: Doc, names: list[str], scores: list[dict[Key, dict[int, dict[str, float]]]]) -> None:
    """Say first when the runs studied different latents: the deltas then rest on the latents they share."""
    sets = [set().union(*(set(v) for v in s.values())) if s else set() for s in scores]
    differ = [(n, s) for n, s in zip(names[1:], sets[1:]) if s != sets[0]]
    if not differ:
        doc.para(f"All runs scored the same {len(sets[0])} latents.")
        return
    doc.para(
        "The runs studied different latents: "
        + "; ".join(
            f"{n} scored {len(s)} latents, {len(s & sets[0])} of them among the {len(sets[0])} of {names[0]}"
            for n, s in differ
        )
        + ". Every delta below uses only the latents both runs of a pair scored; for a like-for-like comparison "
        "sample the later run on the first run's latents (`saelab sample --sample.latents-from RUN`)."
    )


def _names(folders: list[Path]) -> list[str]:
    names = [f.name for f in folders]
    return names if len(set(names)) == len(names) else [str(f) for f in folders]


def _pair_section(
    doc: Doc,
    names: tuple[str, str],
    runs: tuple[Run, Run],
    scores: tuple[dict[Key, dict[int, dict[str, float]]], dict[Key, dict[int, dict[str, float]]]],
    plots: PlotDir,
    cfg: CompareConfig,
    degenerate: tuple[dict[Key, str], dict[Key, str]] = ({}, {}),
) -> tuple[dict[str, Any], list[Path]]:
    a_name, b_name = names
    doc.heading(f"{b_name} against {a_name}")
    changed = changed_parameters(*runs)
    doc.para(
        "Parameters that changed:" if changed else "No parameter changed between the runs (seed included)."
    )
    if changed:
        doc.table(["parameter", a_name, b_name], [[k, json.dumps(x), json.dumps(y)] for k, x, y in changed])
    rec: dict[str, Any] = {"run": b_name, "changed": changed, "deltas": [], "success": {}}
    written = []
    for key in [k for k in scores[0] if k in scores[1]]:
        before, after = scores[0][key], scores[1][key]
        flags = [f"{n} {degenerate[i][key]}" for i, n in enumerate(names) if key in degenerate[i]]
        blocked = "; ".join(flags) or None
        ds = deltas(before, after, key, cfg, blocked)
        doc.heading(f"{key[0]} / {key[1]}: {b_name} against {a_name}")
        only_a, only_b = len(set(before) - set(after)), len(set(after) - set(before))
        doc.para(
            f"{len(set(before) & set(after))} latents scored in both; {only_a} only in {a_name}, {only_b} only in {b_name}."
        )
        if not ds:
            continue
        deciding = next(d for d in ds if d.metric == DECIDING)
        doc.para(
            f"Verdict: {deciding.verdict}, decided by {DECIDING.replace('_', ' ')} (the class-balance-invariant "
            "metric; F1, precision and recall move when a judge shifts towards one answer)."
        )
        doc.table(
            ["metric", a_name, b_name, "delta", "% change", "CI low", "CI high", "verdict", "flags"],
            [[d.metric, d.before, d.after, d.delta, d.pct_change, d.lo, d.hi, d.verdict, blocked or ""]
             for d in ds],
        )  # fmt: skip
        rec["deltas"] += [{**d.__dict__, "verdict": d.verdict} for d in ds]
        if blocked:
            doc.para(
                f"Success rates and per-latent changes are not compared: {blocked}. Its scores say nothing about "
                "the explanations; fix the judge (or its answer format) and score again."
            )
            continue
        rows = success_rates(before, after, cfg)
        doc.table(["success rate", a_name, b_name, "delta", "CI low", "CI high"], rows)
        _moved_latents(doc, before, after, cfg)
        name = f"{b_name}_{key[0]}_{key[1]}".replace("/", "_") + ".png"
        written.append(plots.save(_scatter(before, after, names, key, cfg), name))
        doc.image(written[-1], f"plots/{written[-1].name}", f"per-latent F1, {b_name} against {a_name}")
        rec["success"][f"{key[0]}/{key[1]}"] = rows
    return rec, written


def _moved_latents(
    doc: Doc, before: dict[int, dict[str, float]], after: dict[int, dict[str, float]], cfg: CompareConfig
) -> None:
    common = sorted(set(before) & set(after))
    rows: list[list[Any]] = [
        [
            i,
            before[i]["f1"],
            after[i]["f1"],
            after[i]["f1"] - before[i]["f1"],
            _pct(before[i]["f1"], after[i]["f1"]),
        ]
        for i in common
    ]
    up = [r for r in rows if r[3] > cfg.min_delta]
    down = [r for r in rows if r[3] < -cfg.min_delta]
    doc.para(
        f"Per latent (F1 moved by more than {cfg.min_delta:g}): {len(up)} improved, {len(down)} declined, "
        f"{len(rows) - len(up) - len(down)} unchanged. One latent's change is not tested for significance."
    )
    moved = sorted(up + down, key=lambda r: -abs(r[3]))
    if moved:
        doc.table(["latent", "F1 before", "F1 after", "delta", "% change"], moved[:50])


def _scatter(
    before: dict[int, dict[str, float]],
    after: dict[int, dict[str, float]],
    names: tuple[str, str],
    key: Key,
    cfg: CompareConfig,
) -> Any:
    common = sorted(set(before) & set(after))
    a = np.array([before[i]["f1"] for i in common])
    b = np.array([after[i]["f1"] for i in common])
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    colour = np.where(b - a > cfg.min_delta, "#228833", np.where(a - b > cfg.min_delta, "#cc3311", "#4477aa"))
    ax.scatter(a, b, c=colour, s=22)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"F1 in {names[0]}")
    ax.set_ylabel(f"F1 in {names[1]}")
    ax.set_title(f"Per-latent F1: {key[0]} / {key[1]}\n(green improved, red declined)", fontsize=9)
    return fig


def _spread_section(doc: Doc, names: list[str], scores: list[dict[Key, dict[int, dict[str, float]]]]) -> None:
    doc.heading("Per-latent metrics per run (mean, std, range)")
    rows = [
        row for name, s in zip(names, scores) for key, v in s.items() if v for row in spread(name, key, v)
    ]
    doc.table(["run", "explainer / scorer", "metric", "latents", "mean", "std", "min", "max"], rows)
