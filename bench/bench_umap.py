"""The analysis's UMAP cost: two full-width single-threaded UMAP runs (before) vs ``analysis_projections``.

Baseline (the analysis until now): UMAP to 2-D for the plot and again to 5-D for HDBSCAN, each on the full
feature width with ``random_state`` set (which makes umap-learn run on one thread), each building its own
nearest-neighbour graph and spectral start and running umap-learn's 200 layout epochs. Ours:
:func:`ssl_kvasir.analysis.cluster.analysis_projections` with the ``umap:`` settings of configs/analyze.yaml:
L2 + PCA to 50 dimensions, one neighbour graph and one spectral start shared by both projections, every core,
and fewer layout epochs (``plot_epochs``, ``cluster_epochs``). Both get the same synthetic clustered features
(a mixture of 30 Gaussian groups of very unequal sizes in a 32-dimensional latent space, mapped to the real
width, 512 for ResNet-18 and 2048 for ResNet-50, plus noise, through a ReLU like a CNN's pooled features,
stored as float16 like ``embeddings/``; ``--separation 1`` makes many groups overlap). HDBSCAN then clusters
each 5-D projection; the adjusted Rand index (ARI) between the two clusterings says whether the cheaper path
finds the same groups; it is accepted at >= 0.9 (see the README), and printed beside the ARI between two runs
of ours (one thread seeded, all cores), which is UMAP's own run-to-run variation. A profile says where each
path's time goes.

The numba functions are compiled by a small warm-up run first, so neither contender pays for compilation.

    python bench/bench_umap.py            # 100,000 points at 512 and 2048 dimensions
    python bench/bench_umap.py --quick    # 12,000 points at 2048 dimensions
    python bench/bench_umap.py --quick --separation 1   # overlapping groups: a harder agreement test
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from harness import closing_line, parser
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import adjusted_rand_score

from ssl_kvasir.analysis.cluster import Projections, analysis_projections, hdbscan_cluster, umap_embed
from ssl_kvasir.config import config_dir

N_GROUPS, LATENT = 30, 32
TARGET = 3.0
MIN_AGREEMENT = 0.9  # the README says why


def clustered_features(
    n: int, dim: int, seed: int = 0, separation: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float16 features of width ``dim`` in ``N_GROUPS`` groups of unequal sizes, and the group ids.

    ``separation`` is the spread of the group centres in units of the within-group spread: at 3 the groups
    are apart, at 1 many of them overlap (harder for any clustering, and for a cheaper one to agree)."""
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(N_GROUPS, 0.7))  # (G,) very unequal, like HyperKvasir's classes
    groups = rng.choice(N_GROUPS, size=n, p=sizes)  # (N,)
    centers = rng.normal(scale=separation, size=(N_GROUPS, LATENT))  # (G, L)
    mixing = rng.normal(size=(LATENT, dim)) / np.sqrt(LATENT)  # (L, D)
    out = np.empty((n, dim), dtype=np.float16)
    for start in range(0, n, 10_000):  # chunks keep the float64 temporaries small at 2048 dimensions
        g = groups[start : start + 10_000]
        latent = centers[g] + rng.normal(size=(len(g), LATENT))  # (n_chunk, L)
        x = latent @ mixing + 0.5 * rng.normal(size=(len(g), dim))  # (n_chunk, D)
        out[start : start + len(g)] = np.maximum(x, 0.0)
    return out, groups


