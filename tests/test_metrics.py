"""The paper's metrics against scikit-learn's (the oracle) and a naive confusion-matrix loop."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from ssl_kvasir.metrics import (
    METRIC_KEYS,
    classification_metrics,
    confusion_matrix,
    metrics_from_confusion,
    per_class_report,
)


def _labels(rng: np.random.Generator, n: int, n_classes: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """A (y_true, y_pred) pair of one of several shapes that stress the zero-division conventions."""
    if mode == "uniform":
        return rng.integers(0, n_classes, n), rng.integers(0, n_classes, n)
    if mode == "imbalanced":
        # Geometric class sizes, like HyperKvasir's 6 to 1,148 images per class; predictions mostly right.
        p = 0.5 ** np.arange(n_classes)
        y_true = rng.choice(n_classes, n, p=p / p.sum())
        y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, n_classes, n))
        return y_true, y_pred
    if mode == "missing":
        # Some classes in neither array, some only in y_true, some only in y_pred.
        half = max(1, n_classes // 2)
        return rng.integers(0, half, n), rng.integers(max(0, n_classes - half - 1), n_classes, n)
    if mode == "one_class_pred":
        return rng.integers(0, n_classes, n), np.full(n, rng.integers(0, n_classes))
    if mode == "perfect":
        y = rng.integers(0, n_classes, n)
        return y, y.copy()
    raise AssertionError(mode)


def _sklearn(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    labels = list(range(n_classes))
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true", "a single label was found": exactly the cases whose
        # conventions we check.
        warnings.simplefilter("ignore")
        out = {"accuracy": skm.accuracy_score(y_true, y_pred)}
        for average in ("macro", "micro"):
            p, r, f, _ = skm.precision_recall_fscore_support(
                y_true, y_pred, labels=labels, average=average, zero_division=0
            )
            out |= {f"{average}_precision": p, f"{average}_recall": r, f"{average}_f1": f}
        out["balanced_accuracy"] = skm.balanced_accuracy_score(y_true, y_pred)
        out["mcc"] = skm.matthews_corrcoef(y_true, y_pred)
    return out


MODES = ("uniform", "imbalanced", "missing", "one_class_pred", "perfect")


@pytest.mark.parametrize(("n", "n_classes"), list(itertools.product((1, 2, 9, 60, 700), (1, 2, 3, 7, 23))))
def test_metrics_equal_sklearn(n: int, n_classes: int) -> None:
    rng = np.random.default_rng(1000 * n + n_classes)
    for mode in MODES:
        y_true, y_pred = _labels(rng, n, n_classes, mode)
        ours = classification_metrics(y_true, y_pred, n_classes)
        theirs = _sklearn(y_true, y_pred, n_classes)
        assert set(ours) == set(METRIC_KEYS)
        for key in METRIC_KEYS:
            assert ours[key] == pytest.approx(theirs[key], abs=1e-12), (mode, key, ours[key], theirs[key])
            assert isinstance(ours[key], float)


def test_per_class_report_equals_sklearn() -> None:
    rng = np.random.default_rng(3)
    for mode in MODES:
        y_true, y_pred = _labels(rng, 300, 11, mode)
        cm = confusion_matrix(y_true, y_pred, 11)
        rows = per_class_report(cm, [f"c{i}" for i in range(11)])
        p, r, f, s = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(11)), average=None, zero_division=0
        )
        assert [row["class"] for row in rows] == [f"c{i}" for i in range(11)]
        np.testing.assert_allclose([row["precision"] for row in rows], p, atol=1e-12)
        np.testing.assert_allclose([row["recall"] for row in rows], r, atol=1e-12)
        np.testing.assert_allclose([row["f1"] for row in rows], f, atol=1e-12)
        assert [row["support"] for row in rows] == list(s)


def test_paper_majority_row_convention() -> None:
    """One class predicted for everything: macro P is that class's precision / C (the paper's 0.108 / 23)."""
    y_true = np.array([0] * 8 + [1] * 70 + [2] * 22)
    m = classification_metrics(y_true, np.full(100, 1), 23)
    assert m["macro_precision"] == pytest.approx(0.70 / 23)
    assert m["macro_recall"] == pytest.approx(1 / 23)
    assert m["micro_f1"] == pytest.approx(0.70)
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)  # only the 3 classes present in y_true
    assert m["mcc"] == 0.0


@pytest.mark.parametrize(("n", "n_classes"), [(0, 3), (1, 1), (50, 4), (400, 23)])
def test_confusion_matrix_equals_naive_loop(n: int, n_classes: int) -> None:
    rng = np.random.default_rng(n)
    y_true, y_pred = rng.integers(0, n_classes, n), rng.integers(0, n_classes, n)
    naive = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        naive[t, p] += 1
    cm = confusion_matrix(y_true, y_pred, n_classes)
    assert cm.shape == (n_classes, n_classes)
    np.testing.assert_array_equal(cm, naive)


def test_mcc_does_not_overflow_on_large_counts() -> None:
    # 10^6 images: s^2 * s^2 = 10^24 would overflow int64 arithmetic.
    cm = np.array([[400_000, 100_000], [50_000, 450_000]])
    y_true = np.repeat([0, 0, 1, 1], [400_000, 100_000, 50_000, 450_000])
    y_pred = np.repeat([0, 1, 0, 1], [400_000, 100_000, 50_000, 450_000])
    assert metrics_from_confusion(cm)["mcc"] == pytest.approx(
        skm.matthews_corrcoef(y_true, y_pred), abs=1e-12
    )


@pytest.mark.parametrize(
    ("y_true", "y_pred", "n_classes", "match"),
    [
        ([0, 1], [0], 2, "2 labels but y_pred has 1"),
        ([0, 3], [0, 1], 3, "class index 3"),
        ([0, -1], [0, 1], 3, "class index -1"),
        ([0.0, 1.0], [0, 1], 2, "integer class indices"),
    ],
)
def test_confusion_matrix_rejects_bad_labels(y_true, y_pred, n_classes, match) -> None:
    with pytest.raises(ValueError, match=match):
        confusion_matrix(np.array(y_true), np.array(y_pred), n_classes)


@pytest.mark.parametrize("cm", [np.zeros((3, 3)), np.ones((2, 3)), np.array([[1, -1], [0, 2]])])
def test_metrics_reject_bad_confusion(cm) -> None:
    with pytest.raises(ValueError):
        metrics_from_confusion(cm)
