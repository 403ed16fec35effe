"""Report sections for SCR/TPP (`eval/scr_tpp.json`) and the reseed noise (`eval/noise.json`): every headline
number with its standard deviation and bootstrap interval over seeds, a plot of SCR and TPP against the number of
latents ablated, and `--eval.compare`'s verdict. The run report calls them with the records the manifest vouches
for (`saelab.report.run_report`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from saelab.eval.noise import NoiseRecord, Spread
from saelab.eval.scr_tpp import ScrTppResult
from saelab.report.doc import Doc, PlotDir


def _pm(s: Spread) -> str:
    if len(s.values) == 1:
        return f"{s.mean:+.3f}"
    return f"{s.mean:+.3f} ± {s.std:.3f} [{s.ci_low:+.3f}, {s.ci_high:+.3f}]"


def scr_tpp_section(result: ScrTppResult | None, doc: Doc, plots: PlotDir) -> list[Path]:
    """SCR and TPP per n: mean ± std [95% bootstrap interval] over the seeds, and their plot."""
    if result is None:
        return []
    seeds = [r.seed for r in result.seeds]
    doc.heading("SCR and TPP (SAEBench definitions)")
    first = result.seeds[0]
    parts = [f"Data: {result.dataset}; seeds {', '.join(map(str, seeds))} (probe seed and data subsample)."]
    if first.scr:
        p = first.scr[0]
        parts.append(
            f"SCR pairs: {', '.join(x.name for x in first.scr)} ({p.n_train} train / {p.n_test} test texts per "
            f"probe); at seed {first.seed} the biased probe scores {p.biased_on_profession_acc:.3f} on profession "
            f"against the oracle's {p.profession_acc:.3f}."
        )
    if first.tpp:
        parts.append(f"TPP classes: {', '.join(c.name for c in first.tpp)}.")
    parts.append(
        "SCR: the share of the biased probe's gap to the oracle closed by ablating n latents (1 = all of it). "
        "TPP: accuracy drop of the targeted class's probe minus the mean drop of the others'. With one seed "
        "no noise is shown: pass --eval.repeats 3 or more before reading small differences."
    )
    doc.para(" ".join(parts))
    ns = sorted({n for key in result.noise for n in [int(key.rsplit("_n", 1)[1])]})
    rows = [[n, *[_pm(result.noise[k]) if k in result.noise else None for k in (f"scr.metric_n{n}",
             f"tpp.total_n{n}")]] for n in ns]  # fmt: skip
    doc.table(["n ablated", "SCR", "TPP"], rows)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key, label, colour in (("scr.metric", "SCR", "#4477aa"), ("tpp.total", "TPP", "#cc6677")):
        got = [(n, result.noise[f"{key}_n{n}"]) for n in ns if f"{key}_n{n}" in result.noise]
        if got:
            ax.plot([n for n, _ in got], [s.mean for _, s in got], marker="o", color=colour, label=label)
            ax.fill_between([n for n, _ in got], [s.ci_low for _, s in got], [s.ci_high for _, s in got],
                            color=colour, alpha=0.2)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("latents ablated (n)")
    ax.set_ylabel("score")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    ax.set_title(f"SCR and TPP over {len(seeds)} seed(s), 95% bootstrap band")
    path = plots.save(fig, "scr_tpp.png")
    doc.image(path, "plots/scr_tpp.png", "SCR and TPP against latents ablated")
    return [path]


def noise_section(record: NoiseRecord | None, doc: Doc) -> None:
    """Every repeated metric's spread, and the comparison with another run when one was asked for."""
    if record is None:
        return
    doc.heading("Reseed noise")
    doc.para(
        f"Each metric at seeds {', '.join(map(str, record.seeds))}: mean ± sample standard deviation "
        "[95% bootstrap interval of the mean]. A difference between two SAEs smaller than this is not evidence "
        "that one is better (Chanin 2026)."
    )
    doc.table(["metric", "mean ± std [95% interval]"], [[m, _pm(s)] for m, s in record.metrics.items()])
    if record.compared_with:
        doc.para(f"Compared with {record.compared_with} (its SAE {record.compared_sae_sha256[:12]}): this run "
                 "minus that one, 95% bootstrap interval of the difference.")  # fmt: skip
        doc.table(
            ["metric", "this run", "other", "difference [95%]", "inside the noise"],
            [[d.metric, d.mean_b, d.mean_a, f"{d.diff:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]",
              "yes" if d.within_noise else "no"] for d in record.differences],
        )  # fmt: skip
