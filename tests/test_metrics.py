"""Parity of saelab.metrics with scikit-learn (the reference implementation) on random label sets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from saelab import metrics as M

labels = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(labels)
def test_confusion_metrics_equal_sklearn(pairs: list[tuple[int, int]]) -> None:
    y_true = [a for a, _ in pairs]
    y_pred = [b for _, b in pairs]
    c = M.confusion(y_true, y_pred)
    assert c.tp + c.fp + c.tn + c.fn == len(pairs)
    kw = {"zero_division": 0, "labels": [0, 1]}
    assert M.accuracy(c) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert M.precision(c) == pytest.approx(skm.precision_score(y_true, y_pred, **kw))
    assert M.recall(c) == pytest.approx(skm.recall_score(y_true, y_pred, **kw))
    assert M.specificity(c) == pytest.approx(skm.recall_score(y_true, y_pred, pos_label=0, **kw))
    assert M.f1(c) == pytest.approx(skm.f1_score(y_true, y_pred, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when y_pred has a class y_true lacks
        assert M.balanced_accuracy(c) == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])), min_size=1))
def test_roc_auc_equals_sklearn_with_ties(pairs: list[tuple[int, float]]) -> None:
    y_true = [a for a, _ in pairs]
    scores = [s for _, s in pairs]
    auc = M.roc_auc(y_true, scores)
    if len(set(y_true)) < 2:
        assert auc is None  # sklearn raises: AUC is undefined with one class
    else:
        assert auc == pytest.approx(skm.roc_auc_score(y_true, scores))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.floats(-5, 5, allow_nan=False)), min_size=2))
def test_roc_auc_equals_sklearn_continuous(pairs: list[tuple[int, float]]) -> None:
    y_true = [a for a, _ in pairs]
    scores = [s for _, s in pairs]
    if len(set(y_true)) == 2:
        assert M.roc_auc(y_true, scores) == pytest.approx(skm.roc_auc_score(y_true, scores))


def test_binary_metrics_and_macro_mean() -> None:
    m1 = M.binary_metrics([1, 1, 0, 0], [1, 0, 0, 0], scores=[0.9, 0.4, 0.3, 0.1], n_failed=2)
    assert (m1.n_pos, m1.n_neg, m1.n_failed) == (2, 2, 2)
    assert m1.balanced_accuracy == pytest.approx(0.75)
    assert m1.auc == pytest.approx(1.0)
    m2 = M.binary_metrics([1, 0], [0, 1])
    assert m2.auc is None
    macro = M.macro_mean([m1, m2])
    assert macro["balanced_accuracy"] == pytest.approx(0.375)
    assert macro["auc"] == pytest.approx(1.0)  # mean over latents where AUC is defined


@pytest.mark.bad_input
def test_confusion_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        M.confusion([1, 0], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        M.confusion([2], [1])


def test_bootstrap_ci_brackets_point_estimate() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 200)
    y_pred = np.where(rng.random(200) < 0.8, y_true, 1 - y_true)
    lo, hi = M.bootstrap_ci(y_true, y_pred, M.balanced_accuracy, n_boot=300)
    point = M.balanced_accuracy(M.confusion(y_true, y_pred))
    assert lo <= point <= hi
    assert 0.6 < lo < hi < 0.95


def test_paired_bootstrap_pairs_items() -> None:
    """Two noisy score lists that differ by a constant per item: the paired interval is tight around it, far
    narrower than the spread of either list would allow."""
    from saelab.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, 40)
    a = b + 0.05
    d = paired_bootstrap(a, b, seed=1)
    assert (d.n, d.diff) == (40, pytest.approx(0.05)) and d.lo == pytest.approx(0.05) == d.hi
    noisy = paired_bootstrap(b + rng.normal(0.05, 0.1, 40), b, seed=1)
    assert noisy.lo < noisy.diff < noisy.hi and noisy.hi - noisy.lo < 0.15
    with pytest.raises(ValueError, match="equal in length"):
        paired_bootstrap([1.0, 2.0], [1.0])


# ---- class_report: any classifier, binary and multiclass, against scikit-learn ----

multiclass = st.integers(1, 4).flatmap(
    lambda k: st.lists(st.tuples(st.integers(0, k), st.integers(0, k)), min_size=1, max_size=80)
)


def _check_against_sklearn(y_true: list, y_pred: list) -> M.ClassReport:
    r = M.class_report(y_true, y_pred)
    labels = sorted(set(y_true) | set(y_pred))
    assert list(r.labels) == labels
    p, rec, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert [m.precision for m in r.per_class] == pytest.approx(list(p))
    assert [m.recall for m in r.per_class] == pytest.approx(list(rec))
    assert [m.f1 for m in r.per_class] == pytest.approx(list(f))
    assert [m.support for m in r.per_class] == list(s)
    assert np.array_equal(np.array(r.confusion), skm.confusion_matrix(y_true, y_pred, labels=labels))
    assert r.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert r.macro_f1 == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert r.weighted_f1 == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted", zero_division=0))
    assert r.macro_precision == pytest.approx(
        skm.precision_score(y_true, y_pred, average="macro", zero_division=0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when y_pred has a class y_true lacks
        assert r.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    # one-vs-rest specificity is the recall of "not this class"
    for m in r.per_class:
        t = [int(v != m.label) for v in y_true]
        q = [int(v != m.label) for v in y_pred]
        assert m.specificity == pytest.approx(skm.recall_score(t, q, zero_division=0))
    assert set(r.unseen_predicted) == set(y_pred) - set(y_true)
    return r


@settings(max_examples=150, deadline=None)
@given(multiclass)
def test_class_report_equals_sklearn(pairs: list[tuple[int, int]]) -> None:
    """Binary (k=1), multiclass, single-class and predicted-but-never-true label sets alike."""
    r = _check_against_sklearn([a for a, _ in pairs], [b for _, b in pairs])
    if len(r.labels) == 2:
        y_true = [a for a, _ in pairs]
        y_pred = [b for _, b in pairs]
        pos = r.positive
        kw = {"zero_division": 0, "pos_label": pos}
        assert r.recall == pytest.approx(skm.recall_score(y_true, y_pred, **kw, average="binary"))
        neg = next(lab for lab in r.labels if lab != pos)
        assert r.specificity == pytest.approx(
            skm.recall_score(y_true, y_pred, zero_division=0, pos_label=neg, average="binary")
        )
        assert r.balance_gap == pytest.approx(abs(r.recall - r.specificity))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["cat", "dog", "eel"]), st.sampled_from(["cat", "dog", "eel"])), min_size=1
    )
)
def test_class_report_string_labels(pairs: list[tuple[str, str]]) -> None:
    _check_against_sklearn([a for a, _ in pairs], [b for _, b in pairs])


probs = st.floats(0, 1, allow_nan=False) | st.sampled_from([0.0, 0.1, 0.5, 0.7, 1.0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1), probs), min_size=1, max_size=80))
def test_binary_probabilities_auc_and_calibration(rows: list[tuple[int, int, float]]) -> None:
    y_true = [a for a, _, _ in rows]
    y_pred = [b for _, b, _ in rows]
    prob = [p for _, _, p in rows]
    r = M.class_report(y_true, y_pred, prob=prob)
    if len(r.labels) < 2:
        return
    if len(set(y_true)) == 2:
        assert r.auc == pytest.approx(skm.roc_auc_score(y_true, prob))
        prob_true, prob_pred = calibration_curve(y_true, prob, n_bins=10)
        assert [b[1] for b in r.reliability] == pytest.approx(list(prob_true))
        assert [b[0] for b in r.reliability] == pytest.approx(list(prob_pred))
    else:
        assert r.auc is None
    assert sum(b[2] for b in r.reliability) == len(rows)
    expected = sum(n / len(rows) * abs(obs - pr) for pr, obs, n in r.reliability)
    assert r.ece == pytest.approx(expected)
    assert 0 <= r.ece <= 1


def test_ece_of_known_predictions() -> None:
    # all at 0.8 confidence, 60% correct: ECE = 0.2; perfectly calibrated bins give 0
    assert M.reliability_bins([1, 1, 1, 0, 0], [0.8] * 5)[1] == pytest.approx(0.2)
    assert M.reliability_bins([1, 0, 1, 0], [0.5] * 4)[1] == pytest.approx(0.0)
    r = M.class_report([0, 1, 2, 2], [0, 1, 2, 1], prob=[1.0, 1.0, 1.0, 1.0])  # top-label: 3 of 4 right
    assert r.ece == pytest.approx(0.25) and r.positive is None


def test_class_report_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no predictions"):
        M.class_report([], [])
    with pytest.raises(ValueError, match="differ in length"):
        M.class_report([1, 0], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.class_report([1, 0], [1, 0], prob=[0.5, 1.5])
