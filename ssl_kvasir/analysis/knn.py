"""k-nearest-neighbour search and classification on L2-normalised features, with FAISS.

Every vector is L2-normalised before it enters an index or a query, so the inner product FAISS returns is the
cosine similarity. The default index is exact (``IndexFlatIP``); an inverted-file index (``IVF``) is there
for stores of millions of images, where exact search of every query against every vector gets slow.

Queries are searched in batches, so the memory of a search is the index plus one batch, whatever the number
of queries. Inputs may be the float16 memmaps of :mod:`ssl_kvasir.analysis.embeddings`: each batch is
converted to float32 on the fly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from ssl_kvasir.analysis._optional import import_optional
from ssl_kvasir.data.classes import ClassTable
from ssl_kvasir.errors import ConfigError, DataError

_FAISS_INSTALL = (
    "pip install 'ssl_kvasir[cpu]' (faiss-cpu), or 'ssl_kvasir[gpu]' (faiss-gpu) on a CUDA machine"
)


def _faiss():
    return import_optional("faiss", _FAISS_INSTALL)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """A float32 copy of ``x`` (N, D) with unit rows; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)  # (N, D)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _check_matrix(x: np.ndarray, name: str, dim: int | None = None) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty (N, D) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise DataError(f"{name} have dimension {x.shape[1]}, the index has {dim}")


def gpu_available() -> bool:
    """Whether the installed faiss was built with GPU support and sees a GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(
    features: np.ndarray,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int = 32,
    use_gpu: bool | str = "auto",
    seed: int = 0,
    batch_size: int = 65536,
):
    """Build a cosine-similarity FAISS index over ``features``.

    Args:
        features: ``(N, D)`` database vectors (any float dtype; normalised here, in batches).
        kind: ``flat`` (exact inner product, the default) or ``ivf`` (inverted lists: approximate, for
            millions of vectors).
        nlist: IVF lists; default ``4 * sqrt(N)``, capped at ``N / 39`` so that each centroid gets the 39
            training points FAISS asks for.
        nprobe: IVF lists visited per query (at most ``nlist``; ``nprobe = nlist`` is exact search).
        use_gpu: ``"auto"`` (a GPU when faiss has GPU support and sees one), True (required) or False.
        seed: seed of the IVF training sample and k-means.
        batch_size: rows normalised and added at a time.

    Returns:
        a FAISS index (CPU or GPU) whose ``search`` returns cosine similarities.

    Raises:
        ConfigError: for an unknown ``kind``, a bad ``nlist``/``nprobe``, or ``use_gpu=True`` without a GPU.
    """
    faiss = _faiss()
    _check_matrix(features, "features")
    n, dim = features.shape
    if use_gpu not in ("auto", True, False):
        raise ConfigError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    on_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
    if on_gpu and not gpu_available():
        raise ConfigError("use_gpu=True, but faiss has no GPU support or sees no GPU (install the gpu extra)")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39)) if nlist is None else int(nlist)
        if not 1 <= nlist <= n:
            raise ConfigError(f"nlist must be between 1 and the number of vectors ({n}), got {nlist}")
        if nprobe < 1:
            raise ConfigError(f"nprobe must be at least 1, got {nprobe}")
        # index_factory owns its coarse quantizer (a quantizer made by hand must be kept alive by the caller).
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        # FAISS's guidance: 39 to 256 training points per centroid; more only costs time.
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))
        index.train(l2_normalize(features[sample]))
        index.nprobe = min(nprobe, nlist)  # more lists than exist is the same as all of them
    else:
        raise ConfigError(f"unknown index kind {kind!r}; valid kinds: flat, ivf")
    for start in range(0, n, batch_size):
        index.add(l2_normalize(features[start : start + batch_size]))
    if on_gpu:
        # index_cpu_to_all_gpus keeps its GPU resources referenced by the returned index.
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def _search_batches(
    index, queries: np.ndarray, k: int, batch_size: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, sims (b, k), ids (b, k))`` for consecutive query batches."""
    _check_matrix(queries, "queries", index.d)
    if not 1 <= k <= index.ntotal:
        raise ConfigError(f"k must be between 1 and the number of indexed vectors ({index.ntotal}), got {k}")
    for start in range(0, len(queries), batch_size):
        sims, ids = index.search(l2_normalize(queries[start : start + batch_size]), k)  # (b, k), (b, k)
        yield start, sims, ids


