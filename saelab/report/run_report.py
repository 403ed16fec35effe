"""Reports: `report.md` and a self-contained `report.html` (plots embedded) for one run folder.

Sections: provenance (models, hashes, seed, code version), SAE metrics, feature-density histogram, explainer and
scorer models with the token-statistics baseline beside the LLM explainer, overall and per-latent scores, skipped
and failed latents, time per stage. `print_summary` writes the short summary shown at the end of `saelab demo`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from saelab.autointerp.explain import load_run_explanations
from saelab.autointerp.results import load_run_overall, load_run_scores
from saelab.config import ReportConfig
from saelab.eval.absorption import ABSORPTION, load_run_absorption
from saelab.eval.core import METRICS, load_run_metrics
from saelab.eval.matched_l0 import MATCHED_L0, MatchedL0
from saelab.eval.noise import NOISE, load_run_noise
from saelab.eval.probing import PROBING, load_run_probing
from saelab.eval.scr_tpp import SCR_TPP, load_run_scr_tpp
from saelab.latents.sampling import SampleSet
from saelab.report.doc import PLOTS, Doc, PlotDir, flags_section, pareto_plot, write_documents
from saelab.report.flags import Flag, TargetGap, classifier_flags, target_flags, target_gaps
from saelab.report.interp_tables import (
    class_balance,
    distribution_plot,
    explainer_comparisons,
    explainer_cost,
    latent_weighted,
    per_latent,
    score_plot,
)
from saelab.report.noise_sections import noise_section, scr_tpp_section
from saelab.run.manifest import Run

CLASS_METRICS = ("balanced_accuracy", "f1", "precision", "recall", "specificity", "accuracy")
WEAK_JUDGE_NOTE = (
    "The explainer and judge here is a {model}. A small model explains and judges poorly: compare its scores "
    "with the token-statistics baseline (no LLM) beside it before reading them as a property of the SAE."
)


def write_report(run: Run, cfg: ReportConfig | None = None) -> list[Path]:
    """Write report.md, report.html and the plots of `run`; returns their paths. It reads the artifacts of the
    stages the manifest records, and no others (a file a dropped stage left behind is not shown): the caller
    verifies them first (`saelab.report.stage`)."""
    cfg = cfg or ReportConfig()
    folder = run.folder
    plots = PlotDir(folder / PLOTS, cfg.pdf)
    doc = Doc(f"saelab report: {folder.name}")
    written: list[Path] = []
    _provenance(run, doc)
    written += _sae_section(run, doc, plots)
    written += _compare_section(run, doc, plots)
    _probing_section(run, doc)
    written += _absorption_section(run, doc, plots)
    scr_tpp = load_run_scr_tpp(folder) if recorded(run, "eval", SCR_TPP) else None
    written += scr_tpp_section(scr_tpp, doc, plots)
    noise_section(load_run_noise(folder) if recorded(run, "eval", NOISE) else None, doc)
    written += _interp_section(run, doc, plots)
    flags, gaps = run_flags(run, cfg)
    flags_section(doc, flags, gaps)
    _timing(run, doc)
    return [*write_documents(doc, folder), *written]


def recorded(run: Run, stage: str, artifact: str | None = None) -> bool:
    """Whether `stage` is recorded in the manifest (with `artifact` among its outputs): the report shows what the
    manifest vouches for, not whatever files lie in the folder."""
    return stage in run.stages and (artifact is None or artifact in run.stages[stage].get("outputs", {}))


def run_flags(run: Run, cfg: ReportConfig) -> tuple[list[Flag], list[TargetGap]]:
    """Flags of every (explainer, scorer) over its pooled judgements, plus one-class judges per latent."""
    scores = load_run_scores(run.folder) if recorded(run, "score") else None
    summary = scores.to_dict() if scores is not None else {}
    flags: list[Flag] = []
    gaps: list[TargetGap] = []
    targets = cfg.target_values()
    for o in summary.get("overall", []):
        subject = f"{o['explainer']} / {o['scorer']}"
        counts = {"positive": o["n_pos"], "negative": o["n_neg"]}
        flags += classifier_flags(subject, o["recall"], o["specificity"], counts, cfg)
        gaps += target_gaps(subject, o, targets)
    tol = cfg.one_class_tolerance
    rows = [r.to_dict() for r in scores.rows] if scores is not None else []
    for key in dict.fromkeys((r["explainer"], r["scorer"]) for r in rows):
        group = [r for r in rows if (r["explainer"], r["scorer"]) == key]
        one = [
            r["latent"]
            for r in group
            if r["n_pos"] and r["n_neg"] and min(r["recall"], r["specificity"]) <= tol
        ]
        if one:
            flags.append(
                Flag("one_class", f"{key[0]} / {key[1]}", f"answers one class for every example of {len(one)} of "
                     f"{len(group)} latents (latents {', '.join(map(str, one[:10]))}{'…' if len(one) > 10 else ''})")
            )  # fmt: skip
    return flags + target_flags(gaps), gaps


def _provenance(run: Run, doc: Doc) -> None:
    d = run.data
    cfg = d.get("config", {})
    collect = run.stages.get("collect", {})
    doc.heading("Provenance")
    doc.table(
        ["field", "value"],
        [
            ["subject model", cfg.get("model", {}).get("name")],
            ["hookpoint", collect.get("hookpoint")],
            ["training activations", _activations_line(collect, run.stages.get("train", {}))],
            ["dataset", cfg.get("data", {}).get("dataset")],
            ["seed", d.get("seed")],
            ["saelab version", d.get("saelab_version")],
            ["git commit", d.get("git_commit")],
            ["created", d.get("created")],
            *[[f"sha256 {k}", v] for k, v in d.get("hashes", {}).items()],
        ],
    )


def _activations_line(collect: dict[str, Any], train: dict[str, Any]) -> str:
    """Where the SAE's training activations came from."""
    if collect.get("format") != "stream":
        return f"{collect.get('n_tokens')} tokens collected and stored ({collect.get('format', 'file')})"
    extra = collect.get("extra_hookpoints") or []
    more = f"; further hookpoints {', '.join(extra)} from the same forwards" if extra else ""
    rows = train.get("stream", {}).get("block_rows")
    return (
        f"generated on the fly: {collect.get('n_tokens')} tokens per epoch, none stored, mixed in buffers of "
        f"{rows} rows{more}"
    )


