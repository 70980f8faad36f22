"""Out-of-fold probabilities and cleanlab's ranking find labels flipped on purpose."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_kvasir.analysis.label_noise import out_of_fold_probs, rank_label_issues, stratified_parts
from ssl_kvasir.errors import ConfigError


def test_flipped_labels_are_found_from_out_of_fold_probabilities():
    rng = np.random.default_rng(0)
    n_classes, per_class = 5, 40
    centres = 3 * rng.normal(size=(n_classes, 12))
    labels = np.repeat(np.arange(n_classes), per_class)
    features = centres[labels] + rng.normal(size=(len(labels), 12))
    flipped = rng.choice(len(labels), size=20, replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, n_classes, size=20)) % n_classes
    probs = out_of_fold_probs(features, noisy, n_classes, parts=stratified_parts(noisy, 5, seed=0))
    assert probs.shape == (len(labels), n_classes)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)  # float32 features
    issues = rank_label_issues(noisy, probs)
    found = set(issues.position.tolist())
    recall = len(found & set(flipped.tolist())) / len(flipped)
    precision = len(found & set(flipped.tolist())) / len(found)
    assert recall >= 0.9 and precision >= 0.8, (recall, precision)
    # Ranked by self-confidence: the given label's probability rises down the list, and the suggestion is the
    # true class for the flipped ones.
    assert np.all(np.diff(issues.label_quality.to_numpy()) >= 0)
    true_of = dict(zip(flipped.tolist(), labels[flipped].tolist(), strict=True))
    hits = [s == true_of[p] for p, s in zip(issues.position, issues.suggested, strict=True) if p in true_of]
    assert np.mean(hits) >= 0.9


def test_stratified_parts_spread_every_class_over_the_parts():
    labels = np.repeat(np.arange(3), [10, 7, 2])  # a class smaller than k lands in fewer parts
    parts = stratified_parts(labels, 5, seed=1)
    assert parts.shape == labels.shape and set(parts.tolist()) == set(range(5))
    for c, n in enumerate([10, 7, 2]):
        counts = np.bincount(parts[labels == c], minlength=5)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(parts, stratified_parts(labels, 5, seed=1))  # seeded
    assert not np.array_equal(parts, stratified_parts(labels, 5, seed=2))


@pytest.mark.parametrize(("folds", "message"), [(1, "at least 2 folds"), (20, "only 19 labeled images")])
def test_stratified_parts_refuse_impossible_folds(folds, message):
    with pytest.raises(ConfigError, match=message):
        stratified_parts(np.zeros(19, dtype=np.int64), folds)
