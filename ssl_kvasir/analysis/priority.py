"""Which unlabeled images a clinician should look at first: a review priority and a coverage-aware order.

A reviewer's time is the scarce resource, so the images worth it come first. Three signals say a
pseudo-label is likely wrong, each in [0, 1]:

- *uncertainty*, ``1 - margin``: the classifier hesitates between two classes (margin sampling, Scheffer et al.
  2001, the classic active-learning rule);
- *disagreement*: the kNN vote of the labeled images picks another class than the classifier;
- *outlier*: the image lies away from every dense group of the embedding (HDBSCAN's GLOSH score).

Their weighted mean is the priority. Ranked by it alone, the top of the list fills with near-duplicates
(a burst of frames from one procedure, all uncertain the same way), and a label given to one of them teaches
the others nothing new. So the order is built greedily, as core-set and diversity-aware active learning do
(Sener & Savarese 2018; Ash et al. 2020): each next image is the one of highest priority times
``1 - coverage * s``, where ``s`` is its cosine similarity to the most similar image already chosen, found
through a FAISS neighbour index of the candidates.
"""

from __future__ import annotations

import heapq

import numpy as np
import pandas as pd

from ssl_kvasir.errors import ConfigError, DataError


def priority_scores(
    margin: np.ndarray,
    knn_agrees: np.ndarray | pd.Series,
    outlier_scores: np.ndarray,
    *,
    margin_weight: float = 1.0,
    disagreement_weight: float = 1.0,
    outlier_weight: float = 1.0,
) -> np.ndarray:
    """The review priority of each image: the weighted mean of uncertainty, kNN disagreement and outlier score.

    Args:
        margin: ``(N,)`` top-1 minus top-2 probability; NaN (unknown) counts as certain.
        knn_agrees: ``(N,)`` whether the kNN vote agrees with the classifier; NA (no kNN) counts as agreeing.
        outlier_scores: ``(N,)`` outlier scores in [0, 1]; NaN (no clustering) counts as 0.
        margin_weight: weight of ``1 - margin``.
        disagreement_weight: weight of the kNN disagreement.
        outlier_weight: weight of the outlier score.

    Returns:
        ``(N,)`` float64 priorities in [0, 1], higher = review sooner.

    Raises:
        ConfigError: for a negative weight or weights that are all zero.
        DataError: for arrays of different lengths.
    """
    weights = np.array([margin_weight, disagreement_weight, outlier_weight], dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(f"review priority weights must be >= 0 and not all 0, got {weights.tolist()}")
    margin = np.asarray(margin, dtype=np.float64)
    agrees = pd.array(knn_agrees, dtype="boolean").fillna(True).to_numpy(dtype=bool)
    outlier = np.asarray(outlier_scores, dtype=np.float64)
    if not margin.shape == agrees.shape == outlier.shape or margin.ndim != 1:
        raise DataError(
            f"margin {margin.shape}, knn_agrees {agrees.shape} and outlier_scores {outlier.shape} must be (N,)"
        )
    signals = np.stack(
        [
            1.0 - np.clip(np.nan_to_num(margin, nan=1.0), 0.0, 1.0),  # uncertainty
            (~agrees).astype(np.float64),  # disagreement
            np.clip(np.nan_to_num(outlier, nan=0.0), 0.0, 1.0),  # outlier
        ]
    )  # (3, N)
    return weights @ signals / weights.sum()  # (N,)


def coverage_order(
    scores: np.ndarray,
    features: np.ndarray,
    *,
    coverage: float = 1.0,
    neighbours: int = 20,
    candidates: int | None = 10_000,
) -> np.ndarray:
    """Positions of the images in review order: greedy on priority discounted by similarity to those chosen.

    The ``candidates`` highest priorities are ordered greedily: the next image is the one maximising
    ``score * (1 - coverage * max(0, s))``, with ``s`` the largest cosine similarity between it and a chosen
    image among its ``neighbours`` nearest candidates (one FAISS search). Choosing an image only lowers its
    neighbours' values, so a lazy heap finds each next image without rescoring the rest. The images outside
    the candidates follow by priority.

    Args:
        scores: ``(N,)`` priorities (:func:`priority_scores`).
        features: ``(N, D)`` embeddings of the same images (any float dtype; a memmap is read once).
        coverage: how much similarity to a chosen image discounts: 0 = priority order, 1 = an exact
            duplicate of a chosen image is worth nothing.
        neighbours: neighbours per candidate that a choice discounts.
        candidates: how many of the highest priorities are ordered for coverage (None: all; the search costs
            ``candidates^2 * D``).

    Returns:
        ``(N,)`` int64 positions, a permutation of ``0..N-1``.

    Raises:
        ConfigError: for ``coverage`` outside [0, 1] or fewer than one neighbour or candidate.
        DataError: when ``scores`` and ``features`` disagree in length.
    """
    from ssl_kvasir.analysis.knn import build_index, knn_search

    scores = np.asarray(scores, dtype=np.float64)
    if len(features) != len(scores):
        raise DataError(f"{len(scores)} priorities for {len(features)} feature rows")
    if not 0.0 <= coverage <= 1.0:
        raise ConfigError(f"review coverage must lie in [0, 1], got {coverage}")
    if neighbours < 1 or (candidates is not None and candidates < 1):
        raise ConfigError(f"review neighbours and candidates must be >= 1, got {neighbours}, {candidates}")
    by_score = np.argsort(-scores, kind="stable")  # ties: the earlier image first
    n_cand = len(scores) if candidates is None else min(candidates, len(scores))
    if n_cand < 2 or coverage == 0.0:
        return by_score.astype(np.int64)
    cand = by_score[:n_cand]  # (M,) positions, best priority first
    feats = np.asarray(features[np.sort(cand)], dtype=np.float32)[np.argsort(np.argsort(cand))]  # (M, D)
    k = min(neighbours + 1, n_cand)  # +1: a candidate finds itself first
    sims, ids = knn_search(build_index(feats, use_gpu=False), feats, k)  # (M, k), (M, k) candidate ranks
    nearest = np.zeros(n_cand)  # (M,) similarity to the most similar chosen candidate
    base = scores[cand]  # (M,)

    def value(r: int) -> float:
        return float(base[r] * (1.0 - coverage * max(0.0, nearest[r])))

    heap = [(-base[r], r) for r in range(n_cand)]  # (negated value, rank): ties go to the higher priority
    heapq.heapify(heap)
    chosen = np.zeros(n_cand, dtype=bool)
    order = []
    while heap:
        negated, r = heapq.heappop(heap)
        if chosen[r]:
            continue
        current = value(r)
        if current < -negated:  # stale: its value fell since it was pushed
            heapq.heappush(heap, (-current, r))
            continue
        chosen[r] = True
        order.append(r)
        for j, s in zip(ids[r], sims[r], strict=True):
            if j >= 0 and j != r and s > nearest[j]:
                nearest[j] = s
    return np.concatenate([cand[np.asarray(order, dtype=np.int64)], by_score[n_cand:]]).astype(np.int64)


def review_order(
    table: pd.DataFrame,
    features: np.ndarray,
    *,
    margin_weight: float = 1.0,
    disagreement_weight: float = 1.0,
    outlier_weight: float = 1.0,
    coverage: float = 1.0,
    neighbours: int = 20,
    candidates: int | None = 10_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Review order of a pseudo-label table's rows (:func:`priority_scores` of its ``margin``, ``knn_agrees``
    and ``outlier_score`` columns, then :func:`coverage_order`).

    Args:
        table: a pseudo-label table.
        features: ``(len(table), D)`` embeddings, row for row.
        margin_weight, disagreement_weight, outlier_weight: as in :func:`priority_scores`.
        coverage, neighbours, candidates: as in :func:`coverage_order`.

    Returns:
        ``order`` (positions into ``table``, review order) and the ``(len(table),)`` priorities.
    """
    scores = priority_scores(
        table.margin.to_numpy(dtype=np.float64, na_value=np.nan),
        table.knn_agrees,
        table.outlier_score.to_numpy(dtype=np.float64, na_value=np.nan),
        margin_weight=margin_weight,
        disagreement_weight=disagreement_weight,
        outlier_weight=outlier_weight,
    )
    order = coverage_order(scores, features, coverage=coverage, neighbours=neighbours, candidates=candidates)
    return order, scores
