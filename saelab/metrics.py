"""Binary classification metrics for scorers: pure functions, equal to scikit-learn on the same inputs.

Zero-division conventions follow scikit-learn's `zero_division=0`: a ratio whose denominator is 0 is 0.0.
Balanced accuracy is scikit-learn's `balanced_accuracy_score`: the mean recall over the classes present in
`y_true` (so with only positives it is the recall). ROC AUC is the Mann-Whitney statistic with tied scores
counted as one half, which is what scikit-learn's trapezoidal ROC curve gives; it is undefined (None) when
`y_true` holds a single class, where scikit-learn raises.

`tests/test_metrics.py` checks every function against scikit-learn on random label sets (hypothesis).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike


class Confusion(NamedTuple):
    """Confusion counts of a binary classifier (positive class = 1)."""

    tp: int
    fp: int
    tn: int
    fn: int


def confusion(y_true: ArrayLike, y_pred: ArrayLike) -> Confusion:
    """Counts of true/false positives/negatives; labels must be 0 or 1."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.shape} vs {p.shape})")
    if not (np.isin(t, (0, 1)).all() and np.isin(p, (0, 1)).all()):
        raise ValueError("labels and predictions must be 0 or 1")
    return Confusion(
        tp=int(((t == 1) & (p == 1)).sum()),
        fp=int(((t == 0) & (p == 1)).sum()),
        tn=int(((t == 0) & (p == 0)).sum()),
        fn=int(((t == 1) & (p == 0)).sum()),
    )


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else 0.0


def accuracy(c: Confusion) -> float:
    return _ratio(c.tp + c.tn, c.tp + c.fp + c.tn + c.fn)


def precision(c: Confusion) -> float:
    return _ratio(c.tp, c.tp + c.fp)


def recall(c: Confusion) -> float:
    return _ratio(c.tp, c.tp + c.fn)


def specificity(c: Confusion) -> float:
    """Recall of the negative class: TN / (TN + FP)."""
    return _ratio(c.tn, c.tn + c.fp)


def f1(c: Confusion) -> float:
    """2TP / (2TP + FP + FN), scikit-learn's formula (0 when there are no positives at all)."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def balanced_accuracy(c: Confusion) -> float:
    """Mean recall over the classes present in y_true (scikit-learn's `balanced_accuracy_score`)."""
    per_class = [recall(c)] if c.tp + c.fn > 0 else []
    per_class += [specificity(c)] if c.tn + c.fp > 0 else []
    return float(np.mean(per_class)) if per_class else 0.0


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float | None:
    """Area under the ROC curve; ties count one half; None when y_true has a single class."""
    t = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int((t == 1).sum())
    n_neg = int((t == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U from average ranks (ties share the mean rank, i.e. count 1/2 per tied pair).
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    u = ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class BinaryMetrics:
    """Metrics of one binary classifier on one set of judged examples."""

    accuracy: float
    precision: float
    recall: float
    specificity: float
    f1: float
    balanced_accuracy: float
    """(recall + specificity) / 2 when both classes are present; Delphi's reported "accuracy"."""
    auc: float | None
    """ROC AUC of the scores; None without scores or with a single class."""
    n_pos: int
    """Judged positive examples (failed judgements excluded)."""
    n_neg: int
    """Judged negative examples (failed judgements excluded)."""
    n_failed: int
    """Examples whose judgement failed (unparseable answer, request error); excluded from every metric."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def binary_metrics(
    y_true: ArrayLike, y_pred: ArrayLike, scores: ArrayLike | None = None, n_failed: int = 0
) -> BinaryMetrics:
    """All metrics of one classifier; `scores` (higher = more positive) give the AUC."""
    c = confusion(y_true, y_pred)
    return BinaryMetrics(
        accuracy=accuracy(c),
        precision=precision(c),
        recall=recall(c),
        specificity=specificity(c),
        f1=f1(c),
        balanced_accuracy=balanced_accuracy(c),
        auc=roc_auc(y_true, scores) if scores is not None else None,
        n_pos=c.tp + c.fn,
        n_neg=c.tn + c.fp,
        n_failed=n_failed,
    )


MEAN_FIELDS = ("accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy", "auc")


def macro_mean(per_group: Sequence[BinaryMetrics]) -> dict[str, float | None]:
    """Unweighted mean of each metric over groups (latents); AUC over the groups where it is defined."""
    out: dict[str, float | None] = {}
    for name in MEAN_FIELDS:
        values = [getattr(m, name) for m in per_group if getattr(m, name) is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


def bootstrap_ci(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    metric: Callable[[Confusion], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a confusion-based metric (examples resampled)."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if len(t) == 0:
        raise ValueError("bootstrap_ci needs at least one example")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(n_boot, len(t)))
    values = [metric(confusion(t[i], p[i])) for i in idx]
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


class PairedDifference(NamedTuple):
    """Mean of a - b over paired items with a percentile bootstrap interval (items resampled with their pair)."""

    mean_a: float
    mean_b: float
    diff: float
    lo: float
    hi: float
    n: int


def paired_bootstrap(
    a: ArrayLike, b: ArrayLike, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> PairedDifference:
    """Paired bootstrap of mean(a - b): the same items are drawn for both sides, so the interval reflects how the
    two differ item by item (per latent), not the spread of either alone. An interval that excludes 0 is a
    difference the items support at level 1 - alpha."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"paired_bootstrap needs two 1-D arrays of equal length, got {x.shape} and {y.shape}"
        )
    if len(x) == 0:
        raise ValueError("paired_bootstrap needs at least one pair")
    d = x - y
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [alpha / 2, 1 - alpha / 2])
    return PairedDifference(float(x.mean()), float(y.mean()), float(d.mean()), float(lo), float(hi), len(d))
