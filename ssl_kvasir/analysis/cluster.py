"""UMAP projection and HDBSCAN clustering of embeddings, and how pure the clusters are in class terms.

The usual recipe for finding structure in a pile of unlabeled images (McInnes et al.'s UMAP documentation,
"Using UMAP for clustering"): project the features to a few dimensions with UMAP, where density-based
clustering works, then let HDBSCAN find the dense groups and call the rest noise (-1).

The analysis needs two projections of the same ~110k features: 2-D for the plot and a few dimensions for
HDBSCAN. :func:`analysis_projections` makes both for less than two plain UMAP runs cost: the features are
first reduced to 50 dimensions by PCA (common practice before UMAP on wide features: R's uwot has a ``pca``
option for it, single-cell pipelines run UMAP on 50 principal components), which makes the neighbour search
cheap; the nearest-neighbour graph is built once and handed to both projections (``precomputed_knn``); and
the spectral embedding both layouts start from is computed once; the layout optimisation, which is then most
of the cost (about 95 % of a projection of 20k points), runs on every core unless exact repeatability is asked
for, and for fewer epochs than umap-learn's 200 (``plot_epochs``, ``cluster_epochs``; the benchmark
``bench/bench_umap.py`` measures what that costs in cluster agreement).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ssl_kvasir.analysis._optional import import_optional
from ssl_kvasir.errors import ConfigError, DataError


def umap_embed(
    features: np.ndarray,
    n_components: int = 2,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    exact: bool = True,
) -> np.ndarray:
    """Project features to ``n_components`` dimensions with UMAP (one projection, at full feature width).

    Args:
        features: ``(N, D)`` features (a memmap is read into float32 memory: UMAP needs the whole matrix).
        n_components: output dimension (2 for plots, 5 to 10 before clustering).
        seed: UMAP's ``random_state`` when ``exact``.
        n_neighbors: size of the local neighbourhood UMAP preserves.
        min_dist: how tightly UMAP packs points.
        metric: distance in feature space; cosine matches the kNN.
        exact: repeatable to the bit, at the price of UMAP's parallelism (a seed makes it run on one thread);
            False runs on every core and gives a slightly different layout each time.

    Returns:
        ``(N, n_components)`` float32 coordinates.

    Raises:
        ConfigError: when fewer than ``n_neighbors + 1`` points are given, or umap-learn is missing.
    """
    umap = import_optional("umap", "pip install umap-learn")
    x = _check_features(features, n_neighbors)  # (N, D)
    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=seed if exact else None,
        n_jobs=1 if exact else -1,
    )
    return _fit(reducer, x)


def _check_features(features: np.ndarray, n_neighbors: int) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)  # (N, D)
    if x.ndim != 2:
        raise DataError(f"features must be an (N, D) array, got shape {x.shape}")
    if len(x) <= n_neighbors:
        raise ConfigError(
            f"UMAP with n_neighbors={n_neighbors} needs more than {n_neighbors} points, got {len(x)}"
        )
    return x


def _fit(reducer, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # A seed turns off parallelism (the documented price of repeatability); a neighbour graph handed in
        # has no search index, which only transform() of new points would need.
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        coords = reducer.fit_transform(x)  # (N, n_components)
    return np.asarray(coords, dtype=np.float32)


def pca_reduce(features: np.ndarray, dims: int = 50, seed: int = 0) -> np.ndarray:
    """The first ``dims`` principal components of the features (centred, not whitened).

    Randomized SVD (Halko et al. 2011, scikit-learn's ``svd_solver="randomized"``): for 110k x 2048 features it
    costs a few matrix products, against the full width that every UMAP distance would otherwise pay for.
    Features at most ``dims`` wide are returned as they are (as float32).

    Args:
        features: ``(N, D)`` features.
        dims: the number of components kept.
        seed: the randomized SVD's seed (the components are the same up to sign for any seed).

    Returns:
        ``(N, min(dims, D))`` float32.
    """
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)  # (N, D)
    if x.ndim != 2:
        raise DataError(f"features must be an (N, D) array, got shape {x.shape}")
    if dims < 1:
        raise ConfigError(f"umap.pca_dims must be >= 1 (or null for no PCA), got {dims}")
    if x.shape[1] <= dims:
        return x
    pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed)
    return np.asarray(pca.fit_transform(x), dtype=np.float32)  # (N, dims)


@dataclass(frozen=True)
class Projections:
    """The two UMAP projections of the analysis.

    Attributes:
        plot: ``(N, 2)`` float32 coordinates for the plot.
        cluster: ``(N, cluster_dims)`` float32 coordinates for HDBSCAN, or None when no clusters were asked for.
        backend: ``umap-learn`` or ``cuml`` (which library made them).
        seconds: wall time of each step (``pca``, ``neighbours``, ``spectral``, ``plot layout``,
            ``cluster layout``; cuML: ``pca`` and ``umap``), for the benchmark's profile.
    """

    plot: np.ndarray
    cluster: np.ndarray | None
    backend: str
    seconds: dict[str, float] = field(default_factory=dict)


def analysis_projections(
    features: np.ndarray,
    cluster_dims: int | None = 5,
    pca_dims: int | None = 50,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    seed: int = 0,
    exact: bool = False,
    backend: str = "auto",
    plot_epochs: int | None = None,
    cluster_epochs: int | None = None,
) -> Projections:
    """The 2-D projection for the plot and the ``cluster_dims``-D one for HDBSCAN, sharing their work.

    1. PCA to ``pca_dims`` dimensions (:func:`pca_reduce`); None keeps the full width. With the cosine
       metric the features are L2-normalised first and UMAP then measures Euclidean distance in the reduced
       space, which is the cosine geometry of the features as far as ``pca_dims`` dimensions can hold it.
    2. One nearest-neighbour graph (``umap.umap_.nearest_neighbors``, NN-descent) for both projections: UMAP
       builds the same graph from the same points whatever the output dimension, so the second projection
       gets it as ``precomputed_knn`` instead of building it again.
    3. One spectral embedding of the fuzzy graph (UMAP's default start, eigenvectors of the graph Laplacian)
       at ``cluster_dims`` dimensions; the plot starts from its first two (the 2-D spectral embedding).
    4. The two layout optimisations (UMAP's SGD), for ``plot_epochs`` and ``cluster_epochs`` epochs; the
       clustering one with ``min_dist=0``, as the UMAP documentation advises for clustering ("Using UMAP for
       clustering": pack the points densely). Starting from the spectral embedding, the groups are apart
       after a few dozen epochs; the rest refines positions within them, which the plot shows and HDBSCAN
       hardly needs.

    With ``backend="auto"`` and RAPIDS cuML importable, both projections run on the GPU (``cuml.manifold.UMAP``,
    after the same PCA); cuML builds its own neighbour graph per projection.

    Args:
        features: ``(N, D)`` features (float16 or float32; a memmap is read into memory).
        cluster_dims: the dimension HDBSCAN clusters in, or None for the plot alone.
        pca_dims: PCA components kept before UMAP, or None to run UMAP on the full width.
        n_neighbors: size of the local neighbourhood UMAP preserves.
        min_dist: how tightly the plot packs points.
        metric: distance in the (reduced) feature space; cosine matches the kNN.
        seed: seed of the PCA, the neighbour search and, with ``exact``, of UMAP itself.
        exact: repeatable to the bit: UMAP on one thread with ``random_state=seed``. False (the default)
            runs on every core; layouts then differ slightly between runs, clusters hardly (the benchmark
            prints the adjusted Rand index between the clusterings of both settings).
        backend: ``auto`` (cuML when importable, else umap-learn), ``umap-learn`` or ``cuml``.
        plot_epochs: layout epochs of the 2-D plot; None = the library's default (umap-learn: 200 above
            10,000 points, 500 below).
        cluster_epochs: layout epochs of the clustering projection; None = the library's default.

    Returns:
        the :class:`Projections`.

    Raises:
        ConfigError: for an unknown backend, ``cuml`` asked for but missing, too few points, or umap-learn
            missing.
    """
    if backend not in ("auto", "umap-learn", "cuml"):
        raise ConfigError(f"unknown UMAP backend {backend!r}; valid: auto, umap-learn, cuml")
    if cluster_dims is not None and cluster_dims < 1:
        raise ConfigError(f"umap.cluster_dims must be >= 1, got {cluster_dims}")
    for key, epochs in (("plot_epochs", plot_epochs), ("cluster_epochs", cluster_epochs)):
        if epochs is not None and epochs < 1:
            raise ConfigError(f"umap.{key} must be >= 1 (or null for the library's default), got {epochs}")
    x = _check_features(features, n_neighbors)  # (N, D)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    if pca_dims is not None:
        if metric == "cosine":
            # Cosine distance is Euclidean distance between unit vectors (|a - b|^2 = 2 - 2 cos): normalise,
            # then PCA keeps those distances as well as ``pca_dims`` dimensions can (centring moves no point
            # relative to another), and UMAP measures them in the reduced space.
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # (N, D)
            metric = "euclidean"
        x = pca_reduce(x, pca_dims, seed)  # (N, pca_dims)
    seconds["pca"], clock = time.perf_counter() - clock, time.perf_counter()
    if backend == "cuml" or (backend == "auto" and not exact and _cuml_available()):
        out = _cuml_projections(
            x, cluster_dims, n_neighbors, min_dist, metric, seed, (plot_epochs, cluster_epochs)
        )
        return Projections(
            out.plot, out.cluster, out.backend, {**seconds, "umap": time.perf_counter() - clock}
        )
    umap = import_optional("umap", "pip install umap-learn")
    from umap.spectral import spectral_layout
    from umap.umap_ import fuzzy_simplicial_set, nearest_neighbors

    n_jobs = 1 if exact else -1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden", category=UserWarning)
        knn_indices, knn_dists, _ = nearest_neighbors(
            x, n_neighbors, metric, {}, False, np.random.RandomState(seed), n_jobs=n_jobs
        )  # (N, k), (N, k)
        seconds["neighbours"], clock = time.perf_counter() - clock, time.perf_counter()
        # The fuzzy graph UMAP optimises depends on the neighbours alone, not on the output dimension or
        # min_dist: its spectral embedding (UMAP's default start) is computed once, at the larger of the two
        # dimensions, and the plot starts from its first two eigenvectors (the 2-D spectral embedding).
        graph, _, _ = fuzzy_simplicial_set(
            x, n_neighbors, np.random.RandomState(seed), metric, knn_indices=knn_indices, knn_dists=knn_dists
        )  # (N, N) sparse
        start = spectral_layout(x, graph, max(2, cluster_dims or 2), np.random.RandomState(seed))  # (N, d)
    start = _scale_start(start, seed)
    seconds["spectral"], clock = time.perf_counter() - clock, time.perf_counter()

    def project(n_components: int, dist: float, n_epochs: int | None) -> np.ndarray:
        reducer = umap.UMAP(
            n_components=n_components,
            n_neighbors=n_neighbors,
            min_dist=dist,
            metric=metric,
            n_epochs=n_epochs,
            init=start[:, :n_components],
            random_state=seed if exact else None,
            n_jobs=n_jobs,
            precomputed_knn=(knn_indices, knn_dists),
        )
        return _fit(reducer, x)

    plot = project(2, min_dist, plot_epochs)  # (N, 2)
    seconds["plot layout"], clock = time.perf_counter() - clock, time.perf_counter()
    cluster = project(cluster_dims, 0.0, cluster_epochs) if cluster_dims is not None else None  # (N, d)
    if cluster is not None:
        seconds["cluster layout"] = time.perf_counter() - clock
    return Projections(plot=plot, cluster=cluster, backend="umap-learn", seconds=seconds)


def _scale_start(start: np.ndarray, seed: int) -> np.ndarray:
    """A spectral embedding scaled as UMAP scales its own (largest coordinate 10) with the same tiny noise
    (``umap.umap_.noisy_scale_coords``), which keeps coincident points from starting on top of each other."""
    rng = np.random.RandomState(seed)
    scaled = 10.0 * start / np.abs(start).max()  # (N, d)
    return (scaled + rng.normal(scale=1e-4, size=scaled.shape)).astype(np.float32)


def _cuml_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    try:
        import cuml  # noqa: F401
    except ImportError:
        return False
    return True


def _cuml_projections(
    x: np.ndarray,
    cluster_dims: int | None,
    n_neighbors: int,
    min_dist: float,
    metric: str,
    seed: int,
    epochs: tuple[int | None, int | None],
) -> Projections:
    cuml_manifold = import_optional("cuml.manifold", "RAPIDS cuML (https://docs.rapids.ai/install)")

    def project(n_components: int, dist: float, n_epochs: int | None) -> np.ndarray:
        reducer = cuml_manifold.UMAP(
            n_components=n_components,
            n_neighbors=n_neighbors,
            min_dist=dist,
            metric=metric,
            n_epochs=n_epochs,
            random_state=seed,
            output_type="numpy",
        )
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)

    plot = project(2, min_dist, epochs[0])  # (N, 2)
    cluster = project(cluster_dims, 0.0, epochs[1]) if cluster_dims is not None else None
    return Projections(plot=plot, cluster=cluster, backend="cuml")


def hdbscan_cluster(
    points: np.ndarray, min_cluster_size: int = 50, min_samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster points with HDBSCAN (Campello et al. 2013), marking low-density points as noise.

    Uses the ``hdbscan`` package (about 2-5 s on 100k 2-D points, against 41 s for scikit-learn's
    HDBSCAN on the same points); scikit-learn's implementation is the fallback when ``hdbscan`` cannot be
    imported. HDBSCAN is deterministic: it takes no seed.

    Args:
        points: ``(N, d)`` points, typically UMAP coordinates.
        min_cluster_size: the smallest group that counts as a cluster.
        min_samples: density smoothing (HDBSCAN's default: ``min_cluster_size``).

    Returns:
        ``labels`` (N,) int64, cluster index or -1 for noise, and ``outlier_scores`` (N,) float64 in [0, 1]:
        GLOSH outlier scores (Campello et al. 2015) from ``hdbscan``; with the scikit-learn fallback, which
        has no GLOSH, ``1 - membership probability`` (1 for noise).
    """
    x = np.asarray(points, dtype=np.float64)  # (N, d)
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"points must be a non-empty (N, d) array, got shape {x.shape}")
    if min_cluster_size < 2:
        raise ConfigError(f"min_cluster_size must be at least 2, got {min_cluster_size}")
    try:
        import hdbscan
    except ImportError:
        hdbscan = None
    if hdbscan is not None:
        model = hdbscan.HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples).fit(x)
        scores = np.nan_to_num(np.asarray(model.outlier_scores_, dtype=np.float64), nan=0.0)
    else:
        from sklearn.cluster import HDBSCAN

        model = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, copy=True).fit(x)
        scores = 1.0 - np.asarray(model.probabilities_, dtype=np.float64)
    return np.asarray(model.labels_, dtype=np.int64), scores


