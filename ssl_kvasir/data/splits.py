"""Splits for one experiment, cut from a training fold.

The paper's protocol trains on one fold and evaluates on the other; the evaluation fold is only ever read by
the final test. Model selection needs labeled images too, and where they come from decides what a result at a
small label budget means. Oliver et al. (2018), "Realistic evaluation of deep semi-supervised learning
algorithms", point out that a validation set larger than the labeled training set is unrealistic: whoever has
that many labels trains on them, and model selection on them flatters low-budget results. So by default
(``val_policy="budget"``) the validation images are part of the label budget: a run at fraction f, or at N
images per class, has exactly the labeled images that a user with that budget has, split into training and
validation. ``"none"`` trains on the whole budget and keeps the last weights (the FixMatch
paper reports its final EMA weights); ``"fold"`` carves validation out of the whole training fold, outside the
budget (this toolkit's former behaviour, an explicit opt-in).

Labeled subsets are nested: for one seed, every class is shuffled once and a budget takes the first ``n_c``
images of that order, so the 5 % budget contains the 1 % budget. Under ``budget`` the images of that order are
also assigned to validation once and for all (every ``1 / val_fraction``-th one), so the training part and
the validation part are each nested as well.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ssl_kvasir.data.archive import Catalog
from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.names import EVERY_LABEL, VAL_POLICIES, LabelBudget

log = logging.getLogger("ssl_kvasir")


@dataclass(frozen=True)
class ExperimentSplit:
    """Row indices into ``Catalog.images`` for each part of one experiment.

    Attributes:
        labeled: the labeled training subset.
        rest: the training-fold images that are neither labeled training nor validation images (they may join
            the unlabeled pool).
        val: the validation images (model selection).
        test: the evaluation fold.
        unlabeled: the archive's unlabeled images.
        budget: the label budget it was cut to.
        identity: a SHA-256 of the images of its labeled, validation and evaluation parts (path and class
            name of each), which tells two splits apart whatever their settings (another archive, split file,
            classes or folds).
        settings: the arguments of :func:`make_split` that cut it (``eval_fold``, ``val_policy``,
            ``val_fraction``, ``label_budget`` as a record, ``seed``), so that it can be cut again
            (:func:`rebuild_split`).
    """

    labeled: np.ndarray
    rest: np.ndarray
    val: np.ndarray
    test: np.ndarray
    unlabeled: np.ndarray
    budget: LabelBudget
    identity: str
    settings: dict = field(default_factory=dict)

    @property
    def n_labels_used(self) -> int:
        """Labeled images the run uses in all: training plus validation (not the budget itself, which is
        :attr:`budget`)."""
        return int(len(self.labeled) + len(self.val))

    def record(self) -> dict:
        """The settings, the identity and the sizes of the parts: what a checkpoint stores about its split."""
        return {
            **self.settings,
            "identity": self.identity,
            "n_labels_used": self.n_labels_used,
            "n_labeled": int(len(self.labeled)),
            "n_val": int(len(self.val)),
        }


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


def subset_sizes(available: np.ndarray, budget: LabelBudget) -> np.ndarray:
    """How many labeled images each class keeps: ``round(fraction * n)`` or the images per class, at least 1,
    never more than the class has."""
    if budget.label_fraction is not None:
        wanted = np.round(budget.label_fraction * available).astype(np.int64)
    else:
        wanted = np.full_like(available, budget.labels_per_class)
    return np.minimum(np.maximum(wanted, 1), available)


def split_identity(catalog: Catalog, parts: dict[str, np.ndarray]) -> str:
    """SHA-256 over each part's images, by name: its path and class name, in path order."""
    images = catalog.images
    paths, labels = images.path.to_numpy(), images.label.to_numpy()
    names = catalog.classes.names
    digest = hashlib.sha256()
    for part, rows in parts.items():
        digest.update(f"[{part}]\n".encode())
        for path, label in sorted(zip(paths[rows].tolist(), labels[rows].tolist(), strict=True)):
            digest.update(f"{path}\t{names[label]}\n".encode())
    return digest.hexdigest()


def n_validation(budget: int, val_fraction: float) -> int:
    """Validation images among the first ``budget`` images of a class's order under ``val_policy=budget``:
    ``val_fraction * budget`` rounded half up, leaving at least one image for training.

    It grows by 0 or 1 with the budget, so position ``k`` of the order is a validation image exactly when
    ``n_validation(k + 1) > n_validation(k)``: a fixed assignment, whatever the budget.
    """
    return min(math.floor(budget * val_fraction + 0.5), max(budget - 1, 0))


