"""The paper's metrics (Table 3 of Borgli et al. 2020), computed from a confusion matrix.

Every metric here is a function of the ``(C, C)`` confusion matrix (rows = true class, columns = predicted
class), so one ``np.bincount`` over the predictions is all the work; nothing imports scikit-learn at run time.

Conventions (each equals scikit-learn's with ``labels=range(C)`` and ``zero_division=0``; the tests check
this on random inputs):

- **Macro averages run over all C classes**, including classes that appear neither in ``y_true`` nor in
  ``y_pred``. A class that is never predicted has precision 0, a class without true images has recall 0, and
  F1 is ``2 TP / (2 TP + FP + FN)``, 0 when that denominator is 0. The paper needs this: its majority-class
  row reports macro precision 0.004, which is the one predicted class's precision (0.108) divided by 23, so
  the 22 never-predicted classes count as precision 0, not as "undefined and left out".
- **Micro precision, recall and F1** pool TP, FP and FN over the classes. With one label per image and every
  label in ``range(C)`` they all equal the accuracy.
- **Balanced accuracy** is scikit-learn's ``balanced_accuracy_score``: the mean recall over the classes
  present in ``y_true`` (a class with no true images has no recall to average, so it is left out here,
  unlike in the macro recall).
- **MCC** is Gorodkin's multi-class R_K (the paper's "MCC"), as ``sklearn.metrics.matthews_corrcoef``:
  ``(c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t))`` with ``c`` correct predictions, ``s`` samples, ``t`` and
  ``p`` the true and predicted class counts; 0 when a denominator factor is 0 (one class predicted, or one
  class present), where the paper writes "n/a".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_KEYS = (
    "mcc",
    "macro_f1",
    "micro_f1",
    "macro_precision",
    "macro_recall",
    "micro_precision",
    "micro_recall",
    "balanced_accuracy",
    "accuracy",
)
"""The keys of :func:`metrics_from_confusion` (and of ``results.json``'s ``metrics``)."""


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Count (true class, predicted class) pairs.

    Args:
        y_true: true class indices, shape ``(N,)``, each in ``range(num_classes)``.
        y_pred: predicted class indices, shape ``(N,)``, each in ``range(num_classes)``.
        num_classes: C.

    Returns:
        an ``int64`` array of shape ``(C, C)``: ``cm[i, j]`` = images of class ``i`` predicted as ``j``.

    Raises:
        ValueError: when the arrays differ in length or hold an index outside ``range(num_classes)``.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{name} holds class index {y.min() if y.min() < 0 else y.max()}, outside 0..{num_classes - 1}"
            )
    # One flat bincount over the pair index i * C + j is the whole confusion matrix.
    flat = y_true.astype(np.int64) * num_classes + y_pred.astype(np.int64)  # (N,)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 (zero where undefined), true counts and predicted counts."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)  # (C,)
    support = cm.sum(axis=1)  # (C,) true images per class
    predicted = cm.sum(axis=0)  # (C,) predictions per class
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        # 2TP / (2TP + FP + FN) = 2TP / (support + predicted): scikit-learn's form, defined even where P or R is not.
        denom = support + predicted
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    return precision, recall, f1, support, predicted


def _check_confusion(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square (C, C) with C >= 1, got shape {cm.shape}")
    if (cm < 0).any():
        raise ValueError("a confusion matrix cannot hold negative counts")
    if cm.sum() == 0:
        raise ValueError("the confusion matrix is empty: no images to score")
    return cm


def metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """The paper's metrics from a confusion matrix (conventions in the module docstring).

    Args:
        cm: counts of shape ``(C, C)``, rows = true class, columns = predicted class.

    Returns:
        ``{key: float}`` for every key of :data:`METRIC_KEYS`.

    Raises:
        ValueError: when ``cm`` is not square, holds negative counts or counts nothing.
    """
    cm = _check_confusion(cm)
    precision, recall, f1, support, predicted = _per_class(cm)
    n = float(cm.sum())
    correct = float(np.trace(cm))
    accuracy = correct / n
    # Float products: s^2 * s^2 overflows int64 already at a few tens of thousands of images.
    t, p = support, predicted  # (C,), (C,)
    cov_tp = correct * n - float(t @ p)
    cov_pp = n * n - float(p @ p)
    cov_tt = n * n - float(t @ t)
    mcc = 0.0 if cov_pp * cov_tt == 0 else cov_tp / np.sqrt(cov_tt * cov_pp)
    return {
        "mcc": float(mcc),
        "macro_f1": float(f1.mean()),
        "micro_f1": accuracy,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "micro_precision": accuracy,
        "micro_recall": accuracy,
        "balanced_accuracy": float(recall[support > 0].mean()),
        "accuracy": accuracy,
    }


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """:func:`metrics_from_confusion` of :func:`confusion_matrix` ``(y_true, y_pred, num_classes)``."""
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


def per_class_report(cm: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """One row per class: ``{"class", "precision", "recall", "f1", "support"}`` (zero where undefined).

    Raises:
        ValueError: when ``class_names`` does not have one name per row of ``cm``.
    """
    cm = _check_confusion(cm)
    if len(class_names) != cm.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {cm.shape[0]}x{cm.shape[0]} confusion matrix")
    precision, recall, f1, support, _ = _per_class(cm)
    return [
        {"class": str(name), "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    ]
