"""UMAP repeatability, the analysis's shared projections (PCA, one neighbour graph, one spectral start, the
layout epochs, the cuML path), HDBSCAN on
separated blobs (with and without the hdbscan package), cluster purity."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from ssl_kvasir.analysis.cluster import (
    analysis_projections,
    cluster_purity,
    hdbscan_cluster,
    pca_reduce,
    umap_embed,
)
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


def _wide_blobs(n_per: int = 50, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three groups along three directions of a wide space, non-negative like pooled CNN features."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), n_per)
    directions = np.eye(dim)[[0, 7, 20]] * 10  # (3, dim)
    features = np.abs(directions[truth] + rng.normal(size=(3 * n_per, dim)))  # (3 n_per, dim)
    return features.astype(np.float16), truth


def test_pca_reduce_equals_the_leading_singular_vectors() -> None:
    rng = np.random.default_rng(3)
    # Rank-6 signal with clearly separated singular values, plus a little noise.
    signal = rng.normal(size=(400, 6)) * np.array([9.0, 7.0, 5.0, 4.0, 3.0, 2.0])  # (400, 6)
    x = (signal @ np.linalg.qr(rng.normal(size=(40, 6)))[0].T + 0.01 * rng.normal(size=(400, 40))).astype(
        np.float32
    )  # (400, 40)
    reduced = pca_reduce(x, dims=4, seed=0)  # (400, 4)
    centred = x.astype(np.float64) - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    naive = u[:, :4] * s[:4]  # (400, 4) the first four principal components
    assert reduced.shape == (400, 4) and reduced.dtype == np.float32
    for c in range(4):  # each component equals the naive one up to its sign
        sign = np.sign(reduced[:, c] @ naive[:, c])
        np.testing.assert_allclose(sign * reduced[:, c], naive[:, c], atol=1e-3 * s[0])
    narrow = np.ones((5, 3), dtype=np.float16)
    assert pca_reduce(narrow, dims=50).dtype == np.float32 and pca_reduce(narrow, dims=50).shape == (5, 3)
    with pytest.raises(ConfigError, match="pca_dims must be >= 1"):
        pca_reduce(x, dims=0)


def test_analysis_projections_share_one_neighbour_graph_and_find_the_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import umap.umap_

    features, truth = _wide_blobs()
    calls = []
    real = umap.umap_.nearest_neighbors

    def counting(x, *args, **kwargs):
        calls.append(x.shape)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(umap.umap_, "nearest_neighbors", counting)
    first = analysis_projections(features, cluster_dims=5, pca_dims=10, n_neighbors=10, seed=3, exact=True)
    assert calls == [(150, 10)]  # one graph, on the PCA-reduced features, for both projections
    assert first.backend == "umap-learn"
    assert first.plot.shape == (150, 2) and first.cluster.shape == (150, 5)
    assert first.plot.dtype == first.cluster.dtype == np.float32
    labels, _ = hdbscan_cluster(first.cluster, min_cluster_size=20)
    assert adjusted_rand_score(truth, labels) > 0.95
    again = analysis_projections(features, cluster_dims=5, pca_dims=10, n_neighbors=10, seed=3, exact=True)
    np.testing.assert_array_equal(first.plot, again.plot)  # exact: repeatable to the bit
    np.testing.assert_array_equal(first.cluster, again.cluster)
    parallel = analysis_projections(features, cluster_dims=None, pca_dims=None, n_neighbors=10, exact=False)
    assert parallel.cluster is None and parallel.plot.shape == (150, 2)
    assert calls[-1] == (150, 64)  # pca_dims=None: the full width
    labels, _ = hdbscan_cluster(parallel.plot, min_cluster_size=20)
    assert adjusted_rand_score(truth, labels) > 0.95


def test_analysis_projections_start_both_layouts_from_one_spectral_embedding_and_run_their_epochs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import umap.spectral
    import umap.umap_

    features, truth = _wide_blobs()
    spectral, layouts = [], []
    real_spectral, real_layout = umap.spectral.spectral_layout, umap.umap_.optimize_layout_euclidean

    def counting_spectral(data, graph, dim, *args, **kwargs):
        spectral.append(dim)
        return real_spectral(data, graph, dim, *args, **kwargs)

    def recording_layout(head_embedding, tail_embedding, head, tail, n_epochs, *args, **kwargs):
        layouts.append((head_embedding.shape[1], n_epochs))
        return real_layout(head_embedding, tail_embedding, head, tail, n_epochs, *args, **kwargs)

    monkeypatch.setattr(umap.spectral, "spectral_layout", counting_spectral)
    monkeypatch.setattr(umap.umap_, "optimize_layout_euclidean", recording_layout)
    out = analysis_projections(
        features, cluster_dims=5, pca_dims=10, n_neighbors=10, seed=3, plot_epochs=40, cluster_epochs=25
    )
    assert spectral == [5]  # one spectral embedding, at the clustering dimension, for both layouts
    assert layouts == [(2, 40), (5, 25)]
    assert list(out.seconds) == ["pca", "neighbours", "spectral", "plot layout", "cluster layout"]
    assert all(v >= 0 for v in out.seconds.values())
    labels, _ = hdbscan_cluster(out.cluster, min_cluster_size=20)
    assert adjusted_rand_score(truth, labels) > 0.95  # 25 epochs from the spectral start still separate them
    with pytest.raises(ConfigError, match="umap.cluster_epochs must be >= 1"):
        analysis_projections(features, cluster_epochs=0)


def test_the_first_two_of_five_spectral_eigenvectors_are_the_two_dimensional_spectral_embedding() -> None:
    """What sharing the spectral start rests on: on a connected graph the 2-D spectral embedding is the first
    two columns of the 5-D one (the same Laplacian eigenvectors, up to sign)."""
    from umap.spectral import spectral_layout
    from umap.umap_ import fuzzy_simplicial_set

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)  # one Gaussian cloud: a connected 10-NN graph
    graph, _, _ = fuzzy_simplicial_set(x, 10, np.random.RandomState(0), "euclidean")
    five = spectral_layout(x, graph, 5, np.random.RandomState(0))  # (300, 5)
    two = spectral_layout(x, graph, 2, np.random.RandomState(0))  # (300, 2)
    for c in range(2):
        sign = np.sign(five[:, c] @ two[:, c])
        np.testing.assert_allclose(sign * five[:, c], two[:, c], atol=1e-3 * np.abs(two[:, c]).max())


def test_analysis_projections_use_cuml_when_it_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []

    class FakeUMAP:  # records what cuML would be asked, returns zeros of the right shape
        def __init__(self, **kwargs):
            made.append(kwargs)

        def fit_transform(self, x):
            made[-1]["input_shape"] = x.shape
            return np.zeros((len(x), made[-1]["n_components"]))

    fake = types.ModuleType("cuml")
    fake.manifold = types.SimpleNamespace(UMAP=FakeUMAP)
    monkeypatch.setitem(sys.modules, "cuml", fake)
    monkeypatch.setitem(sys.modules, "cuml.manifold", fake.manifold)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    features, _ = _wide_blobs()
    out = analysis_projections(features, cluster_dims=5, pca_dims=10, n_neighbors=10, min_dist=0.2)
    assert out.backend == "cuml" and out.plot.shape == (150, 2) and out.cluster.shape == (150, 5)
    assert [(m["n_components"], m["min_dist"], m["n_epochs"], m["input_shape"]) for m in made] == [
        (2, 0.2, None, (150, 10)),
        (5, 0.0, None, (150, 10)),
    ]
    assert made[0]["metric"] == "euclidean"  # cosine on the features = Euclidean after normalising + PCA
    # exact=True or backend="umap-learn" keep umap-learn even with cuML present.
    made.clear()
    assert analysis_projections(features, None, 10, n_neighbors=10, exact=True).backend == "umap-learn"
    assert (
        analysis_projections(features, None, 10, n_neighbors=10, backend="umap-learn").backend == "umap-learn"
    )
    assert made == []


def test_analysis_projections_refuse_bad_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    features, _ = _wide_blobs()
    with pytest.raises(ConfigError, match="unknown UMAP backend 'gpu'"):
        analysis_projections(features, backend="gpu")
    with pytest.raises(ConfigError, match="cluster_dims must be >= 1"):
        analysis_projections(features, cluster_dims=0)
    with pytest.raises(ConfigError, match="needs more than 15 points, got 10"):
        analysis_projections(features[:10])
    monkeypatch.setitem(sys.modules, "cuml", None)  # `import cuml` fails
    monkeypatch.setitem(sys.modules, "cuml.manifold", None)
    with pytest.raises(ConfigError, match="RAPIDS cuML"):
        analysis_projections(features, pca_dims=10, n_neighbors=10, backend="cuml")


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