def _sae_section(run: Run, doc: Doc, plots: PlotDir) -> list[Path]:
    loaded = load_run_metrics(run.folder) if recorded(run, "eval", METRICS) else None
    doc.heading("SAE metrics (held-out tokens)")
    if loaded is None:
        doc.para("The eval stage has not run: `saelab eval --run-dir RUN`.")
        return []
    metrics = {**loaded[0].to_json(), **asdict(loaded[1])}
    sae_cfg = loaded[1].sae_config or {}
    name = f" `{metrics['sae']}`" if metrics.get("sae", "sae") != "sae" else ""
    if sae_cfg.get("d_out"):  # a transcoder (saelab.eval.transcoder): its metrics are of the target
        kind = "skip transcoder" if sae_cfg.get("skip") else "transcoder"
        doc.para(
            f"{sae_cfg.get('architecture', '?')} {kind}{name}: reads `{sae_cfg.get('hookpoint')}` (d_in "
            f"{sae_cfg.get('d_in')}) and reconstructs `{sae_cfg.get('target_hookpoint')}` (d_out "
            f"{sae_cfg.get('d_out')}), {sae_cfg.get('d_sae')} latents, k {sae_cfg.get('k')}; a latent fires at its "
            "input's position. Reconstruction metrics are the target's (FVU = 1 - explained variance); CE/KL "
            "replace the target's output by the transcoder's, against zero-ablating it. Over "
            f"{metrics['n_tokens']} tokens, CE/KL over {metrics['n_ce_tokens']}; excluded: {metrics['excluded']}."
        )
    else:
        doc.para(
            f"{sae_cfg.get('architecture', '?')} SAE{name}, d_in {sae_cfg.get('d_in')}, {sae_cfg.get('d_sae')} "
            f"latents, k {sae_cfg.get('k')}. Reconstruction metrics over {metrics['n_tokens']} tokens, CE/KL over "
            f"{metrics['n_ce_tokens']}; excluded: {metrics['excluded']}."
        )
    keys = [
        "explained_variance", "explained_variance_legacy", "mse", "cosine_similarity", "l0", "l1", "l2_ratio",
        "relative_reconstruction_bias", "dead_fraction", "dense_fraction", "ce_loss_score", "ce_clean", "ce_sae", "ce_zero_ablation", "kl_score", "kl_sae",
        "kl_zero_ablation",
    ]  # fmt: skip
    doc.table(["metric", "value"], [[k, metrics[k]] for k in keys])
    freqs = np.array([v for v in metrics["log10_frequency"] if v is not None])
    n_dead = sum(v is None for v in metrics["log10_frequency"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(freqs, bins=40, color="#4477aa")
    ax.set_xlabel("log10 firing frequency on held-out tokens")
    ax.set_ylabel("latents")
    ax.set_title(f"Feature density ({n_dead} dead latents not shown)")
    path = plots.save(fig, "feature_density.png")
    doc.image(path, "plots/feature_density.png", "feature density histogram")
    return [path]


def _compare_section(run: Run, doc: Doc, plots: PlotDir) -> list[Path]:
    compared = MatchedL0.load_run(run.folder) if recorded(run, "eval", MATCHED_L0) else None
    if compared is None:
        return []
    saes = compared.saes
    doc.heading("SAEs compared on the same tokens")
    doc.para(
        "Every SAE below was evaluated on the same held-out tokens. An SAE is dominated when another has an L0 no "
        "higher and a score no lower (one of them strictly); dominated SAEs are drawn hollow."
    )
    doc.table(
        ["SAE", "architecture", "latents", "L0", "EV", "CE-loss score", "KL score", "dead", "dominated (EV / CE)"],
        [
            [
                e["name"], e["architecture"], e["d_sae"], e["l0"], e["explained_variance"], e["ce_loss_score"],
                e["kl_score"], e["dead_fraction"],
                f"{'yes' if e['dominated_ev'] else 'no'} / {'yes' if e['dominated_ce'] else 'no'}",
            ]
            for e in sorted(saes, key=lambda e: e["l0"])
        ],
    )  # fmt: skip
    written = []
    panels = [
        ("explained_variance", "dominated_ev", "explained variance"),
        ("ce_loss_score", "dominated_ce", "CE-loss score"),
        (
            "mean_absorption_fraction_score",
            "dominated_absorption",
            "mean absorption fraction (lower is better)",
        ),
    ]
    for metric, flag, label in panels:
        if metric not in saes[0]:
            continue
        path = plots.save(pareto_plot(saes, metric, flag, label), f"pareto_{metric}.png")
        doc.image(path, f"plots/{path.name}", f"{label} against L0")
        written.append(path)
    return written


def _probing_section(run: Run, doc: Doc) -> None:
    probing = load_run_probing(run.folder) if recorded(run, "eval", PROBING) else None
    if probing is None:
        return
    data = probing.to_json()
    doc.heading("Sparse probing (test-split accuracy)")
    doc.para(
        "Logistic probes on mean-pooled LM activations (all features: the ceiling) against probes on the top-k SAE "
        "latents chosen by class-mean difference on the train split, with LASSO and random-forest baselines on "
        "the SAE latents (SAEBench definitions)."
    )
    columns = [("lm", "logreg", None), *[("sae", "logreg", k) for k in data["config"]["ks"]]]
    columns += [("sae", "lasso", None), ("sae", "random_forest", None)]
    header = ["task", "LM", *[f"SAE top-{k}" for k in data["config"]["ks"]], "SAE LASSO", "SAE forest"]
    rows = []
    for task in data["tasks"]:
        by_key = {(sc["features"], sc["probe"], sc["k"]): sc["accuracy"] for sc in task["scores"]}
        rows.append([task["name"], *[by_key.get(c) for c in columns]])
    mean = {(m["features"], m["probe"], m["k"]): m["accuracy"] for m in data["mean"]}
    rows.append(["mean", *[mean.get(c) for c in columns]])
    doc.table(header, rows)


def _absorption_section(run: Run, doc: Doc, plots: PlotDir) -> list[Path]:
    absorption = load_run_absorption(run.folder) if recorded(run, "eval", ABSORPTION) else None
    if absorption is None:
        return []
    data = absorption.to_json()
    doc.heading("Feature absorption (first-letter task)")
    doc.para(
        f"Mean absorption fraction {data['mean_absorption_fraction_score']:.3f}, full-absorption rate "
        f"{data['mean_full_absorption_score']:.3f}, {data['mean_num_split_features']:.2f} split features per "
        f"letter, over {data['n_letters_evaluated']} letters ({data['n_test_words']} test words; SAEBench "
        "definitions). Higher absorption means the letter's main latents fail to fire on words a probe on the "
        "LM activations gets right, while other latents take their place."
    )
    letters = [x for x in data["letters"] if x["evaluated"]]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar([x["letter"] for x in letters], [x["mean_absorption_fraction"] for x in letters], color="#cc6677")
    ax.set_ylabel("absorption fraction")
    ax.set_title("Absorption per first letter")
    path = plots.save(fig, "absorption_letters.png")
    doc.image(path, "plots/absorption_letters.png", "absorption per letter")
    return [path]


def _interp_section(run: Run, doc: Doc, plots: PlotDir) -> list[Path]:
    folder = run.folder
    doc.heading("Explanations and scores")
    interp = all(recorded(run, stage) for stage in ("sample", "explain", "score"))
    scores = load_run_scores(folder) if interp else None
    if scores is None:
        doc.para("The sample / explain / score stages have not all run.")
        return []
    summary = scores.to_dict()
    models = summary.get("models", {})
    doc.table(["role", "model"], [[k, v] for k, v in models.items()])
    llm_name = models.get("explainer_llm") or models.get("judge_llm") or "LLM"
    doc.para(WEAK_JUDGE_NOTE.format(model=llm_name))
    samples = SampleSet.load_run(folder)
    skipped = samples.skipped
    doc.para(
        f"Latents studied: {len(samples.latents)}; ineligible (fire on fewer tokens than min_examples, "
        f"dead included): {samples.n_ineligible}; chosen but skipped: {len(skipped)}"
        + (" (" + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:10]) + ")" if skipped else "")
        + f". Failed explanations (not scored, counted): {summary.get('failed_explanations', 0)}."
        + (
            f" Failed judgements (excluded from the metrics, counted): {summary['failed_requests']} requests the "
            f"LLM did not answer and {summary['unparseable_answers']} answers that were no judgement (running "
            "`saelab score` again asks only these two kinds again)."
            if "failed_requests" in summary
            else ""
        )
    )
    overall = summary.get("overall", [])
    doc.table(
        ["explainer", "scorer", *CLASS_METRICS, "auc", "n_pos", "n_neg"],
        [
            [
                o["explainer"],
                o["scorer"],
                *[o.get(m) for m in CLASS_METRICS],
                o.get("auc"),
                o.get("n_pos"),
                o.get("n_neg"),
            ]
            for o in overall
        ],
    )
    latent_weighted(doc, overall)
    explainer_comparisons(doc, summary.get("comparisons", []))
    written = [plots.save(score_plot(overall), "scores.png")] if overall else []
    if written:
        doc.image(written[0], "plots/scores.png", "balanced accuracy per explainer and scorer")
    rows = [r.to_dict() for r in scores.rows]
    class_balance(doc, rows)
    if rows:
        written.append(plots.save(distribution_plot(rows), "score_distributions.png"))
        doc.image(written[-1], "plots/score_distributions.png", "per-latent score distributions per scorer")
    explainer_cost(doc, load_run_explanations(folder))
    per_latent(load_run_explanations(folder), rows, samples, doc)
    return written


