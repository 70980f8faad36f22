"""kNN of the unlabeled pile against the labeled images: FAISS flat inner product vs scikit-learn brute force.

The HyperKvasir shape: 99,417 unlabeled queries against 10,662 labeled vectors, k = 20, at 512 (ResNet-18)
and 2048 (ResNet-50) dimensions, on random L2-normalised vectors. Both searches are exact, so the work is one
(Q, D) x (D, N) matrix product plus a top-k; the script also measures this machine's own float32 matmul rate
(numpy and torch, same shapes) to say how close to the hardware each search gets:
GFLOP/s = 2 * Q * N * D / time.

scikit-learn is timed on a subsample of the queries (``--sklearn-queries``), right after FAISS on the same
subsample: the machine is shared, so only a ratio measured side by side means something. Its time for all
queries is scaled linearly (brute-force kNN costs the same per query); the output says so. Queries are generated batch by
batch so the 2048-d run does not hold 0.8 GB of queries.

    python bench/bench_knn.py            # all 99,417 queries (about 2 minutes on 2 cores)
    python bench/bench_knn.py --quick    # 20,000 queries

Target: FAISS at least 1.5x scikit-learn's speed at every dimension.
"""

from __future__ import annotations

import time

import numpy as np
from harness import best_of, closing_line, parser

from ssl_kvasir.analysis.knn import build_index, l2_normalize

N_LABELED, N_UNLABELED, K = 10_662, 99_417, 20


def _queries(start: int, stop: int, dim: int, seed: int) -> np.ndarray:
    """Queries ``start..stop`` (deterministic per batch, so both methods see the same vectors)."""
    return l2_normalize(
        np.random.default_rng([seed, 0, start]).standard_normal((stop - start, dim), dtype=np.float32)
    )


def matmul_gflops(dim: int, n: int, rows: int = 2048, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` float32 GFLOP/s of a (rows, dim) x (dim, n) product, numpy and torch."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, dim), dtype=np.float32)
    b = rng.standard_normal((n, dim), dtype=np.float32)
    flops = 2.0 * rows * n * dim

    rates = {"numpy": flops / best_of(lambda: a @ b.T, repeats)[0] / 1e9}
    try:
        import torch
    except ImportError:
        return rates
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    rates["torch"] = flops / best_of(lambda: ta @ tb.T, repeats)[0] / 1e9
    return rates


def bench_faiss(index, n_queries: int, dim: int, seed: int, batch: int) -> tuple[float, np.ndarray]:
    """Seconds to search the first ``n_queries`` queries (generation excluded), and their ids."""
    elapsed, ids = 0.0, []
    for start in range(0, n_queries, batch):
        q = _queries(start, min(start + batch, n_queries), dim, seed)
        t = time.perf_counter()
        _, batch_ids = index.search(q, K)
        elapsed += time.perf_counter() - t
        ids.append(batch_ids)
    return elapsed, np.concatenate(ids)


def bench_sklearn(db: np.ndarray, n_queries: int, dim: int, seed: int) -> tuple[float, np.ndarray]:
    """Seconds for scikit-learn brute-force kNN of the first ``n_queries`` queries, and their ids.

    Euclidean distance on unit vectors ranks neighbours exactly as cosine similarity does
    (|a - b|^2 = 2 - 2 a.b) and takes scikit-learn's fastest path (a GEMM per chunk).
    """
    from sklearn.neighbors import NearestNeighbors

    q = _queries(0, n_queries, dim, seed)
    nn = NearestNeighbors(n_neighbors=K, algorithm="brute", metric="euclidean").fit(db)
    t = time.perf_counter()
    _, ids = nn.kneighbors(q)
    return time.perf_counter() - t, ids


def _rate(flops: float, seconds: float, peak: float) -> str:
    return f"{flops / seconds / 1e9:6,.0f} GFLOP/s ({flops / seconds / 1e9 / peak:4.0%} of matmul)"


def main() -> None:
    p = parser(__doc__, quick="20,000 queries instead of 99,417")
    p.add_argument("--queries", type=int, help="number of queries (overrides --quick)")
    p.add_argument(
        "--sklearn-queries", type=int, default=3000, help="queries of the paired faiss/sklearn timing"
    )
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch", type=int, default=8192, help="FAISS query batch")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    n_queries = a.queries or (20_000 if a.quick else N_UNLABELED)
    n_pair = min(a.sklearn_queries, n_queries)
    print(f"kNN k={K}: {n_queries:,} queries against {N_LABELED:,} database vectors (exact cosine, float32)")
    print(
        f"scikit-learn is timed on the first {n_pair:,} queries only, with faiss on the same queries right "
        f"before it (the ratio comes from this pair); its full-run time is that time scaled x{n_queries / n_pair:.1f}"
    )
    speeds = []
    for dim in a.dims:
        db = l2_normalize(
            np.random.default_rng([a.seed, 1, 0]).standard_normal((N_LABELED, dim), dtype=np.float32)
        )
        before = matmul_gflops(dim, N_LABELED)
        index = build_index(db, use_gpu=False)
        all_s, _ = bench_faiss(index, n_queries, dim, a.seed, a.batch)
        pair_faiss_s, faiss_ids = bench_faiss(index, n_pair, dim, a.seed, a.batch)
        pair_sk_s, sk_ids = bench_sklearn(db, n_pair, dim, a.seed)
        # The machine is shared: the reference is measured before and after the searches, best kept.
        peak = {k: max(v, before[k]) for k, v in matmul_gflops(dim, N_LABELED).items()}
        best = max(peak.values())
        same = np.mean([set(f) == set(s) for f, s in zip(faiss_ids, sk_ids, strict=True)])
        flops, pair_flops = 2.0 * n_queries * N_LABELED * dim, 2.0 * n_pair * N_LABELED * dim
        print(f"\nD={dim}: matmul reference " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peak.items()))
        print(
            f"  faiss IndexFlatIP, all {n_queries:,} queries: {all_s:7.2f} s  {n_queries / all_s:7,.0f} queries/s  "
            + _rate(flops, all_s, best)
        )
        print(f"  paired on {n_pair:,} queries:")
        print(f"    faiss IndexFlatIP        {pair_faiss_s:6.2f} s  " + _rate(pair_flops, pair_faiss_s, best))
        print(
            f"    sklearn brute euclidean  {pair_sk_s:6.2f} s  "
            + _rate(pair_flops, pair_sk_s, best)
            + f"  -> all {n_queries:,} queries (scaled): {pair_sk_s * n_queries / n_pair:.1f} s"
        )
        print(
            f"    ratio faiss / sklearn speed: {pair_sk_s / pair_faiss_s:.2f}x   "
            f"same top-{K} sets: {same:.1%} of {n_pair:,} queries"
        )
        speeds.append(pair_sk_s / pair_faiss_s)
    # Target: 1.57x (D=512) to 2.2x was measured when the FAISS path landed; the worst dimension counts.
    closing_line("knn", "faiss / sklearn speed (worst dimension)", min(speeds), ">=", 1.5)


if __name__ == "__main__":
    main()
