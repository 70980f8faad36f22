"""Suspect labels in the labeled set: stratified parts, out-of-fold probabilities and cleanlab's confident learning.

Confident learning (Northcutt et al. 2021, "Confident Learning: Estimating Uncertainty in Dataset Labels")
needs, for every labeled image, class probabilities from a model that did not train on that image: "we
obtain out-of-sample predicted probabilities via cross-validation". :func:`stratified_parts` cuts the labeled
images into the k parts of that cross-validation; :func:`rank_label_issues` hands the out-of-fold
probabilities to cleanlab's ``find_label_issues``, which ranks the images whose given label they contradict.

Who computes the probabilities is the run layer's choice (:mod:`ssl_kvasir.run.label_issues`): k fits of the
whole network, or :func:`out_of_fold_probs`, k multinomial logistic regressions on frozen features. The
features must come from a network that never saw these labels: a network fine-tuned on them has fitted the
wrong ones too, and heads on its features would call them right.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ssl_kvasir.analysis._optional import import_optional
from ssl_kvasir.errors import ConfigError, DataError


def stratified_parts(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """The part (``0..folds-1``) of each image in a seeded stratified k-fold split: every class spread over
    the parts as evenly as it can be (a class with fewer than k images lands in fewer parts).

    Args:
        labels: ``(N,)`` given class indices.
        folds: k.
        seed: seed of the assignment.

    Returns:
        ``(N,)`` int64 part indices.

    Raises:
        ConfigError: for fewer than 2 folds, or more folds than images.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, dtype=np.int64)
    if folds < 2:
        raise ConfigError(f"label issues need at least 2 folds, got {folds}")
    if folds > len(labels):
        raise ConfigError(f"label_issues.folds={folds}, but there are only {len(labels)} labeled images")
    parts = np.empty(len(labels), dtype=np.int64)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only m members": such a class is simply in fewer parts.
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        for part, (_, held_out) in enumerate(split.split(np.zeros((len(labels), 1)), labels)):
            parts[held_out] = part
    return parts


def out_of_fold_probs(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    parts: np.ndarray,
    regularization: float = 1.0,
) -> np.ndarray:
    """Class probabilities of every image from a logistic regression trained on the other parts.

    Args:
        features: ``(N, D)`` embeddings (L2-normalised here, as the kNN uses them).
        labels: ``(N,)`` given class indices in ``0..num_classes - 1``.
        num_classes: C.
        parts: ``(N,)`` the part of each image (:func:`stratified_parts`).
        regularization: inverse L2 strength ``C`` of scikit-learn's ``LogisticRegression``.

    Returns:
        ``(N, C)`` float64 probabilities; the columns of classes a part's training images lack are 0.

    Raises:
        DataError: for mismatched lengths or labels outside ``0..C-1``.
    """
    from sklearn.linear_model import LogisticRegression

    from ssl_kvasir.analysis.knn import l2_normalize

    labels = np.asarray(labels, dtype=np.int64)
    if len(features) != len(labels) or labels.ndim != 1 or len(parts) != len(labels):
        raise DataError(f"{len(features)} feature rows and {len(parts)} parts for {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in 0..{num_classes - 1}")
    x = l2_normalize(features)  # (N, D)
    probs = np.zeros((len(labels), num_classes))  # (N, C)
    with warnings.catch_warnings():
        # A tiny labeled set has more classes than half its images; the regression is a classifier all the same.
        warnings.filterwarnings("ignore", message=".*number of unique classes is greater than 50%.*")
        for part in np.unique(parts):
            held_out, train = parts == part, parts != part
            head = LogisticRegression(C=regularization, max_iter=1000)
            head.fit(x[train], labels[train])
            probs[np.ix_(held_out, head.classes_)] = head.predict_proba(x[held_out])  # (n_out, C_seen)
    return probs


def rank_label_issues(labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """The labels cleanlab's ``find_label_issues`` flags, worst first.

    Args:
        labels: ``(N,)`` given class indices.
        probs: ``(N, C)`` out-of-fold probabilities (k fits, or :func:`out_of_fold_probs`).

    Returns:
        one row per flagged image, most likely mislabeled first (cleanlab's ranking by self-confidence, the
        out-of-fold probability of the given label): ``position`` (row of ``labels``), ``given``,
        ``suggested`` (the most probable class), ``label_quality`` (the given label's probability).
    """
    cleanlab_filter = import_optional("cleanlab.filter", "pip install cleanlab")
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(labels), probs.shape[1] if probs.ndim == 2 else -1):
        raise DataError(f"probabilities {probs.shape} do not match {len(labels)} labels")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="cleanlab")
        ranked = cleanlab_filter.find_label_issues(
            labels=labels, pred_probs=probs, return_indices_ranked_by="self_confidence"
        )
    ranked = np.asarray(ranked, dtype=np.int64)
    return pd.DataFrame(
        {
            "position": ranked,
            "given": labels[ranked],
            "suggested": probs[ranked].argmax(axis=1),
            "label_quality": probs[ranked, labels[ranked]],
        }
    )
