"""Splits for one experiment, cut from a training fold.

The paper's protocol trains on one fold and evaluates on the other. Model selection needs data too: a
stratified, seeded validation part carved out of the training folds. The evaluation fold is only ever read by
the final test. Labeled subsets for label-efficiency curves are nested: for one seed, every class is shuffled
once and a subset takes the first ``n_c`` images of that order, so the 5 % subset contains the 1 % subset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssl_kvasir.data.archive import Catalog
from ssl_kvasir.errors import ConfigError


@dataclass(frozen=True)
class ExperimentSplit:
    """Row indices into ``Catalog.images`` for each part of one experiment.

    Attributes:
        labeled: the labeled training subset.
        rest: the training-fold images left out of the labeled subset (they may join the unlabeled pool).
        val: the validation part of the training folds (model selection).
        test: the evaluation fold.
        unlabeled: the archive's unlabeled images.
    """

    labeled: np.ndarray
    rest: np.ndarray
    val: np.ndarray
    test: np.ndarray
    unlabeled: np.ndarray


def unlabeled_pool(
    split: ExperimentSplit, use_archive_unlabeled: bool = True, unlabeled_rest: bool = True
) -> np.ndarray:
    """Catalog rows of the unlabeled pool: the archive's unlabeled images and/or the training images left
    out of the labeled subset (whose labels are then used only to measure pseudo-label accuracy)."""
    parts = [split.unlabeled] * use_archive_unlabeled + [split.rest] * unlabeled_rest
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _per_class_order(
    labels: np.ndarray, rows: np.ndarray, num_classes: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """For each class, its rows in one seeded random order."""
    return [rng.permutation(rows[labels[rows] == c]) for c in range(num_classes)]


def subset_sizes(
    available: np.ndarray, label_fraction: float | None, labels_per_class: int | None
) -> np.ndarray:
    """How many labeled images each class keeps: ``round(fraction * n)`` or ``labels_per_class``, at least 1,
    never more than the class has."""
    if (label_fraction is None) == (labels_per_class is None):
        raise ConfigError("set exactly one of data.label_fraction and data.labels_per_class")
    if label_fraction is not None:
        if not 0 < label_fraction <= 1:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {label_fraction}")
        wanted = np.round(label_fraction * available).astype(np.int64)
    else:
        if labels_per_class < 1:
            raise ConfigError(f"data.labels_per_class must be at least 1, got {labels_per_class}")
        wanted = np.full_like(available, labels_per_class)
    return np.minimum(np.maximum(wanted, 1), available)


def make_split(
    catalog: Catalog,
    eval_fold: int,
    val_fraction: float = 0.1,
    label_fraction: float | None = 1.0,
    labels_per_class: int | None = None,
    seed: int = 0,
) -> ExperimentSplit:
    """Cut the training folds of ``catalog`` into validation, labeled subset and rest.

    Args:
        catalog: the archive with folds.
        eval_fold: the evaluation fold; every other fold trains.
        val_fraction: share of each training class held out for model selection (at least one image of a
            class always stays in training).
        label_fraction: share of each class's remaining training images that keep their label.
        labels_per_class: instead of a fraction, this many labeled images per class.
        seed: the seed of the validation carve and of the subsets (``data.seed``).

    Raises:
        ConfigError: for a fold the split does not have, a fraction outside (0, 1], or classes with no
            training image at all (named).
    """
    if not 0 <= eval_fold < catalog.n_folds:
        raise ConfigError(f"data.fold={eval_fold}, but the split has folds 0..{catalog.n_folds - 1}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    images = catalog.images
    labels = images.label.to_numpy()
    folds = images.fold.to_numpy()
    num_classes = len(catalog.classes)
    train_rows = np.flatnonzero((labels >= 0) & (folds >= 0) & (folds != eval_fold))
    test_rows = np.flatnonzero((labels >= 0) & (folds == eval_fold))

    # Two independent streams, so that the validation carve does not depend on the label fraction.
    val_rng, subset_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    val, train = [], []
    for rows in _per_class_order(labels, train_rows, num_classes, val_rng):
        n_val = min(int(round(val_fraction * len(rows))), max(len(rows) - 1, 0))
        val.append(rows[:n_val])
        train.append(np.sort(rows[n_val:]))
    available = np.array([len(r) for r in train])
    empty = [catalog.classes[c].folder for c in np.flatnonzero(available == 0)]
    if empty:
        raise ConfigError(
            f"no training image at all for classes {', '.join(empty)} with fold {eval_fold} held out: "
            "a labeled subset cannot keep one image of every class"
        )
    sizes = subset_sizes(available, label_fraction, labels_per_class)
    ordered = _per_class_order(labels, np.concatenate(train), num_classes, subset_rng)
    labeled = np.sort(np.concatenate([rows[:n] for rows, n in zip(ordered, sizes, strict=True)]))
    rest = np.sort(np.concatenate([rows[n:] for rows, n in zip(ordered, sizes, strict=True)]))
    return ExperimentSplit(
        labeled=labeled,
        rest=rest,
        val=np.sort(np.concatenate(val)),
        test=test_rows,
        unlabeled=np.flatnonzero(labels < 0),
    )
