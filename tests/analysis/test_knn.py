"""FAISS kNN against brute-force numpy, the weighted vote against a naive loop."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ssl_kvasir.analysis.knn import (
    build_index,
    gpu_available,
    knn_classify,
    knn_search,
    knn_vote,
    l2_normalize,
    nearest_labeled,
)
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.errors import ConfigError, DataError


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return _unit(queries.astype(np.float64)) @ _unit(db.astype(np.float64)).T  # (Q, N) cosine similarities


def _assert_same_neighbours(
    sims: np.ndarray, ids: np.ndarray, db: np.ndarray, queries: np.ndarray, k: int
) -> None:
    """Ties may come in any order: check the reported sims are the true top-k and belong to the ids."""
    full = _brute(db, queries)  # (Q, N)
    expected = -np.sort(-full, axis=1)[:, :k]  # (Q, k) descending
    np.testing.assert_allclose(sims, expected, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, ids, axis=1), sims, atol=1e-5)
    assert all(len(set(row)) == k for row in ids)


@pytest.mark.parametrize("batch_size", [7, 4096])
def test_flat_search_equals_brute_force(batch_size: int) -> None:
    rng = np.random.default_rng(0)
    db, queries = rng.normal(size=(400, 24)), rng.normal(size=(53, 24)) * 3  # norms vary: normalised inside
    sims, ids = knn_search(
        build_index(db.astype(np.float16)), queries.astype(np.float16), k=10, batch_size=batch_size
    )
    assert sims.shape == ids.shape == (53, 10) and sims.dtype == np.float32 and ids.dtype == np.int64
    _assert_same_neighbours(sims, ids, db.astype(np.float16), queries.astype(np.float16), 10)


def test_search_with_ties() -> None:
    # Duplicate database vectors make exact ties; any order among them is right.
    rng = np.random.default_rng(1)
    base = rng.normal(size=(30, 6))
    db = np.concatenate([base, base, base])  # (90, 6)
    queries = base[:10] + rng.normal(scale=0.01, size=(10, 6))
    sims, ids = knn_search(db.astype(np.float32), queries.astype(np.float32), k=3)
    _assert_same_neighbours(sims, ids, db, queries, 3)
    assert all({i % 30 for i in row} == {q} for q, row in enumerate(ids))  # the three copies of its base


def test_ivf_with_every_list_probed_equals_flat() -> None:
    rng = np.random.default_rng(2)
    db, queries = rng.normal(size=(2000, 16)), rng.normal(size=(40, 16))
    flat_sims, flat_ids = knn_search(build_index(db), queries, k=5)
    ivf = build_index(db, kind="ivf", nlist=10, nprobe=10)
    ivf_sims, ivf_ids = knn_search(ivf, queries, k=5)
    np.testing.assert_allclose(ivf_sims, flat_sims, atol=1e-5)
    np.testing.assert_array_equal(ivf_ids, flat_ids)


def test_vote_equals_naive_loop() -> None:
    rng = np.random.default_rng(3)
    q, k, c = 25, 7, 4
    sims = rng.uniform(-1, 1, size=(q, k))
    labels = rng.integers(-1, c, size=(q, k))  # -1 = missing neighbour, no vote
    labels[0] = -1  # a query without any neighbour
    for temperature in (0.07, 0.5, 2.0):
        probs = knn_vote(sims, labels, c, temperature)
        for i in range(q):
            scores = np.zeros(c)
            for j in range(k):
                if labels[i, j] >= 0:
                    scores[labels[i, j]] += np.exp(sims[i, j] / temperature)
            expected = scores / scores.sum() if scores.sum() > 0 else np.full(c, 1 / c)
            np.testing.assert_allclose(probs[i], expected, rtol=1e-5, atol=1e-7)


def test_vote_survives_a_tiny_temperature() -> None:
    probs = knn_vote(np.array([[0.9, 0.8]]), np.array([[1, 0]]), 2, temperature=0.001)
    assert np.isfinite(probs).all() and probs[0, 1] > 0.999


def test_classify_equals_brute_force_vote() -> None:
    rng = np.random.default_rng(4)
    n, c, k = 300, 5, 9
    db = rng.normal(size=(n, 12)).astype(np.float32)
    labels = rng.integers(0, c, size=n)
    labels[::4] = -1  # unlabeled rows are not neighbours
    queries = rng.normal(size=(31, 12)).astype(np.float32)
    probs = knn_classify(db, labels, queries, k=k, temperature=0.1, num_classes=c, batch_size=8)
    full = _brute(db, queries)  # (Q, N)
    full[:, labels < 0] = -np.inf
    expected = np.zeros((31, c))
    for i in range(31):
        top = np.argsort(-full[i])[:k]
        for j in top:
            expected[i, labels[j]] += np.exp(full[i, j] / 0.1)
        expected[i] /= expected[i].sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


def test_k_beyond_labeled_images_is_a_config_error() -> None:
    db = np.eye(6, dtype=np.float32)
    labels = np.array([0, 1, -1, -1, -1, 1])
    with pytest.raises(ConfigError, match="k=4 neighbours asked for, but the database has 3 labeled images"):
        knn_classify(db, labels, db, k=4, num_classes=2)
    with pytest.raises(ConfigError, match="k=4 .* 3 labeled images"):
        nearest_labeled(db, [f"{i}.jpg" for i in range(6)], labels, db[0], k=4)
    with pytest.raises(ConfigError, match="number of indexed vectors \\(6\\)"):
        knn_search(db, db, k=7)


def test_nearest_labeled_lists_only_labeled_images() -> None:
    rng = np.random.default_rng(5)
    db = rng.normal(size=(50, 8)).astype(np.float32)
    labels = np.where(np.arange(50) % 2 == 0, np.arange(50) % 23, -1)
    paths = [f"img{i}.jpg" for i in range(50)]
    table = nearest_labeled(db, paths, labels, db[10], k=4, classes=HYPERKVASIR_CLASSES)
    assert list(table.columns) == ["rank", "path", "label", "similarity", "class"]
    assert table.path.iloc[0] == "img10.jpg" and table.similarity.iloc[0] == pytest.approx(1.0, abs=1e-5)
    rows = [paths.index(p) for p in table.path]
    assert all(labels[r] >= 0 for r in rows)
    brute = _brute(db, db[10:11])[0]
    brute[labels < 0] = -np.inf
    assert rows == list(np.argsort(-brute)[:4])
    assert table["class"].iloc[0] == HYPERKVASIR_CLASSES[int(labels[10])].folder


def test_bad_inputs() -> None:
    db = np.ones((5, 4), np.float32)
    with pytest.raises(DataError, match="dimension 3, the index has 4"):
        knn_search(db, np.ones((2, 3), np.float32), k=1)
    with pytest.raises(ConfigError, match="unknown index kind"):
        build_index(db, kind="hnsw")
    with pytest.raises(ConfigError, match="nlist must be between 1 and the number of vectors \\(5\\)"):
        build_index(db, kind="ivf", nlist=6)
    if not gpu_available():
        with pytest.raises(ConfigError, match="no GPU"):
            build_index(db, use_gpu=True)


def test_zero_vectors_stay_zero() -> None:
    np.testing.assert_array_equal(l2_normalize(np.zeros((2, 3))), np.zeros((2, 3), np.float32))


def test_missing_faiss_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ConfigError, match=r"ssl_kvasir\[cpu\]. \(faiss-cpu\)"):
        build_index(np.ones((3, 2), np.float32))