def knn_search(
    index_or_db, queries: np.ndarray, k: int, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar database vectors of each query, most similar first.

    Args:
        index_or_db: an index from :func:`build_index`, or a ``(N, D)`` database array (an exact flat index
            is built over it).
        queries: ``(Q, D)`` query vectors (normalised here, batch by batch).
        k: neighbours per query.
        batch_size: queries searched at a time (bounds the working memory).

    Returns:
        ``sims`` (Q, k) float32 cosine similarities and ``ids`` (Q, k) int64 database rows. An IVF index
        that finds fewer than ``k`` vectors in the visited lists pads with id -1 (and a very negative sim).

    Raises:
        ConfigError: when ``k`` exceeds the number of database vectors.
        DataError: when the dimensions differ.
    """
    index = build_index(index_or_db) if isinstance(index_or_db, np.ndarray) else index_or_db
    sims = np.empty((len(queries), k), dtype=np.float32)  # (Q, k)
    ids = np.empty((len(queries), k), dtype=np.int64)  # (Q, k)
    for start, s, i in _search_batches(index, queries, k, batch_size):
        sims[start : start + len(s)] = s
        ids[start : start + len(i)] = i
    return sims, ids


def knn_vote(
    sims: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, temperature: float = 0.07
) -> np.ndarray:
    """Similarity-weighted kNN vote: class probabilities from the neighbours' labels.

    Wu et al. 2018 (Unsupervised feature learning via non-parametric instance discrimination, Sec. 3.4):
    "we weigh each neighbour by exp(s_i / tau)" and sum the weights per class; DINO (Caron et al. 2021) uses
    the same weighted k-NN classifier with tau = 0.07 for its evaluation. The class scores are normalised
    to sum to one here, which changes no ranking.

    Args:
        sims: ``(Q, k)`` cosine similarities.
        neighbour_labels: ``(Q, k)`` class index of each neighbour; -1 marks a missing neighbour (FAISS
            padding), which gets no vote.
        num_classes: C.
        temperature: tau.

    Returns:
        ``(Q, C)`` float32 probabilities; a query without any neighbour gets the uniform distribution.
    """
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(neighbour_labels, dtype=np.int64)
    if sims.shape != labels.shape or sims.ndim != 2:
        raise DataError(
            f"sims {sims.shape} and neighbour_labels {labels.shape} must be the same (Q, k) shape"
        )
    if temperature <= 0:
        raise ConfigError(f"the kNN temperature must be positive, got {temperature}")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"a neighbour label {labels.max()} is outside 0..{num_classes - 1}")
    valid = labels >= 0  # (Q, k)
    # Subtracting each row's best similarity cancels in the normalisation and keeps exp() from overflowing
    # (exp(1 / 0.07) is fine, but a smaller temperature would not be).
    top = np.where(valid, sims, -np.inf).max(axis=1, keepdims=True, initial=-np.inf)  # (Q, 1)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.where(valid, np.exp((sims - top) / temperature), 0.0)  # (Q, k)
    n_queries = len(labels)
    cell = np.arange(n_queries)[:, None] * num_classes + np.where(
        valid, labels, 0
    )  # (Q, k) flat (query, class)
    scores = np.bincount(cell.ravel(), weights=weights.ravel(), minlength=n_queries * num_classes)
    scores = scores.reshape(n_queries, num_classes)  # (Q, C)
    total = scores.sum(axis=1, keepdims=True)  # (Q, 1)
    probs = np.divide(scores, total, out=np.full_like(scores, 1.0 / num_classes), where=total > 0)
    return probs.astype(np.float32)


def _labeled_rows(db_labels: np.ndarray, k: int) -> np.ndarray:
    rows = np.flatnonzero(np.asarray(db_labels) >= 0)
    if k < 1 or k > len(rows):
        raise ConfigError(f"k={k} neighbours asked for, but the database has {len(rows)} labeled images")
    return rows


def knn_classify(
    db_feats: np.ndarray,
    db_labels: np.ndarray,
    query_feats: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    *,
    num_classes: int,
    batch_size: int = 4096,
    use_gpu: bool | str = "auto",
) -> np.ndarray:
    """Weighted kNN classification (:func:`knn_vote`) of queries against the labeled database rows.

    Args:
        db_feats: ``(N, D)`` database features; rows with label -1 (unlabeled) are left out.
        db_labels: ``(N,)`` class index per row, -1 = unlabeled.
        query_feats: ``(Q, D)`` features to classify.
        k: neighbours per query.
        temperature: the vote's tau.
        num_classes: C.
        batch_size: queries searched and voted at a time (the output is the only (Q, .) array kept).
        use_gpu: as in :func:`build_index`.

    Returns:
        ``(Q, C)`` float32 class probabilities.

    Raises:
        ConfigError: when ``k`` exceeds the number of labeled images.
    """
    db_labels = np.asarray(db_labels, dtype=np.int64)
    rows = _labeled_rows(db_labels, k)
    labels = db_labels[rows]  # (N_lab,)
    index = build_index(db_feats[rows], use_gpu=use_gpu)
    probs = np.empty((len(query_feats), num_classes), dtype=np.float32)  # (Q, C)
    for start, sims, ids in _search_batches(index, query_feats, k, batch_size):
        probs[start : start + len(sims)] = knn_vote(sims, labels[ids], num_classes, temperature)
    return probs


def nearest_labeled(
    db_feats: np.ndarray,
    db_paths: Sequence[str],
    db_labels: np.ndarray,
    query_feat: np.ndarray,
    k: int = 5,
    classes: ClassTable | None = None,
) -> pd.DataFrame:
    """The ``k`` labeled images most similar to one image.

    A query that is itself a labeled database image finds itself first, with similarity 1.

    Args:
        db_feats: ``(N, D)`` database features; only labeled rows (label >= 0) are searched.
        db_paths: ``(N,)`` image paths.
        db_labels: ``(N,)`` class index, -1 = unlabeled.
        query_feat: ``(D,)`` the image's feature.
        k: neighbours.
        classes: when given, adds the class name.

    Returns:
        one row per neighbour, most similar first: ``rank`` (1..k), ``path``, ``label``, ``similarity``
        and, with ``classes``, ``class``.

    Raises:
        ConfigError: when ``k`` exceeds the number of labeled images.
    """
    db_labels = np.asarray(db_labels, dtype=np.int64)
    rows = _labeled_rows(db_labels, k)
    if len(db_paths) != len(db_labels):
        raise DataError(f"{len(db_paths)} paths for {len(db_labels)} labels")
    query = np.asarray(query_feat).reshape(1, -1)  # (1, D)
    sims, ids = knn_search(build_index(db_feats[rows], use_gpu=False), query, k)  # (1, k), (1, k)
    found = rows[ids[0]]  # (k,) database rows
    table = pd.DataFrame(
        {
            "rank": np.arange(1, k + 1),
            "path": [db_paths[i] for i in found],
            "label": db_labels[found],
            "similarity": sims[0],
        }
    )
    if classes is not None:
        table["class"] = [classes[int(y)].folder for y in table.label]
    return table
