"""Experiment splits: validation carve, nested label subsets, the evaluation fold untouched."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ssl_kvasir.data.archive import Catalog
from ssl_kvasir.data.classes import ClassTable
from ssl_kvasir.data.splits import make_split
from ssl_kvasir.errors import ConfigError


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parts_are_disjoint_and_eval_fold_untouched(seed):
    cat = _catalog()
    s = make_split(cat, eval_fold=1, val_fraction=0.2, label_fraction=0.3, seed=seed)
    parts = [s.labeled, s.rest, s.val, s.test, s.unlabeled]
    everything = np.concatenate(parts)
    assert len(everything) == len(set(everything)) == len(cat.images)
    folds = cat.images.fold.to_numpy()
    assert (folds[s.test] == 1).all()
    assert (folds[np.concatenate([s.labeled, s.rest, s.val])] == 0).all()


def test_subsets_are_nested_stratified_and_keep_every_class():
    cat = _catalog()
    labels = cat.images.label.to_numpy()
    fractions = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
    splits = [make_split(cat, 0, label_fraction=f, seed=3) for f in fractions]
    for small, big in zip(splits, splits[1:], strict=False):
        assert set(small.labeled) <= set(big.labeled)
        assert (small.val == big.val).all()  # the carve does not depend on the fraction
    for f, s in zip(fractions, splits, strict=True):
        counts = np.bincount(labels[s.labeled], minlength=4)
        available = np.bincount(labels[np.concatenate([s.labeled, s.rest])], minlength=4)
        assert (counts >= 1).all()
        assert (counts == np.clip(np.round(f * available), 1, available)).all()
    lpc = [make_split(cat, 0, label_fraction=None, labels_per_class=n, seed=3) for n in (1, 2, 4)]
    assert set(lpc[0].labeled) <= set(lpc[1].labeled) <= set(lpc[2].labeled)
    available = np.bincount(labels[np.concatenate([lpc[1].labeled, lpc[1].rest])], minlength=4)
    assert (np.bincount(labels[lpc[1].labeled], minlength=4) == np.minimum(2, available)).all()


def test_seed_changes_subset_and_repeats():
    cat = _catalog()
    a, b, c = (make_split(cat, 0, label_fraction=0.1, seed=s) for s in (0, 0, 1))
    assert (a.labeled == b.labeled).all() and (a.val == b.val).all()
    assert set(a.labeled) != set(c.labeled)


def test_bad_split_requests():
    cat = _catalog()
    with pytest.raises(ConfigError, match=r"data.fold=2, but the split has folds 0..1"):
        make_split(cat, 2)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"label_fraction must be in \(0, 1\]"):
            make_split(cat, 0, label_fraction=bad)
    with pytest.raises(ConfigError, match="exactly one"):
        make_split(cat, 0, label_fraction=0.5, labels_per_class=3)
    empty = _catalog(counts=(3, 8, 40, 200))
    empty.images.loc[empty.images.label == 0, "fold"] = 1
    with pytest.raises(ConfigError, match="no training image at all for classes a"):
        make_split(empty, 1)
