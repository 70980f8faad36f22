"""The paper's trivial baselines, computed from the split file alone, and the paper's Table 3.

Both baselines follow the paper's protocol: for each fold k, "train" on the other folds, predict fold k,
score it with :func:`ssl_kvasir.metrics.metrics_from_confusion`, and average the metrics over the folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_kvasir.data.archive import read_split_file
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassTable
from ssl_kvasir.errors import DataError
from ssl_kvasir.metrics import METRIC_KEYS, confusion_matrix, metrics_from_confusion

PAPER_TABLE3: dict[str, dict[str, float | None] | None] = {
    "ResNet-50": {
        "macro_precision": 0.589,
        "macro_recall": 0.536,
        "macro_f1": 0.530,
        "micro_f1": 0.839,
        "mcc": 0.826,
    },
    "ResNet-152": {
        "macro_precision": 0.639,
        "macro_recall": 0.605,
        "macro_f1": 0.606,
        "micro_f1": 0.906,
        "mcc": 0.898,
    },
    "DenseNet-161": {
        "macro_precision": 0.640,
        "macro_recall": 0.616,
        "macro_f1": 0.619,
        "micro_f1": 0.907,
        "mcc": 0.899,
    },
    "ResNet-152 + DenseNet-161 averaged": {
        "macro_precision": 0.633,
        "macro_recall": 0.615,
        "macro_f1": 0.617,
        "micro_f1": 0.910,
        "mcc": 0.902,
    },
    # The paper lists this system, but its figures are not in our dataset notes: no row to compare with.
    "ResNet-152 + DenseNet-161 + MLP": None,
    "random guessing": {
        "macro_precision": 0.044,
        "macro_recall": 0.038,
        "macro_f1": 0.034,
        "micro_f1": 0.044,
        "mcc": 0.000,
    },
    # The paper writes "n/a" for this MCC: one predicted class makes R_K's denominator 0.
    "majority class": {
        "macro_precision": 0.004,
        "macro_recall": 0.043,
        "macro_f1": 0.008,
        "micro_f1": 0.108,
        "mcc": None,
    },
}
"""Table 3 of Borgli et al. 2020 (HyperKvasir), averages of the two folds, keyed by the paper's row name.

Each row holds ``macro_precision, macro_recall, macro_f1, micro_f1, mcc`` as printed (3 decimals; ``None``
where the paper has no figure). The paper rounds its figures down in places: the majority-class macro
precision, 0.108 / 23 = 0.0047, is printed as 0.004.
"""


def _mean_metrics(per_fold: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([m[key] for m in per_fold])) for key in METRIC_KEYS}


def _check_split(
    labels: np.ndarray, folds: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels, folds = np.asarray(labels).ravel(), np.asarray(folds).ravel()
    if labels.shape != folds.shape:
        raise ValueError(f"{labels.size} labels but {folds.size} fold indices")
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError(
            f"the baselines need at least 2 folds (train on the others, evaluate on one); got {fold_ids.size}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return labels, folds, fold_ids


def majority_class_baseline(labels: np.ndarray, folds: np.ndarray, num_classes: int) -> dict[str, float]:
    """Predict the training folds' most frequent class for every image of the evaluation fold.

    Args:
        labels: class index of every labeled image, shape ``(N,)``.
        folds: fold index of every image, shape ``(N,)`` (at least two distinct folds).
        num_classes: C; the macro averages run over all C classes.

    Returns:
        the metrics of :func:`ssl_kvasir.metrics.metrics_from_confusion`, averaged over the folds.
    """
    labels, folds, fold_ids = _check_split(labels, folds, num_classes)
    per_fold = []
    for k in fold_ids:
        train, evaluate = labels[folds != k], labels[folds == k]
        # argmax takes the lowest index on a tie: deterministic, and no tie occurs in HyperKvasir's split.
        majority = int(np.argmax(np.bincount(train, minlength=num_classes)))
        per_fold.append(
            metrics_from_confusion(confusion_matrix(evaluate, np.full_like(evaluate, majority), num_classes))
        )
    return _mean_metrics(per_fold)


def random_guess_repeats(
    labels: np.ndarray, folds: np.ndarray, num_classes: int, seed: int, n_repeats: int = 1
) -> list[dict[str, float]]:
    """Uniform random guessing, repeated: one fold-averaged metrics dict per repeat.

    Every evaluation image gets a class drawn uniformly from ``range(num_classes)``. All repeats draw from one
    generator seeded with ``seed``, so the list is reproducible; the spread across it is the baseline's
    sampling noise.
    """
    labels, folds, fold_ids = _check_split(labels, folds, num_classes)
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be at least 1, got {n_repeats}")
    rng = np.random.default_rng(seed)
    repeats = []
    for _ in range(n_repeats):
        per_fold = []
        for k in fold_ids:
            evaluate = labels[folds == k]  # (N_k,)
            guess = rng.integers(0, num_classes, evaluate.size)  # (N_k,)
            per_fold.append(metrics_from_confusion(confusion_matrix(evaluate, guess, num_classes)))
        repeats.append(_mean_metrics(per_fold))
    return repeats


@dataclass(frozen=True)
class BaselineResult:
    """One baseline row computed from a split file.

    Attributes:
        name: the paper's row name (a key of :data:`PAPER_TABLE3`).
        metrics: the metrics averaged over folds (and repeats).
        std: the standard deviation of each metric across repeats (``None`` for a deterministic baseline):
            the spread a single run of the baseline, such as the paper's, shows around ``metrics``.
        n_repeats: repeats averaged (1 for a deterministic baseline).
        folds: the evaluation folds averaged.
    """

    name: str
    metrics: dict[str, float]
    std: dict[str, float] | None
    n_repeats: int
    folds: tuple[int, ...]


def split_file_baselines(
    path: Path, classes: ClassTable = HYPERKVASIR_CLASSES, seed: int = 0, n_repeats: int = 100
) -> list[BaselineResult]:
    """Both baselines of the paper from an official split file: majority class, then random guessing.

    Args:
        path: a split file (``file-name;class-name;split-index``).
        classes: the class table the split file's names belong to; C = ``len(classes)``.
        seed: seed of the random guesses.
        n_repeats: repeats of random guessing to average; its ``std`` needs at least 2.

    Raises:
        DataError: naming the file, when it cannot be read or has fewer than two folds.
    """
    split = read_split_file(Path(path), classes)
    labels, folds = split.label.to_numpy(), split.fold.to_numpy()  # (N,), (N,)
    fold_ids = tuple(int(k) for k in np.unique(folds))
    if len(fold_ids) < 2:
        raise DataError(f"{path}: the baselines need at least 2 folds, the split file has {len(fold_ids)}")
    majority = majority_class_baseline(labels, folds, len(classes))
    repeats = random_guess_repeats(labels, folds, len(classes), seed=seed, n_repeats=n_repeats)
    std = (
        {key: float(np.std([r[key] for r in repeats], ddof=1)) for key in METRIC_KEYS}
        if n_repeats > 1
        else None
    )
    return [
        BaselineResult(name="majority class", metrics=majority, std=None, n_repeats=1, folds=fold_ids),
        BaselineResult(
            name="random guessing",
            metrics=_mean_metrics(repeats),
            std=std,
            n_repeats=n_repeats,
            folds=fold_ids,
        ),
    ]