def _budget_parts(order: np.ndarray, budget: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows of one class: the first ``budget`` rows of its order, every position at
    which :func:`n_validation` steps up going to validation."""
    steps = np.diff([n_validation(k, val_fraction) for k in range(budget + 1)])  # (budget,) 0 or 1
    head = order[:budget]
    return head[steps == 0], head[steps == 1]


def make_split(
    catalog: Catalog,
    eval_fold: int,
    val_fraction: float = 0.1,
    budget: LabelBudget = EVERY_LABEL,
    seed: int = 0,
    val_policy: str = "budget",
) -> ExperimentSplit:
    """Cut the training folds of ``catalog`` into labeled training images, validation images and rest.

    Args:
        catalog: the archive with folds.
        eval_fold: the evaluation fold; every other fold trains.
        val_fraction: ``budget``: the share of each class's labeled budget used for validation (rounded half
            up; a class whose budget is too small to spare an image keeps all of it for training). ``fold``:
            the share of each class's training-fold images held out (at least one image stays in training).
            Unused under ``none``.
        budget: the label budget: a share of each class's training-fold images (``fold``: of those left
            after the validation carve), or a number of labeled images per class.
        seed: the seed of the subsets and of the validation carve (``data.seed``).
        val_policy: ``budget`` (validation inside the label budget), ``none`` (no validation: the whole
            budget trains) or ``fold`` (validation from the whole training fold, outside the budget).

    Raises:
        ConfigError: for an unknown policy, a fold the split does not have, or classes with no training
            image at all (named).
    """
    if val_policy not in VAL_POLICIES:
        raise ConfigError(f"unknown data.val_policy {val_policy!r}; valid: {', '.join(VAL_POLICIES)}")
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

    # Two independent streams, so that the fold policy's validation carve does not depend on the budget.
    val_rng, subset_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    val: list[np.ndarray] = []
    if val_policy == "fold":
        train = []
        for rows in _per_class_order(labels, train_rows, num_classes, val_rng):
            n_val = min(int(round(val_fraction * len(rows))), max(len(rows) - 1, 0))
            val.append(rows[:n_val])
            train.append(np.sort(rows[n_val:]))
        train_rows = np.concatenate(train)
    available = np.bincount(labels[train_rows], minlength=num_classes)  # (C,)
    empty = [catalog.classes[c].folder for c in np.flatnonzero(available == 0)]
    if empty:
        raise ConfigError(
            f"no training image at all for classes {', '.join(empty)} with fold {eval_fold} held out: "
            "a labeled subset cannot keep one image of every class"
        )
    sizes = subset_sizes(available, budget)  # (C,) the budget of each class
    per_class = budget.labels_per_class
    if per_class is not None and (short := np.flatnonzero(available < per_class)).size:
        log.warning(
            "data.labels_per_class=%d: %d classes have fewer training images and keep all they have (%s); "
            "the results record the counts used (labels_per_class_used)",
            per_class,
            len(short),
            ", ".join(f"{catalog.classes[c].folder}: {available[c]}" for c in short),
        )
    ordered = _per_class_order(labels, train_rows, num_classes, subset_rng)
    labeled = []
    for rows, n in zip(ordered, sizes, strict=True):
        if val_policy == "budget":
            lb, vl = _budget_parts(rows, int(n), val_fraction)
            labeled.append(lb)
            val.append(vl)
        else:
            labeled.append(rows[:n])
    rest = [rows[n:] for rows, n in zip(ordered, sizes, strict=True)]
    parts = {
        "labeled": np.sort(np.concatenate(labeled)),
        "val": np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64),
        "test": test_rows,
    }
    return ExperimentSplit(
        **parts,
        rest=np.sort(np.concatenate(rest)),
        unlabeled=np.flatnonzero(labels < 0),
        budget=budget,
        identity=split_identity(catalog, parts),
        settings={
            "eval_fold": int(eval_fold),
            "val_policy": val_policy,
            "val_fraction": float(val_fraction),
            "label_budget": budget.record(),
            "seed": int(seed),
        },
    )


def rebuild_split(catalog: Catalog, record: dict, source: str) -> ExperimentSplit:
    """Cut again the split described by ``record`` (:meth:`ExperimentSplit.record`, e.g. from a checkpoint)
    and check that it holds the same images (:attr:`ExperimentSplit.identity`).

    Args:
        catalog: the archive, as loaded for this command.
        record: the stored settings and identity.
        source: what the record came from (named in errors).

    Raises:
        DataError: when the record lacks settings, or the split cut from this archive holds other images
            (another archive, split file, classes or data seed).
    """
    keys = ("eval_fold", "val_policy", "val_fraction", "label_budget", "seed", "identity")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{source} does not record its split (no {', '.join(missing)})")
    try:
        budget = LabelBudget.from_record(record["label_budget"])
    except ConfigError as e:
        raise DataError(f"{source}: {e}") from None
    split = make_split(
        catalog,
        eval_fold=record["eval_fold"],
        val_fraction=record["val_fraction"],
        budget=budget,
        seed=record["seed"],
        val_policy=record["val_policy"],
    )
    if split.identity != record["identity"]:
        found = split.record()
        sizes = ", ".join(f"{k} {found[k]} (recorded {record.get(k)})" for k in ("n_labeled", "n_val"))
        raise DataError(
            f"{source}: the split cut from this archive holds other images than the recorded one ({sizes}; "
            "another archive, split file, class list or data.seed?)"
        )
    return split
