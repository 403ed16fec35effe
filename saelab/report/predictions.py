"""A classification report for any classifier: `saelab report --predictions FILE.csv`.

The CSV has one row per prediction: `id`, `y_true`, `y_pred`, and optionally `probability` (binary: P(positive);
multiclass: the confidence in y_pred), `score` (binary: any real score, higher = more positive; AUC only), `task`
and `model`. Labels are integers when every label in the file is one, text otherwise. Each (task, model) gets
per-class precision/recall/F1/support, macro and weighted F1, accuracy, specificity, balanced accuracy, the
balance gap, a confusion-matrix plot, a reliability diagram with ECE when probabilities exist, and the flags and
target-gap table of every report. Models of one task are ranked side by side, beside a majority-class baseline
(and any model whose name contains "baseline", marked as one).

    saelab report --predictions preds.csv --out preds-report --report.targets f1=0.5,balanced_accuracy=0.7
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from saelab.config import ReportConfig
from saelab.metrics import ClassReport, class_report
from saelab.report.doc import Doc, flags_section, save_figure, write_documents
from saelab.report.flags import Flag, TargetGap, classifier_flags, target_flags, target_gaps
from saelab.run import atomic

REQUIRED = ("id", "y_true", "y_pred")
OPTIONAL = ("probability", "score", "task", "model")
MAJORITY = "majority-class baseline"

CLASSIFICATION = "classification.json"
"""Every number of a predictions report, beside its report.md and report.html."""


class PredictionsError(ValueError):
    """The predictions CSV cannot be read; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Predictions:
    """The predictions of one model on one task."""

    task: str
    model: str
    ids: tuple[str, ...]
    y_true: tuple[Any, ...]
    y_pred: tuple[Any, ...]
    probability: tuple[float, ...] | None
    score: tuple[float, ...] | None

    @property
    def is_baseline(self) -> bool:
        return "baseline" in self.model.lower()


