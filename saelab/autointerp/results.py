"""The score stage's results and their files: per-(latent, explainer, scorer) rows, the summary over latents, the
shuffled-explanation control and the paired differences between explainers.

Files, in the run's score folder (`write_scores` / `load_scores`):
- `scores.jsonl` (`SCORES_FILE`): one `ScoreRow` a line, its metrics and then its per-example predictions.
- `scores_summary.json` (`SUMMARY_FILE`): micro (pooled over latents) and macro (mean over latents) metrics of
  each (explainer, scorer), the failure counts, the models, and the explainers' paired differences.

The feature browser reads one latent's rows without parsing the whole file: `index_score_lines` gives each line's
identity, metrics and byte span, and `read_score_row` parses one span.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saelab.autointerp.explain import ExplanationRecord
from saelab.autointerp.scorers.base import Prediction
from saelab.metrics import BinaryMetrics, binary_metrics, macro_mean, paired_bootstrap
from saelab.run import atomic

log = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
"""One ScoreRow a line, in the score folder."""
SUMMARY_FILE = "scores_summary.json"
"""The ScoreSummary without its rows, in the score folder."""

METRIC_FIELDS = tuple(f.name for f in fields(BinaryMetrics))
_IDENTITY = ("latent", "explainer", "scorer", "explanation")
_ROW_KEYS = (*_IDENTITY, "threshold", "predictions")
_PREDICTIONS = ', "predictions": ['
"""Where a scores.jsonl line's predictions begin: `ScoreRow.to_dict` puts them last, so the part before is the
line's metrics (a JSON string cannot hold this: its quotes would be escaped)."""


def _metrics(d: dict[str, Any]) -> BinaryMetrics:
    return BinaryMetrics(**{k: d[k] for k in METRIC_FIELDS})


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
        """The row flat, predictions last (`index_score_lines` relies on that)."""
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreRow:
        extra = {k: v for k, v in d.items() if k not in METRIC_FIELDS and k not in _ROW_KEYS}
        return cls(
            d["latent"],
            d["explainer"],
            d["scorer"],
            d["explanation"],
            _metrics(d),
            d["threshold"],
            [Prediction.from_dict(p) for p in d["predictions"]],
            extra,
        )


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OverallScore:
        return cls(
            d["explainer"],
            d["scorer"],
            _metrics(d),
            d["macro"],
            d["n_latents"],
            d["frequency_weighted_f1"],
            {int(q): r for q, r in d["quantile_recall"].items()},
        )


@dataclass(frozen=True)
class ScoreSummary:
    rows: list[ScoreRow]
    overall: list[OverallScore]
    failed_explanations: int
    """Explanations not scored because the explainer failed."""
    models: dict[str, str | None]
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    """Explainers compared per latent (see `paired_explainer_deltas`)."""

    def failures(self) -> dict[str, int]:
        """Failed judgements by kind: `failed_requests` (asked again on a rerun) and `unparseable_answers`."""
        kinds = Counter(p.failure for r in self.rows for p in r.predictions if p.failure)
        return {"failed_requests": kinds["request"], "unparseable_answers": kinds["unparseable"]}

    def to_dict(self) -> dict[str, Any]:
        """The summary file's content: everything but the rows (the failure counts are derived from them)."""
        return {
            "models": self.models,
            "overall": [o.to_dict() for o in self.overall],
            "failed_explanations": self.failed_explanations,
            **self.failures(),
            "comparisons": self.comparisons,
        }


# ------------------------------------------------------------------------------------------------- metrics


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


def paired_explainer_deltas(rows: Sequence[ScoreRow], seed: int) -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------------------------------- files


def write_scores(summary: ScoreSummary, out_dir: Path) -> None:
    """`SCORES_FILE` and `SUMMARY_FILE` under `out_dir` (the run's score folder), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_dir / SCORES_FILE, "".join(json.dumps(r.to_dict()) + "\n" for r in summary.rows))
    atomic.write_text(out_dir / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2) + "\n")


def load_scores(out_dir: Path) -> ScoreSummary:
    """The summary `write_scores` wrote under `out_dir`, rows included."""
    paths = [out_dir / SCORES_FILE, out_dir / SUMMARY_FILE]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run `saelab score` first")
    lines = paths[0].read_text(encoding="utf-8").splitlines()
    rows = [ScoreRow.from_dict(json.loads(line)) for line in lines if line.strip()]
    d = json.loads(paths[1].read_text(encoding="utf-8"))
    return ScoreSummary(
        rows,
        [OverallScore.from_dict(o) for o in d["overall"]],
        d["failed_explanations"],
        d["models"],
        d["comparisons"],
    )


class ScoreLine(NamedTuple):
    """One line of a scores.jsonl, indexed without parsing its predictions."""

    latent: int
    explainer: str
    scorer: str
    metrics: dict[str, Any]
    """The row's metrics, scorer-specific scores and threshold (`ScoreRow.to_dict` without the identity,
    explanation and predictions)."""
    offset: int
    """Byte offset of the line in the file."""
    length: int
    """Bytes of the line, its newline included (`read_score_row` reads them back)."""


def index_score_lines(path: Path) -> list[ScoreLine]:
    """Every row of the scores.jsonl at `path` with its byte span, parsing only the part before the predictions
    (they hold nearly all of a line's bytes)."""
    out: list[ScoreLine] = []
    offset = 0
    with path.open("rb") as fh:
        for raw in fh:
            text = raw.decode("utf-8")
            if text.strip():
                cut = text.find(_PREDICTIONS)
                head = json.loads(text[:cut] + "}" if cut >= 0 else text)
                metrics = {k: v for k, v in head.items() if k not in _IDENTITY and k != "predictions"}
                out.append(
                    ScoreLine(head["latent"], head["explainer"], head["scorer"], metrics, offset, len(raw))
                )
            offset += len(raw)
    return out


def read_score_row(path: Path, offset: int, length: int) -> ScoreRow:
    """The row on the line at (`offset`, `length`) of the scores.jsonl at `path` (a `ScoreLine`'s span)."""
    with path.open("rb") as fh:
        fh.seek(offset)
        return ScoreRow.from_dict(json.loads(fh.read(length).decode("utf-8")))


SCORE_DIR = "score"
"""The run's score folder (holding `SCORES_FILE` and `SUMMARY_FILE`), relative to the run folder."""


def run_score_files(run_folder: Path) -> tuple[Path, Path]:
    """The run's scores.jsonl and scores_summary.json (for readers that index them, such as the results store)."""
    return run_folder / SCORE_DIR / SCORES_FILE, run_folder / SCORE_DIR / SUMMARY_FILE


def load_run_scores(run_folder: Path) -> ScoreSummary | None:
    """The run's scores, rows included, or None when the score stage has not written them."""
    scores, summary = run_score_files(run_folder)
    return load_scores(run_folder / SCORE_DIR) if scores.is_file() and summary.is_file() else None


def load_run_overall(run_folder: Path) -> list[OverallScore] | None:
    """The run's pooled scores per (explainer, scorer) from the summary file alone (no rows parsed)."""
    _, summary = run_score_files(run_folder)
    if not summary.is_file():
        return None
    return [OverallScore.from_dict(o) for o in json.loads(summary.read_text(encoding="utf-8"))["overall"]]
