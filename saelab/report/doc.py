"""Document and plot helpers shared by every report: Markdown and HTML built side by side (`Doc`), figures saved
as PNG (and PDF), the flags and targets tables, the Pareto plot of SAEs against L0, violins of per-latent scores.

A report folder holds `report.md`, `report.html` (self-contained: plots embedded) and `plots/`.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

from saelab.report.flags import Flag, TargetGap
from saelab.run import atomic

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS = "plots"
"""A report folder's files (the run's report is in the run folder itself)."""


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def md_text(text: str) -> str:
    """`text` for Markdown with `&` and `<` escaped: Markdown viewers render raw HTML, so a tag in an LLM's
    explanation (or a run's name) must reach the page as text. No tag or entity starts without one of them, so `>`
    (as in "F1 > 0.3") and Markdown's own marks (`**`, backticks) are kept as written."""
    return text.replace("&", "&amp;").replace("<", "&lt;")


class Doc:
    """Builds the Markdown and the HTML of a report side by side; text is escaped in both."""

    def __init__(self, title: str) -> None:
        self.md: list[str] = [f"# {md_text(title)}", ""]
        self.html: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str) -> None:
        self.md += [f"## {md_text(text)}", ""]
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def para(self, text: str) -> None:
        self.md += [md_text(text), ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        cells = [[fmt(c) for c in r] for r in rows]
        self.md.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        self.md.append("|" + "---|" * len(header))
        self.md += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in cells]
        self.md.append("")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, path: Path, rel: str, alt: str) -> None:
        self.md += [f"![{alt}]({rel})", ""]
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(
            f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'
        )


def _md_cell(text: str) -> str:
    """A Markdown table cell: escaped text (`md_text`) on one line, its `|` escaped."""
    return md_text(text).replace("|", "\\|").replace("\n", " ")


def save_figure(fig: Any, path: Path, pdf: bool = False) -> Path:
    """Save `fig` as PNG at `path` (and as PDF beside it when `pdf`), close it, return the PNG's path."""
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    if pdf:
        with atomic.atomic_path(path.with_suffix(".pdf")) as tmp:
            fig.savefig(tmp, format="pdf")
    plt.close(fig)
    return path


class PlotDir:
    """The report's plots/ folder: every figure saved as PNG there (and as PDF beside it when `pdf`)."""

    def __init__(self, folder: Path, pdf: bool = False) -> None:
        self.folder = folder
        self.pdf = pdf
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, fig: Any, name: str) -> Path:
        return save_figure(fig, self.folder / name, self.pdf)


def write_documents(doc: Doc, folder: Path) -> list[Path]:
    """report.md and the self-contained report.html of `doc` in `folder`."""
    md_path, html_path = folder / REPORT_MD, folder / REPORT_HTML
    atomic.write_text(md_path, "\n".join(doc.md))
    atomic.write_text(
        html_path,
        f"<!doctype html><html><head><meta charset='utf-8'><title>saelab report</title>{HTML_STYLE}</head>"
        f"<body>{''.join(doc.html)}</body></html>",
    )
    return [md_path, html_path]


def flags_section(doc: Doc, flags: list[Flag], gaps: list[TargetGap]) -> None:
    """The flags and the target-gap table (every report ends its findings with these)."""
    doc.heading("Flags")
    if flags:
        doc.table(["flag", "subject", "detail"], [[f.kind, f.subject, f.message] for f in flags])
    else:
        doc.para("No flags: no one-class classifier, class imbalance, small set or missed target.")
    if gaps:
        doc.heading("Targets")
        doc.para(
            "gap = target − value (value − target for ECE and balance gap): positive means short of target."
        )
        doc.table(
            ["subject", "metric", "value", "target", "gap", "% of target", "met"],
            [
                [g.subject, g.metric, g.value, g.target, g.gap, g.reached_pct,
                 "–" if g.gap is None else ("yes" if g.gap <= 0 else "no")]
                for g in gaps
            ],
        )  # fmt: skip


HTML_STYLE = """<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}figure img{max-width:100%}</style>"""


def pareto_plot(saes: list[dict[str, Any]], metric: str, flag: str, label: str) -> Any:
    """`metric` against L0 (log scale), one colour per architecture, dominated SAEs hollow, the frontier drawn."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    archs = sorted({_group(e) for e in saes})
    colours = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(archs)}
    for e in saes:
        c = colours[_group(e)]
        ax.scatter(e["l0"], e[metric], s=46, edgecolors=c, facecolors="none" if e[flag] else c, zorder=3)
        name = "/".join(Path(e["name"]).parts[-2:])  # `run/sae` tells an extra SAE from the run's own
        name = name if len(name) <= 24 else name[:23] + "…"
        ax.annotate(name, (e["l0"], e[metric]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = sorted((e for e in saes if not e[flag]), key=lambda e: e["l0"])
    ax.plot([e["l0"] for e in front], [e[metric] for e in front], color="#999", lw=1, zorder=2)
    for a in archs:
        ax.scatter([], [], color=colours[a], label=a)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(label)
    ax.legend(fontsize=8, loc="best", framealpha=0.7)
    ax.set_title(f"{label} against L0 (hollow: dominated)")
    return fig


def violins(ax: Any, data: list[list[float]], labels: list[str]) -> None:
    """One box per list of `data` on `ax`, with a violin around it where its values differ, labelled `labels`."""
    pos = np.arange(1, len(data) + 1)
    spread = [i for i, d in enumerate(data) if len(set(d)) > 1]  # a violin needs more than one value
    if spread:
        ax.violinplot([data[i] for i in spread], positions=pos[spread], showextrema=False)
    ax.boxplot(data, positions=pos, widths=0.15)
    ax.set_xticks(pos, labels, fontsize=7)


def _group(entry: dict[str, Any]) -> str:
    """A Pareto plot's colour: the architecture, and with transcoders beside SAEs what each is
    (`saelab.eval.transcoder.describe`)."""
    kind = entry.get("kind")
    return f"{entry['architecture']} {kind}" if kind else str(entry["architecture"])
