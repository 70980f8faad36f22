"""Review priority: the score against its formula, the coverage order against a naive greedy loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ssl_kvasir.analysis.priority import coverage_order, priority_scores, review_order
from ssl_kvasir.errors import ConfigError


def test_priority_is_the_weighted_mean_of_the_three_signals():
    margin = np.array([0.9, 0.1, np.nan, 0.5])
    agrees = pd.array([True, False, pd.NA, False], dtype="boolean")
    outlier = np.array([0.0, 0.5, 1.0, np.nan])
    got = priority_scores(
        margin, agrees, outlier, margin_weight=2.0, disagreement_weight=1.0, outlier_weight=1.0
    )
    expected = [(2 * 0.1 + 0 + 0) / 4, (2 * 0.9 + 1 + 0.5) / 4, (0 + 0 + 1.0) / 4, (2 * 0.5 + 1 + 0) / 4]
    np.testing.assert_allclose(got, expected)
    with pytest.raises(ConfigError):
        priority_scores(margin, agrees, outlier, margin_weight=0, disagreement_weight=0, outlier_weight=0)


def _naive_order(scores, features, coverage, neighbours):
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    cand = np.argsort(-scores, kind="stable")
    sims = x[cand] @ x[cand].T  # (M, M) in candidate-rank order
    nearest = np.zeros(len(cand))
    chosen, order = np.zeros(len(cand), bool), []
    k = min(neighbours + 1, len(cand))
    for _ in range(len(cand)):
        values = np.where(chosen, -np.inf, scores[cand] * (1 - coverage * np.maximum(0, nearest)))
        r = int(np.argmax(values))  # ties: the higher priority (lower rank)
        chosen[r] = True
        order.append(r)
        for j in np.argsort(-sims[r])[:k]:
            if j != r:
                nearest[j] = max(nearest[j], sims[r, j])
    return cand[order]


@pytest.mark.parametrize(("coverage", "neighbours"), [(1.0, 5), (0.5, 3), (1.0, 100)])
def test_coverage_order_matches_a_naive_greedy_loop(coverage, neighbours):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    features = (centres[rng.integers(0, 6, 80)] + 0.3 * rng.normal(size=(80, 16))).astype(np.float32)
    scores = rng.random(80)
    got = coverage_order(scores, features, coverage=coverage, neighbours=neighbours, candidates=None)
    np.testing.assert_array_equal(got, _naive_order(scores, features, coverage, neighbours))


def test_coverage_pushes_a_near_duplicate_back_and_candidates_bound_the_work():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 8))
    features = np.concatenate([base, base[:1] + 1e-4]).astype(np.float32)  # image 4 duplicates image 0
    scores = np.array([0.9, 0.5, 0.4, 0.3, 0.89])
    assert coverage_order(scores, features, coverage=0.0).tolist() == [0, 4, 1, 2, 3]
    assert coverage_order(scores, features, coverage=1.0).tolist() == [0, 1, 2, 3, 4]
    # Only the 2 best are ordered for coverage; the rest follow by priority.
    assert coverage_order(scores, features, coverage=1.0, candidates=2).tolist() == [0, 4, 1, 2, 3]


def test_review_order_reads_the_table_columns():
    table = pd.DataFrame(
        {
            "margin": [0.9, 0.1, 0.9],
            "knn_agrees": pd.array([True, True, False], dtype="boolean"),
            "outlier_score": [np.nan, np.nan, np.nan],
        }
    )
    features = np.eye(3, dtype=np.float32)
    order, scores = review_order(table, features)
    assert order.tolist() == [2, 1, 0]
    np.testing.assert_allclose(scores, [0.1 / 3, 0.9 / 3, 1.1 / 3])