@contextmanager
def neighbour_search_clock(seconds: list[float]) -> Iterator[None]:
    """Add the wall time of every ``umap.umap_.nearest_neighbors`` call to ``seconds`` (today's profile: how
    much of two full-width UMAP runs is their neighbour searches)."""
    import umap.umap_

    real = umap.umap_.nearest_neighbors

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = real(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return out

    umap.umap_.nearest_neighbors = timed
    try:
        yield
    finally:
        umap.umap_.nearest_neighbors = real


def today(features: np.ndarray, seed: int) -> np.ndarray:
    """The analysis until now: two seeded (single-threaded) UMAP runs at full width, 200 epochs each."""
    umap_embed(features, 2, seed=seed, n_neighbors=15, min_dist=0.1, exact=True)  # the plot
    return umap_embed(features, 5, seed=seed, n_neighbors=15, min_dist=0.0, exact=True)  # (N, 5)


def ours(features: np.ndarray, seed: int, settings: DictConfig, exact: bool = False) -> Projections:
    """``analysis_projections`` as the analysis calls it, with the ``umap:`` settings of configs/analyze.yaml
    (``exact``: on one thread, to separate the gain of the shared work from that of the threads)."""
    return analysis_projections(
        features,
        cluster_dims=settings.cluster_dims,
        pca_dims=settings.pca_dims,
        n_neighbors=settings.n_neighbors,
        min_dist=settings.min_dist,
        seed=seed,
        exact=exact,
        backend="umap-learn",
        plot_epochs=settings.plot_epochs,
        cluster_epochs=settings.cluster_epochs,
    )


def main() -> None:
    p = parser(__doc__, quick="12,000 points at 2048 dimensions only, instead of 100,000 at 512 and 2048")
    p.add_argument("--n", type=int, help="number of points (overrides --quick)")
    p.add_argument("--dims", type=int, nargs="+", help="feature widths (default 512 2048; --quick: 2048)")
    p.add_argument("--min-cluster-size", type=int, default=50)
    p.add_argument("--separation", type=float, default=3.0, help="group centres' spread (1: overlapping)")
    a = p.parse_args()
    # Above 10,000 points umap-learn runs 200 epochs instead of 500, as at the real size: the quick form keeps that.
    n = a.n or (12_000 if a.quick else 100_000)
    dims = a.dims or ([2048] if a.quick else [512, 2048])
    settings = OmegaConf.load(config_dir() / "analyze.yaml").umap
    import numba

    # At 4,096 points and more umap-learn switches from exact neighbours to NN-descent: warm that path up.
    warm, _ = clustered_features(5_000, 64, seed=1)
    today(warm, 0)
    ours(warm, 0, settings, exact=True)
    ours(warm, 0, settings)
    print(
        f"UMAP for the analysis (2-D plot + 5-D for HDBSCAN), {n:,} synthetic clustered points "
        f"(separation {a.separation:g}), {os.cpu_count()} cores, numba threads {numba.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} (other processes share the cores: the threads gain only what "
        f"is free); ours: pca_dims {settings.pca_dims}, plot_epochs {settings.plot_epochs}, cluster_epochs "
        f"{settings.cluster_epochs} (configs/analyze.yaml)"
    )
    print(
        f"{'width':>6} {'today s':>8} {'ours 1 thread s':>16} {'ours all cores s':>17} {'speed-up':>9} "
        f"{'ARI ours~today':>15} {'ARI ours~ours':>14} {'ARI vs truth':>13}"
    )
    speedups, agreements, profiles = [], [], []
    for dim in dims:
        features, groups = clustered_features(n, dim, separation=a.separation)
        searches: list[float] = []
        start = time.perf_counter()
        with neighbour_search_clock(searches):
            space_today = today(features, seed=0)
        t_today = time.perf_counter() - start
        start = time.perf_counter()
        one_thread = ours(features, seed=0, settings=settings, exact=True)
        t_one = time.perf_counter() - start
        start = time.perf_counter()
        parallel = ours(features, seed=0, settings=settings)
        t_ours = time.perf_counter() - start
        labels_today, _ = hdbscan_cluster(space_today, a.min_cluster_size)
        labels_one, _ = hdbscan_cluster(one_thread.cluster, a.min_cluster_size)
        labels_ours, _ = hdbscan_cluster(parallel.cluster, a.min_cluster_size)
        agreements.append(adjusted_rand_score(labels_today, labels_ours))
        speedups.append(t_today / t_ours)
        print(
            f"{dim:>6} {t_today:>8.1f} {t_one:>16.1f} {t_ours:>17.1f} {speedups[-1]:>8.1f}x "
            f"{agreements[-1]:>15.3f} {adjusted_rand_score(labels_one, labels_ours):>14.3f} "
            f"{adjusted_rand_score(groups, labels_today):>6.3f}/{adjusted_rand_score(groups, labels_ours):.3f}"
        )
        steps = ", ".join(f"{k} {v:.1f}" for k, v in parallel.seconds.items())
        profiles.append(
            f"  {dim}: today {t_today:.1f} s = neighbour searches {sum(searches):.1f} (x{len(searches)}) + "
            f"spectral starts and 2 x 200 layout epochs {t_today - sum(searches):.1f}; "
            f"ours {t_ours:.1f} s = {steps}"
        )
    print(
        f"  load average now {os.getloadavg()[0]:.1f}; today = umap_embed x 2 (full width, random_state set: one "
        "thread); ours = L2 + PCA + one kNN graph + one spectral start + 2 layouts (exact=True: one thread; the "
        "default: all cores); speed-up = today / ours on all cores; ARI ours~today: HDBSCAN clusterings of the "
        "two 5-D projections; ARI ours~ours: ours on one thread (seeded) against all cores (UMAP's own "
        "run-to-run variation); ARI vs truth = today/ours against the generating groups"
    )
    print("where the time goes (seconds):")
    print("\n".join(profiles))
    floor = min(agreements)
    print(
        f"cluster agreement: lowest ARI ours~today = {floor:.3f} (accepted >= {MIN_AGREEMENT}: "
        f"{'met' if floor >= MIN_AGREEMENT else 'NOT met'})"
    )
    closing_line("umap", "analysis speed-up", min(speedups), ">=", TARGET, digits=1)


if __name__ == "__main__":
    main()
