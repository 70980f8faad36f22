"""Out-of-fold probabilities and cleanlab's ranking find labels flipped on purpose."""

from __future__ import annotations

import numpy as np

from ssl_kvasir.analysis.label_noise import out_of_fold_probs, rank_label_issues


def test_flipped_labels_are_found_from_out_of_fold_probabilities():
    rng = np.random.default_rng(0)
    n_classes, per_class = 5, 40
    centres = 3 * rng.normal(size=(n_classes, 12))
    labels = np.repeat(np.arange(n_classes), per_class)
    features = centres[labels] + rng.normal(size=(len(labels), 12))
    flipped = rng.choice(len(labels), size=20, replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, n_classes, size=20)) % n_classes
    probs = out_of_fold_probs(features, noisy, n_classes, folds=5, seed=0)
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
