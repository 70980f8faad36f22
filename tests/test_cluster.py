"""UMAP repeatability, HDBSCAN on separated blobs (with and without the hdbscan package), cluster purity."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from ssl_kvasir.analysis.cluster import cluster_purity, hdbscan_cluster, umap_embed
from ssl_kvasir.errors import ConfigError, DataError


def _blobs(n_per: int = 60, dim: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    centers = np.pad(centers, ((0, 0), (0, dim - 2)))  # (3, dim)
    points = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centers])  # (3 n_per, dim)
    return points, np.repeat(np.arange(3), n_per)


def test_umap_is_repeatable_with_a_seed_and_keeps_blobs_apart() -> None:
    rng = np.random.default_rng(0)
    directions = np.eye(16)[:3] * 10  # three well separated directions for the cosine metric
    truth = np.repeat(np.arange(3), 50)
    features = (directions[truth] + rng.normal(size=(150, 16))).astype(np.float16)  # (150, 16)
    first = umap_embed(features, n_components=2, seed=7, n_neighbors=10)
    second = umap_embed(features, n_components=2, seed=7, n_neighbors=10)
    assert first.shape == (150, 2) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    labels, _ = hdbscan_cluster(first, min_cluster_size=20)
    assert adjusted_rand_score(truth, labels) > 0.95


def test_umap_needs_more_points_than_neighbours() -> None:
    with pytest.raises(ConfigError, match="needs more than 15 points, got 10"):
        umap_embed(np.ones((10, 3)), n_neighbors=15)


@pytest.mark.parametrize("backend", ["hdbscan", "sklearn"])
def test_hdbscan_recovers_separated_blobs(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "sklearn":
        monkeypatch.setitem(sys.modules, "hdbscan", None)  # `import hdbscan` fails: the fallback runs
    points, truth = _blobs()
    rng = np.random.default_rng(1)
    outliers = rng.uniform(-200, 200, size=(3, 2)) + 300  # far from everything
    labels, scores = hdbscan_cluster(np.concatenate([points, outliers]), min_cluster_size=15)
    assert labels.shape == scores.shape == (183,)
    assert adjusted_rand_score(truth, labels[:180]) == pytest.approx(1.0, abs=0.02)
    assert len(set(labels[:180]) - {-1}) == 3 and (labels[180:] == -1).all()
    assert (scores >= 0).all() and (scores <= 1).all()
    assert scores[180:].min() >= np.median(scores[:180])  # the far points are the outliers
    again, again_scores = hdbscan_cluster(np.concatenate([points, outliers]), min_cluster_size=15)
    np.testing.assert_array_equal(labels, again)
    np.testing.assert_array_equal(scores, again_scores)


def test_cluster_purity_equals_a_naive_count() -> None:
    rng = np.random.default_rng(2)
    clusters = rng.integers(-1, 6, size=500)
    classes = rng.integers(0, 4, size=500)
    clusters[clusters == 3] = 4  # a cluster id that is absent must not appear
    table = cluster_purity(clusters, classes, num_classes=4)
    assert list(table.cluster) == sorted(set(clusters))
    for row in table.itertuples():
        members = classes[clusters == row.cluster]
        counts = [int((members == c).sum()) for c in range(4)]
        best = max(counts)
        assert row.size == len(members)
        assert row.dominant_class == counts.index(best)  # the first (lowest) class among ties
        assert row.dominant_count == best
        assert row.purity == pytest.approx(best / len(members))


def test_cluster_purity_rejects_bad_labels() -> None:
    with pytest.raises(DataError, match="class labels must lie in 0..2"):
        cluster_purity(np.array([0, 1]), np.array([0, 3]), num_classes=3)
    with pytest.raises(DataError, match="must both be"):
        cluster_purity(np.array([0, 1]), np.array([0]), num_classes=3)