def _number(text: str, column: str, line: int, path: Path, unit: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if math.isnan(v) or math.isinf(v) or (unit and not 0 <= v <= 1):
        want = "a number in [0, 1]" if unit else "a finite number"
        raise PredictionsError(f"{path}, line {line}: {column} {text!r} is not {want}")
    return v


def _as_labels(values: list[str]) -> list[Any]:
    try:
        return [int(v) for v in values]
    except ValueError:
        return values


_NOT_TEXT = "give the predictions as a UTF-8 CSV (`iconv -t utf-8` converts another encoding)"


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of every row of the CSV, after checking its header; a file that is no UTF-8 CSV text (a binary
    file, another encoding) is refused naming it (and the line, where it is known)."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        try:
            if not reader.fieldnames:
                raise PredictionsError(f"{path} is empty; expected a header with {', '.join(REQUIRED)}")
            columns = [c.strip() for c in reader.fieldnames]
            if any("\0" in c for c in columns):
                raise _nul(path, 1)
            rows: list[tuple[int, dict[str, str]]] = []
            for r in reader:
                if any("\0" in v for v in r.values() if isinstance(v, str)):
                    raise _nul(path, reader.line_num)
                rows.append(
                    (len(rows) + 2, {k.strip(): (v or "").strip() for k, v in r.items() if k is not None})
                )
        except UnicodeDecodeError:
            raise PredictionsError(  # decoded a block at a time: the line is not known
                f"{path} is not UTF-8 text (is it a binary file?); {_NOT_TEXT}"
            ) from None
        except csv.Error as err:
            raise PredictionsError(
                f"{path}, line {reader.line_num}: not CSV text ({err}); {_NOT_TEXT}"
            ) from None
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise PredictionsError(
            f"{path} lacks column(s) {', '.join(missing)}; found: {', '.join(columns)} "
            f"(required: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})"
        )
    return rows


def _nul(path: Path, line: int) -> PredictionsError:
    """Python's csv reads NUL bytes as text: a binary file (or UTF-16 text) would pass as labels."""
    return PredictionsError(f"{path}, line {line}: a NUL byte (a binary file, or UTF-16 text?); {_NOT_TEXT}")


def read_predictions(path: Path) -> list[Predictions]:
    """Every (task, model) group of the CSV, in the order they first appear."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    rows = _read_rows(path)
    if not rows:
        raise PredictionsError(f"{path} has a header but no rows")
    for line, r in rows:
        for c in REQUIRED:
            if not r.get(c):
                raise PredictionsError(f"{path}, line {line}: empty {c}")
    labels = _as_labels([r["y_true"] for _, r in rows] + [r["y_pred"] for _, r in rows])
    y_true, y_pred = labels[: len(rows)], labels[len(rows) :]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (_, r) in enumerate(rows):
        groups.setdefault((r.get("task") or "task", r.get("model") or "model"), []).append(i)
    out = []
    for (task, model), idx in groups.items():
        ids = [rows[i][1]["id"] for i in idx]
        dup = [k for k, c in Counter(ids).items() if c > 1]
        if dup:
            raise PredictionsError(f"{path}: id {dup[0]!r} appears twice for task {task!r}, model {model!r}")
        cols = {}
        for c in ("probability", "score"):
            present = [bool(rows[i][1].get(c)) for i in idx]
            if any(present):  # a column the header lacks is empty on every row
                if not all(present):
                    line = rows[idx[present.index(False)]][0]
                    raise PredictionsError(f"{path}, line {line}: empty {c} (give it on every row or none)")
                cols[c] = tuple(_number(rows[i][1][c], c, rows[i][0], path, c == "probability") for i in idx)
        out.append(
            Predictions(
                task,
                model,
                tuple(ids),
                tuple(y_true[i] for i in idx),
                tuple(y_pred[i] for i in idx),
                cols.get("probability"),
                cols.get("score"),
            )
        )
    return out


def majority_baseline(p: Predictions) -> Predictions:
    """Predicts the most frequent true label of the task for every example."""
    label = Counter(p.y_true).most_common(1)[0][0]
    return Predictions(p.task, MAJORITY, p.ids, p.y_true, (label,) * len(p.ids), None, None)


def headline(r: ClassReport) -> dict[str, float | None]:
    """The metrics targets and rankings refer to; `f1`/`precision` are the positive class's when binary, macro
    otherwise."""
    pos = next((m for m in r.per_class if m.label == r.positive), None)
    return {
        "accuracy": r.accuracy,
        "balanced_accuracy": r.balanced_accuracy,
        "macro_f1": r.macro_f1,
        "weighted_f1": r.weighted_f1,
        "f1": pos.f1 if pos else r.macro_f1,
        "precision": pos.precision if pos else r.macro_precision,
        "recall": r.recall,
        "specificity": r.specificity,
        "balance_gap": r.balance_gap,
        "auc": r.auc,
        "ece": r.ece,
    }


def report_flags(p: Predictions, r: ClassReport, cfg: ReportConfig) -> tuple[list[Flag], list[TargetGap]]:
    subject = f"{p.task} / {p.model}"
    counts = {str(m.label): m.support for m in r.per_class if m.support > 0}
    flags = classifier_flags(subject, r.recall, r.specificity, counts, cfg)
    if len(set(p.y_pred)) == 1 and len(counts) > 1 and not any(f.kind == "one_class" for f in flags):
        flags.insert(0, Flag("one_class", subject, f"predicts {p.y_pred[0]} for every example"))
    if r.unseen_predicted:
        flags.append(
            Flag(
                "unseen_label",
                subject,
                f"predicts label(s) never seen in y_true: {', '.join(map(str, r.unseen_predicted))}",
            )
        )
    gaps = target_gaps(subject, headline(r), cfg.target_values())
    return flags + target_flags(gaps), gaps


def write_predictions_report(csv_path: Path, out: Path, cfg: ReportConfig) -> list[Path]:
    """report.md, report.html, metrics.json and plots/ under `out`; returns the paths written."""
    groups = read_predictions(csv_path)
    out.mkdir(parents=True, exist_ok=True)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    doc = Doc(f"saelab classification report: {csv_path.name}")
    written: list[Path] = []
    all_flags: list[Flag] = []
    all_gaps: list[TargetGap] = []
    record: dict[str, Any] = {"source": str(csv_path), "tasks": {}}
    for t, task in enumerate(dict.fromkeys(p.task for p in groups)):
        models = [p for p in groups if p.task == task]
        if not any(p.is_baseline for p in models):
            models.append(majority_baseline(models[0]))
        reports = {p.model: class_report(p.y_true, p.y_pred, p.probability, p.score) for p in models}
        doc.heading(f"Task: {task}")
        _ranking(doc, models, reports, cfg)
        record["tasks"][task] = {m: r.to_dict() for m, r in reports.items()}
        for m, p in enumerate(models):
            r = reports[p.model]
            flags, gaps = report_flags(p, r, cfg)
            if p.model != MAJORITY:
                all_flags += flags
                all_gaps += gaps
                written += _model_section(doc, p, r, plots / f"t{t}m{m}", cfg)
        written += _reliability_plot(doc, task, models, reports, plots / f"t{t}_reliability", cfg)
        if len({frozenset(p.ids) for p in models}) > 1:
            all_flags.append(
                Flag("few_examples", task, "models were scored on different ids: compare with care")
            )
    flags_section(doc, _merge_task_flags(all_flags), all_gaps)
    atomic.write_json(out / CLASSIFICATION, record)
    return [*write_documents(doc, out), out / CLASSIFICATION, *written]


def _merge_task_flags(flags: list[Flag]) -> list[Flag]:
    """Imbalance and set-size flags depend on y_true alone: one per task, not one per model."""
    out: list[Flag] = []
    seen: set[tuple[str, str, str]] = set()
    for f in flags:
        if f.kind in ("imbalance", "few_examples") and " / " in f.subject:
            task = f.subject.split(" / ", 1)[0]
            if (f.kind, task, f.message) in seen:
                continue
            seen.add((f.kind, task, f.message))
            f = Flag(f.kind, task, f.message)
        out.append(f)
    return out


def _ranking(doc: Doc, models: list[Predictions], reports: dict[str, ClassReport], cfg: ReportConfig) -> None:
    def key(p: Predictions) -> float:
        v = headline(reports[p.model])[cfg.rank_by]
        return -1.0 if v is None else v

    ranked = sorted(models, key=key, reverse=True)
    names = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "f1", "specificity", "balance_gap")
    rows = []
    for i, p in enumerate(ranked, 1):
        h = headline(reports[p.model])
        kind = "baseline" if p.is_baseline or p.model == MAJORITY else ""
        rows.append([i, p.model, kind, len(p.ids), *[h[n] for n in names], h["auc"], h["ece"]])
    doc.para(
        f"Models ranked by {cfg.rank_by}; baselines are marked. `f1` is the positive class's when binary."
    )
    doc.table(["rank", "model", "baseline", "n", *names, "auc", "ece"], rows)


def _model_section(doc: Doc, p: Predictions, r: ClassReport, stem: Path, cfg: ReportConfig) -> list[Path]:
    doc.heading(f"{p.task} / {p.model}")
    kind = f"binary (positive class {r.positive})" if r.positive is not None else f"{len(r.labels)} labels"
    doc.para(f"{r.n} predictions, {kind}.")
    doc.table(
        ["class", "precision", "recall", "f1", "specificity", "support"],
        [[m.label, m.precision, m.recall, m.f1, m.specificity, m.support] for m in r.per_class]
        + [
            ["macro", r.macro_precision, r.macro_recall, r.macro_f1, None, r.n],
            ["weighted f1", None, None, r.weighted_f1, None, r.n],
        ],
    )
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(r.labels), 1.0 + 0.6 * len(r.labels)))
    cm = np.array(r.confusion)
    ax.imshow(cm, cmap="Blues")
    for i in range(len(r.labels)):
        for j in range(len(r.labels)):
            colour = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=colour, fontsize=9)
    ticks = [str(lab) for lab in r.labels]
    ax.set_xticks(range(len(ticks)), ticks, rotation=45 if len(ticks) > 4 else 0)
    ax.set_yticks(range(len(ticks)), ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix: {p.model}", fontsize=9)
    path = save_figure(fig, stem.with_name(stem.name + "_confusion.png"), cfg.pdf)
    doc.image(path, f"plots/{path.name}", f"confusion matrix of {p.model} on {p.task}")
    return [path]


def _reliability_plot(
    doc: Doc,
    task: str,
    models: list[Predictions],
    reports: dict[str, ClassReport],
    stem: Path,
    cfg: ReportConfig,
) -> list[Path]:
    calibrated = [p for p in models if reports[p.model].reliability]
    if not calibrated:
        return []
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    for p in calibrated:
        r = reports[p.model]
        xs, ys, _ = zip(*r.reliability)
        ax.plot(xs, ys, marker="o", label=f"{p.model} (ECE {r.ece:.3f})")
    binary = reports[calibrated[0].model].positive is not None
    ax.set_xlabel("mean predicted probability" if binary else "mean confidence")
    ax.set_ylabel("observed frequency of the positive class" if binary else "accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"Reliability diagram: {task}", fontsize=9)
    path = save_figure(fig, stem.with_name(stem.name + ".png"), cfg.pdf)
    doc.image(path, f"plots/{path.name}", f"reliability diagram of {task}")
    return [path]
