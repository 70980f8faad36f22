"""The analysis's UMAP cost: two full-width single-threaded UMAP runs (before) vs ``analysis_projections``.

Baseline (the analysis until now): UMAP to 2-D for the plot and again to 5-D for HDBSCAN, each on the full
feature width with ``random_state`` set (which makes umap-learn run on one thread), each building its own
nearest-neighbour graph. Ours: :func:`ssl_kvasir.analysis.cluster.analysis_projections`: PCA to 50
dimensions, one neighbour graph shared by both projections, every core. Both get the same synthetic clustered
features (a mixture of 30 Gaussian groups of very unequal sizes in a 32-dimensional latent space, mapped to the
real width, 512 for ResNet-18 and 2048 for ResNet-50, plus noise, through a ReLU like a CNN's pooled
features, stored as float16 like ``embeddings/``). HDBSCAN then clusters each 5-D projection; the adjusted
Rand index (ARI) between the two clusterings says whether the cheaper path finds the same groups (and the ARI
of each against the generating groups is printed too).

The numba functions are compiled by a small warm-up run first, so neither contender pays for compilation.

    python bench/bench_umap.py            # 100,000 points at 512 and 2048 dimensions
    python bench/bench_umap.py --quick    # 12,000 points at 2048 dimensions
"""

from __future__ import annotations

import os
import time

import numpy as np
from harness import closing_line, parser
from sklearn.metrics import adjusted_rand_score

from ssl_kvasir.analysis.cluster import analysis_projections, hdbscan_cluster, umap_embed

N_GROUPS, LATENT = 30, 32
TARGET = 3.0


def clustered_features(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float16 features of width ``dim`` in ``N_GROUPS`` groups of unequal sizes, and the group ids."""
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(N_GROUPS, 0.7))  # (G,) very unequal, like HyperKvasir's classes
    groups = rng.choice(N_GROUPS, size=n, p=sizes)  # (N,)
    centers = rng.normal(scale=3.0, size=(N_GROUPS, LATENT))  # (G, L)
    mixing = rng.normal(size=(LATENT, dim)) / np.sqrt(LATENT)  # (L, D)
    out = np.empty((n, dim), dtype=np.float16)
    for start in range(0, n, 10_000):  # chunks keep the float64 temporaries small at 2048 dimensions
        g = groups[start : start + 10_000]
        latent = centers[g] + rng.normal(size=(len(g), LATENT))  # (n_chunk, L)
        x = latent @ mixing + 0.5 * rng.normal(size=(len(g), dim))  # (n_chunk, D)
        out[start : start + len(g)] = np.maximum(x, 0.0)
    return out, groups


def today(features: np.ndarray, seed: int) -> np.ndarray:
    """The analysis until now: two seeded (single-threaded) UMAP runs at full width."""
    umap_embed(features, 2, seed=seed, n_neighbors=15, min_dist=0.1, exact=True)  # the plot
    return umap_embed(features, 5, seed=seed, n_neighbors=15, min_dist=0.0, exact=True)  # (N, 5)


def ours(features: np.ndarray, seed: int, exact: bool = False) -> np.ndarray:
    """``analysis_projections`` as the analysis calls it (``exact``: on one thread, to separate the gain of
    PCA and the shared graph from that of the threads)."""
    projections = analysis_projections(
        features,
        cluster_dims=5,
        pca_dims=50,
        n_neighbors=15,
        min_dist=0.1,
        seed=seed,
        exact=exact,
        backend="umap-learn",
    )
    return projections.cluster  # (N, 5)


def main() -> None:
    p = parser(__doc__, quick="12,000 points at 2048 dimensions only, instead of 100,000 at 512 and 2048")
    p.add_argument("--n", type=int, help="number of points (overrides --quick)")
    p.add_argument("--dims", type=int, nargs="+", help="feature widths (default 512 2048; --quick: 2048)")
    p.add_argument("--min-cluster-size", type=int, default=50)
    a = p.parse_args()
    # Above 10,000 points umap-learn runs 200 epochs instead of 500, as at the real size: the quick form keeps that.
    n = a.n or (12_000 if a.quick else 100_000)
    dims = a.dims or ([2048] if a.quick else [512, 2048])
    import numba

    # At 4,096 points and more umap-learn switches from exact neighbours to NN-descent: warm that path up.
    warm, _ = clustered_features(5_000, 64, seed=1)
    today(warm, 0)
    ours(warm, 0, exact=True)
    ours(warm, 0)
    print(
        f"UMAP for the analysis (2-D plot + 5-D for HDBSCAN), {n:,} synthetic clustered points, "
        f"{os.cpu_count()} cores, numba threads {numba.get_num_threads()}, load average "
        f"{os.getloadavg()[0]:.1f} (other processes share the cores: the threads gain only what is free)"
    )
    print(
        f"{'width':>6} {'today s':>8} {'ours 1 thread s':>16} {'ours all cores s':>17} {'speed-up':>9} "
        f"{'ARI ours~today':>15} {'ARI vs truth':>14}"
    )
    speedups = []
    for dim in dims:
        features, groups = clustered_features(n, dim)
        times, spaces = {}, {}
        for name, fn in (
            ("today", lambda f=features: today(f, seed=0)),
            ("one thread", lambda f=features: ours(f, seed=0, exact=True)),
            ("ours", lambda f=features: ours(f, seed=0)),
        ):
            start = time.perf_counter()
            spaces[name] = fn()
            times[name] = time.perf_counter() - start
        labels_today, _ = hdbscan_cluster(spaces["today"], a.min_cluster_size)
        labels_ours, _ = hdbscan_cluster(spaces["ours"], a.min_cluster_size)
        agreement = adjusted_rand_score(labels_today, labels_ours)
        truth_today = adjusted_rand_score(groups, labels_today)
        truth_ours = adjusted_rand_score(groups, labels_ours)
        speedups.append(times["today"] / times["ours"])
        print(
            f"{dim:>6} {times['today']:>8.1f} {times['one thread']:>16.1f} {times['ours']:>17.1f} "
            f"{speedups[-1]:>8.1f}x {agreement:>15.3f} {truth_today:>6.3f}/{truth_ours:.3f}"
        )
    print(
        f"  load average now {os.getloadavg()[0]:.1f}; today = umap_embed x 2 (full width, random_state set: one "
        "thread); ours = PCA 50 + one kNN graph + 2 projections (exact=True: one thread; the default: all "
        "cores); speed-up = today / ours on all cores; ARI vs truth = today/ours against the generating groups"
    )
    closing_line("umap", "analysis speed-up", min(speedups), ">=", TARGET, digits=1)


if __name__ == "__main__":
    main()
