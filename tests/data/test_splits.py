"""Experiment splits: validation inside the label budget (or not), nested subsets, the evaluation fold
untouched."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ssl_kvasir.data.archive import Catalog
from ssl_kvasir.data.classes import ClassTable
from ssl_kvasir.data.splits import VAL_POLICIES, make_split, n_validation, rebuild_split
from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.names import FRACTION, PER_CLASS, LabelBudget


def frac(f: float) -> LabelBudget:
    return LabelBudget(FRACTION, f)


def lpc(n: int) -> LabelBudget:
    return LabelBudget(PER_CLASS, n)


def _catalog(counts=(3, 8, 40, 200), n_unlabeled=30, seed=0) -> Catalog:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    folds = np.concatenate([rng.permutation(np.arange(n) % 2) for n in counts])  # every class in both folds
    n = len(labels)
    images = pd.DataFrame(
        {
            "filename": [f"{i}.jpg" for i in range(n + n_unlabeled)],
            "path": [f"x/{i}.jpg" for i in range(n + n_unlabeled)],
            "label": np.concatenate([labels, -np.ones(n_unlabeled, int)]),
            "fold": np.concatenate([folds, -np.ones(n_unlabeled, int)]),
        }
    )
    return Catalog(root=".", classes=ClassTable.from_names("abcd"), images=images, n_folds=2)


def _train_counts(cat: Catalog, eval_fold: int) -> np.ndarray:
    """Training-fold images per class, counted naively."""
    return np.array(
        [
            sum(
                1
                for lab, f in zip(cat.images.label, cat.images.fold, strict=True)
                if lab == c and f not in (-1, eval_fold)
            )
            for c in range(4)
        ]
    )


@pytest.mark.parametrize("policy", VAL_POLICIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parts_are_disjoint_and_eval_fold_untouched(seed, policy):
    cat = _catalog()
    s = make_split(cat, eval_fold=1, val_fraction=0.2, budget=frac(0.3), seed=seed, val_policy=policy)
    parts = [s.labeled, s.rest, s.val, s.test, s.unlabeled]
    everything = np.concatenate(parts)
    assert len(everything) == len(set(everything)) == len(cat.images)
    folds = cat.images.fold.to_numpy()
    assert (folds[s.test] == 1).all()
    assert (folds[np.concatenate([s.labeled, s.rest, s.val])] == 0).all()
    assert s.n_labels_used == len(s.labeled) + len(s.val)
    assert (len(s.val) == 0) == (policy == "none")


def test_n_validation_is_rounded_half_up_and_leaves_one_for_training():
    assert [n_validation(b, 0.1) for b in range(0, 26)] == [0] * 5 + [1] * 10 + [2] * 10 + [3]
    assert [n_validation(b, 0.5) for b in range(6)] == [0, 0, 1, 2, 2, 3]  # 1 -> 0: the one image trains
    assert [n_validation(b, 0.9) for b in range(5)] == [0, 0, 1, 2, 3]
    assert all(n_validation(b, 0.0) == 0 for b in range(50))


@pytest.mark.parametrize("val_fraction", [0.1, 0.25, 0.5])
def test_budget_policy_validation_is_inside_the_budget(val_fraction):
    cat = _catalog()
    labels = cat.images.label.to_numpy()
    available = _train_counts(cat, 0)
    for f in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        s = make_split(cat, 0, val_fraction=val_fraction, budget=frac(f), seed=3)
        budget = np.clip(np.round(f * available), 1, available)  # what a user with fraction f has
        lb = np.bincount(labels[s.labeled], minlength=4)
        vl = np.bincount(labels[s.val], minlength=4)
        assert (lb + vl == budget).all()
        assert s.n_labels_used == budget.sum() == len(s.labeled) + len(s.val)
        # validation: val_fraction of the class's budget, rounded half up, one image left for training
        naive = [min(int(np.floor(val_fraction * b + 0.5)), b - 1) for b in budget]
        assert vl.tolist() == naive
        assert (lb >= 1).all()
        assert s.record()["n_labels_used"] == budget.sum()
        assert s.record()["label_budget"] == {"kind": "fraction", "amount": f, "id": f"frac{f:g}"}


@pytest.mark.parametrize("policy", VAL_POLICIES)
def test_subsets_are_nested_across_budgets(policy):
    cat = _catalog()
    fractions = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
    splits = [make_split(cat, 0, budget=frac(f), seed=3, val_policy=policy) for f in fractions]
    per_class = [make_split(cat, 0, budget=lpc(n), seed=3, val_policy=policy) for n in (1, 2, 4, 8, 20, 50)]
    for series in (splits, per_class):
        for small, big in zip(series, series[1:], strict=False):
            assert set(small.labeled) <= set(big.labeled)
            assert set(small.val) <= set(big.val)
            assert set(big.rest) <= set(small.rest)


def test_fold_policy_carves_validation_outside_the_budget():
    cat = _catalog()
    labels = cat.images.label.to_numpy()
    fractions = [0.01, 0.1, 1.0]
    splits = [make_split(cat, 0, budget=frac(f), seed=3, val_policy="fold") for f in fractions]
    for s in splits:
        assert (s.val == splits[0].val).all()  # the carve does not depend on the budget
    available = _train_counts(cat, 0)
    n_val = [min(round(0.1 * n), n - 1) for n in available]
    assert np.bincount(labels[splits[0].val], minlength=4).tolist() == n_val
    for f, s in zip(fractions, splits, strict=True):
        counts = np.bincount(labels[s.labeled], minlength=4)
        left = available - np.array(n_val)
        assert (counts == np.clip(np.round(f * left), 1, left)).all()


def test_none_policy_trains_on_the_whole_budget():
    cat = _catalog()
    labels = cat.images.label.to_numpy()
    s = make_split(cat, 0, budget=lpc(4), seed=1, val_policy="none")
    available = _train_counts(cat, 0)
    assert np.bincount(labels[s.labeled], minlength=4).tolist() == np.minimum(4, available).tolist()
    assert len(s.val) == 0 and s.n_labels_used == len(s.labeled)
    budget = make_split(cat, 0, budget=lpc(4), seed=1)
    assert set(s.labeled) == set(budget.labeled) | set(budget.val)  # the same labeled images


def test_seed_changes_subset_and_repeats():
    cat = _catalog()
    a, b, c = (make_split(cat, 0, budget=frac(0.1), seed=s) for s in (0, 0, 1))
    assert (a.labeled == b.labeled).all() and (a.val == b.val).all()
    assert set(a.labeled) != set(c.labeled)


def test_rebuild_split_from_its_record():
    cat = _catalog()
    s = make_split(cat, 1, budget=frac(0.25), seed=5, val_policy="budget")
    again = rebuild_split(cat, s.record(), source="ckpt")
    assert (again.labeled == s.labeled).all() and (again.val == s.val).all()
    assert again.identity == s.identity and again.budget == s.budget
    other = _catalog(counts=(3, 8, 40, 100))
    with pytest.raises(DataError, match=r"ckpt: the split cut from this archive holds other images"):
        rebuild_split(other, s.record(), source="ckpt")
    with pytest.raises(DataError, match=r"ckpt does not record its split \(no val_policy"):
        rebuild_split(cat, {k: v for k, v in s.record().items() if k != "val_policy"}, source="ckpt")


def test_the_identity_tells_splits_apart_whatever_their_settings():
    """The same settings on another fold assignment, other class names or another evaluation fold give another
    identity; the same images give the same one."""
    cat = _catalog()
    s = make_split(cat, 1, budget=frac(0.5), seed=5)
    assert make_split(_catalog(), 1, budget=frac(0.5), seed=5).identity == s.identity
    swapped = _catalog()
    swapped.images["fold"] = swapped.images.fold.map({0: 1, 1: 0, -1: -1})
    renamed = _catalog()
    renamed.classes = ClassTable.from_names("wxyz")
    for other in (
        make_split(swapped, 1, budget=frac(0.5), seed=5),
        make_split(renamed, 1, budget=frac(0.5), seed=5),
    ):
        assert other.identity != s.identity
    assert make_split(cat, 0, budget=frac(0.5), seed=5).identity != s.identity


def test_bad_split_requests():
    cat = _catalog()
    with pytest.raises(ConfigError, match=r"data.fold=2, but the split has folds 0..1"):
        make_split(cat, 2)
    with pytest.raises(ConfigError, match=r"unknown data.val_policy 'train'; valid: budget, none, fold"):
        make_split(cat, 0, val_policy="train")
    empty = _catalog(counts=(3, 8, 40, 200))
    empty.images.loc[empty.images.label == 0, "fold"] = 1
    with pytest.raises(ConfigError, match="no training image at all for classes a"):
        make_split(empty, 1)


@pytest.mark.parametrize(
    ("fraction", "per_class", "named"),
    [
        (0.0, None, r"data.label_fraction must be in \(0, 1\]"),
        (1.5, None, r"data.label_fraction must be in \(0, 1\]"),
        (None, 0, r"data.labels_per_class must be an integer >= 1"),
        (0.5, 3, "exactly one of data.label_fraction and data.labels_per_class"),
        (None, None, "exactly one of data.label_fraction and data.labels_per_class"),
    ],
)
def test_the_label_budget_is_checked_once_when_it_is_made(fraction, per_class, named):
    with pytest.raises(ConfigError, match=named):
        LabelBudget.from_settings(fraction, per_class)


def test_the_label_budget_has_one_id_and_record():
    assert LabelBudget.from_settings(0.1, None).id == "frac0.1"
    assert LabelBudget.from_settings(None, 25).id == "lpc25"
    for budget in (frac(0.05), lpc(25), frac(1.0)):
        assert LabelBudget.from_record(budget.record()) == budget
    with pytest.raises(ConfigError, match="its id should be 'lpc25'"):
        LabelBudget.from_record({"kind": "per_class", "amount": 25, "id": "lpc5"})