def cluster_purity(cluster_labels: np.ndarray, class_labels: np.ndarray, num_classes: int) -> pd.DataFrame:
    """How much each cluster is one class.

    Args:
        cluster_labels: ``(N,)`` cluster index per image, -1 = noise.
        class_labels: ``(N,)`` class index per image (true or predicted), in ``0..num_classes - 1``.
        num_classes: C.

    Returns:
        one row per cluster (noise, -1, first when present): ``cluster``, ``size``, ``dominant_class``
        (the most frequent class; the lowest index on a tie), ``dominant_count`` and ``purity`` =
        ``dominant_count / size``.
    """
    clusters = np.asarray(cluster_labels, dtype=np.int64)
    classes = np.asarray(class_labels, dtype=np.int64)
    if clusters.shape != classes.shape or clusters.ndim != 1:
        raise DataError(f"cluster labels {clusters.shape} and class labels {classes.shape} must both be (N,)")
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise DataError(
            f"class labels must lie in 0..{num_classes - 1}, got {classes.min()}..{classes.max()}"
        )
    if clusters.size and clusters.min() < -1:
        raise DataError(f"cluster labels must be >= -1 (-1 = noise), got {clusters.min()}")
    ids, cluster_pos = np.unique(clusters, return_inverse=True)  # (K,), (N,)
    counts = np.bincount(cluster_pos * num_classes + classes, minlength=len(ids) * num_classes)
    counts = counts.reshape(len(ids), num_classes)  # (K, C) images of class c in cluster k
    size = counts.sum(axis=1)  # (K,)
    dominant = counts.argmax(axis=1)  # (K,) argmax takes the first maximum: the lowest class index
    dominant_count = counts[np.arange(len(ids)), dominant]
    return pd.DataFrame(
        {
            "cluster": ids,
            "size": size,
            "dominant_class": dominant,
            "dominant_count": dominant_count,
            "purity": dominant_count / size,
        }
    )
