"""Parity of saelab.metrics with scikit-learn (the reference implementation) on random label sets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

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
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([1.0, 2.0], [1.0])
