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
    """mean(a - b) over paired items (latents) with its paired bootstrap interval (`paired_bootstrap_delta`): an
    interval that excludes 0 is a difference the items support at level 1 - alpha."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    diff, lo, hi = paired_bootstrap_delta(y, x, n_boot=n_boot, alpha=alpha, seed=seed)
    return PairedDifference(float(x.mean()), float(y.mean()), diff, lo, hi, len(x))


@dataclass(frozen=True)
class ClassMetrics:
    """One class scored one-vs-rest."""

    label: Any
    precision: float
    recall: float
    f1: float
    specificity: float
    """Recall of "not this class": TN / (TN + FP) one-vs-rest."""
    support: int
    """Examples whose true label is this class."""


@dataclass(frozen=True)
class ClassReport:
    """A classifier's metrics on one set of predictions, equal to scikit-learn's (labels: `unique_labels`)."""

    labels: tuple[Any, ...]
    """Every label in y_true or y_pred, sorted; the rows and columns of `confusion`."""
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]
    """confusion[i][j]: examples of true label i predicted as j (scikit-learn's `confusion_matrix`)."""
    n: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_f1: float
    """F1 per class weighted by support."""
    balanced_accuracy: float
    """Mean recall over the classes present in y_true (scikit-learn's `balanced_accuracy_score`)."""
    specificity: float
    """Binary: specificity of the positive class (TN/(TN+FP)); multiclass: macro mean of one-vs-rest specificity."""
    recall: float
    """Binary: recall of the positive class; multiclass: macro recall."""
    balance_gap: float
    """|recall − specificity| (as defined above): large when a classifier leans to one answer."""
    positive: Any
    """The positive label of a binary report (None for multiclass)."""
    unseen_predicted: tuple[Any, ...]
    """Labels the classifier predicted that never occur in y_true."""
    auc: float | None = None
    """Binary ROC AUC of the scores/probabilities; None without them or with a single class in y_true."""
    ece: float | None = None
    """Expected calibration error (10 equal-width bins) when probabilities exist."""
    reliability: tuple[tuple[float, float, int], ...] = ()
    """Non-empty bins of the reliability diagram: (mean predicted probability, observed frequency, count)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sort_labels(values: set[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types: order by their text
        return sorted(values, key=str)


def confusion_matrix(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any]) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[index[t], index[p]] += 1
    return cm


def reliability_bins(
    y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10
) -> tuple[tuple[tuple[float, float, int], ...], float]:
    """Reliability diagram bins and ECE = Σ_b (n_b / n) |observed_b − predicted_b|.

    Equal-width bins closed on the right, as scikit-learn's `calibration_curve(strategy="uniform")`; `y_true`
    is 1 where the event happened (the positive class, or "the prediction was right" for top-label calibration)."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], p)
    total = np.bincount(ids, minlength=n_bins)
    pred = np.bincount(ids, weights=p, minlength=n_bins)
    true = np.bincount(ids, weights=t, minlength=n_bins)
    bins = tuple(
        (float(pred[b] / total[b]), float(true[b] / total[b]), int(total[b]))
        for b in range(n_bins)
        if total[b] > 0
    )
    ece = float(sum(n / len(p) * abs(obs - pr) for pr, obs, n in bins)) if len(p) else 0.0
    return bins, ece


def positive_label(labels: Sequence[Any]) -> Any:
    """The positive class of a two-label problem: 1 / "1" / true / yes / pos when present, else the larger label."""
    for cand in (1, "1", True, "true", "True", "yes", "pos", "positive"):
        if any(lab == cand and type(lab) is type(cand) for lab in labels):
            return cand
    return _sort_labels(set(labels))[-1]


def class_report(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    prob: Sequence[float] | None = None,
    scores: Sequence[float] | None = None,
    n_bins: int = 10,
) -> ClassReport:
    """Per-class and overall metrics of one classifier.

    The problem is binary when y_true and y_pred hold exactly two labels together (the positive one chosen by
    `positive_label`); then `prob` is P(positive) and `scores` any real score (higher = more positive; AUC only).
    Otherwise `prob` is the confidence in y_pred (top-label calibration), and recall and specificity are macro
    means over the labels."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length ({len(y_true)} vs {len(y_pred)})")
    if len(y_true) == 0:
        raise ValueError("no predictions to score")
    true_set = set(y_true)
    labels = _sort_labels(true_set | set(y_pred))
    cm = confusion_matrix(y_true, y_pred, labels)
    n = int(cm.sum())
    per = []
    for i, lab in enumerate(labels):
        tp = int(cm[i, i])
        c = Confusion(
            tp=tp,
            fp=int(cm[:, i].sum()) - tp,
            fn=int(cm[i, :].sum()) - tp,
            tn=n - int(cm[i, :].sum() + cm[:, i].sum()) + tp,
        )
        per.append(ClassMetrics(lab, precision(c), recall(c), f1(c), specificity(c), c.tp + c.fn))
    support = np.array([m.support for m in per], dtype=np.float64)
    present = [m.recall for m in per if m.support > 0]
    pos = positive_label(labels) if len(labels) == 2 else None
    if pos is not None:
        pm = next(m for m in per if m.label == pos)
        rec, spec = pm.recall, pm.specificity
    else:
        rec = float(np.mean([m.recall for m in per]))
        spec = float(np.mean([m.specificity for m in per]))
    auc: float | None = None
    ece: float | None = None
    rel: tuple[tuple[float, float, int], ...] = ()
    if pos is not None:
        is_pos = [int(t == pos) for t in y_true]
        if scores is not None:
            auc = roc_auc(is_pos, scores)
        if prob is not None:
            auc = roc_auc(is_pos, prob) if auc is None else auc
            rel, ece = reliability_bins(is_pos, prob, n_bins)
    elif prob is not None:
        correct = [int(t == p) for t, p in zip(y_true, y_pred)]
        rel, ece = reliability_bins(correct, prob, n_bins)
    return ClassReport(
        labels=tuple(labels),
        per_class=tuple(per),
        confusion=tuple(tuple(int(v) for v in row) for row in cm),
        n=n,
        accuracy=float(np.trace(cm) / n),
        macro_precision=float(np.mean([m.precision for m in per])),
        macro_recall=float(np.mean([m.recall for m in per])),
        macro_f1=float(np.mean([m.f1 for m in per])),
        weighted_f1=float(np.dot([m.f1 for m in per], support) / support.sum()),
        balanced_accuracy=float(np.mean(present)),
        specificity=spec,
        recall=rec,
        balance_gap=abs(rec - spec),
        positive=pos,
        unseen_predicted=tuple(lab for lab in labels if lab not in true_set),
        auc=auc,
        ece=ece,
        reliability=rel,
    )


def paired_bootstrap_delta(
    a: ArrayLike,
    b: ArrayLike,
    stat: Callable[[np.ndarray], np.ndarray] = lambda x: x.mean(axis=-1),
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """stat(b) − stat(a) and its percentile bootstrap CI, resampling the *pairs* (a_i, b_i) together.

    a_i and b_i are the same unit (a latent) measured before and after; resampling pairs keeps what the two
    share (an easy latent is easy in both), so the interval measures the change, not the spread of latents.
    `stat` maps an (..., n) array to (...), e.g. the mean or the share above a threshold."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and equal in length ({x.shape} vs {y.shape})")
    if len(x) == 0:
        raise ValueError("paired_bootstrap_delta needs at least one pair")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    deltas = stat(y[idx]) - stat(x[idx])
    lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return float(stat(y) - stat(x)), float(lo), float(hi)