def _timing(run: Run, doc: Doc) -> None:
    doc.heading("Time, memory and tokens per stage")
    rows = [
        [name, st.get("seconds"), st.get("peak_rss_mib"), st.get("peak_cuda_mib"), st.get("llm_calls"),
         st.get("llm_cache_hits"), st.get("llm_prompt_tokens"), st.get("llm_completion_tokens")]
        for name, st in run.stages.items()
    ]  # fmt: skip
    doc.para(
        "Peak RSS is the stage's own peak where the OS allows resetting it (else the process's so far). LLM calls "
        "and tokens count the requests the backend answered in this run; answers read from `llm/cache.sqlite` "
        "are counted as cache hits instead."
    )
    doc.table(
        ["stage", "seconds", "peak RSS (MiB)", "peak CUDA (MiB)", "LLM calls", "cache hits", "prompt tokens",
         "completion tokens"],
        rows,
    )  # fmt: skip


def print_summary(folder: Path, seconds: float) -> None:
    """The short summary printed at the end of a run."""
    run = Run.open(folder)
    lines = [f"saelab: run {folder} finished in {seconds:.0f}s"]
    loaded = load_run_metrics(folder) if recorded(run, "eval", METRICS) else None
    if loaded is not None:
        m, cfg = loaded[0].to_json(), loaded[1].sae_config or {}
        kind = (
            f"transcoder {cfg.get('hookpoint')} -> {cfg.get('target_hookpoint')}"
            if cfg.get("d_out")
            else "SAE"
        )
        lines.append(
            f"  {kind}: EV {m['explained_variance']:.3f}  L0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}  "
            f"CE score {m['ce_loss_score']:.3f}  KL score {m['kl_score']:.3f}"
        )
    for o in (o.to_dict() for o in (load_run_overall(folder) if recorded(run, "score") else None) or []):
        lines.append(
            f"  {o['explainer']:>12} / {o['scorer']:<10} balanced accuracy {o['balanced_accuracy']:.3f}  F1 {o['f1']:.3f}"
        )
    lines.append(f"  report: {folder / 'report.md'} (and report.html)")
    sys.stdout.write("\n".join(lines) + "\n")
