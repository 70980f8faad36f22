"""Assembling FixMatch training batches: from the prepared cache vs from the original JPEGs.

Both sides run the same code path: ``KvasirDataModule.train_dataloader()`` with FixMatch's views (labeled
stream: weak; unlabeled stream: weak + strong) at 224 px, the same batch size, mu and number of workers, and
the same sampler seeds, so they assemble the same batches (images per second counts the labeled and
unlabeled images of a step, each with all its views). Baseline: decoding the synthetic archive's JPEGs
(realistic sizes 720x576, 1280x1024, 1920x1072, decoded with DCT scaling). Ours: the prepared cache built
at 256 px by ``prepare_cache``. In-process (0 workers, the default) the two are stepped alternately and
each rate comes from the median step time, so both see the same load of the shared machine; with workers,
whole rounds alternate and the best is kept (only the ratio matters). A per-stage profile then shows where
the time of one training sample goes (read, decode, each transform of the views; median over images).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

IMAGE_SIZE = 224
CACHE_SIZE = 256


def make_archive(out: Path, per_class: int, unlabeled: int) -> Path:
    """A synthetic HyperKvasir archive at realistic sizes (its own default sizes)."""
    from ssl_kvasir.data.synth import make_synthetic_archive

    return make_synthetic_archive(out, per_class=per_class, unlabeled=unlabeled, seed=0)


def datamodule(root: Path, cache, batch_size: int, mu: int, steps: int, workers: int):
    """The DataModule of a FixMatch run on ``root`` (every training image labeled and unlabeled too)."""
    from ssl_kvasir.data.archive import load_catalog
    from ssl_kvasir.data.datamodule import KvasirDataModule
    from ssl_kvasir.data.splits import make_split
    from ssl_kvasir.methods import FixMatch

    catalog = load_catalog(root, split_file=root / "2_fold_split.csv")
    split = make_split(catalog, eval_fold=0, val_fraction=0.0, label_fraction=1.0, seed=0)
    return KvasirDataModule(
        catalog,
        split,
        image_size=IMAGE_SIZE,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        batch_size=batch_size,
        mu=mu,
        labeled_views=FixMatch.labeled_views,
        unlabeled_views=FixMatch.unlabeled_views,
        unlabeled_rest=True,
        use_archive_unlabeled=True,
        steps_per_epoch=steps,
        num_workers=workers,
        cache=cache,
        seed=0,
    )


def _steps(dm):
    """An iterator over the training steps of ``dm`` (one batch of every stream per step)."""
    loaders = dm.train_dataloader()
    return zip(*loaders.values(), strict=True)


def samples_per_step(dm) -> int:
    """Training samples (labeled + unlabeled images, each with all its views) in one step."""
    return sum(s.batch_size for s in dm.streams.values())


def lockstep_rates(dm_a, dm_b, rounds: int) -> tuple[float, float]:
    """Samples/s of two in-process (0 worker) DataModules, stepping them alternately and taking the median
    step time of each, so that both see the same load of the shared machine."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        iters = (_steps(dm_a), _steps(dm_b))
        while True:
            try:
                for it, clock in zip(iters, times, strict=True):
                    t = time.perf_counter()
                    next(it)
                    clock.append(time.perf_counter() - t)
            except StopIteration:
                break
    return samples_per_step(dm_a) / statistics.median(times[0]), samples_per_step(dm_b) / statistics.median(
        times[1]
    )


def worker_rate(dm) -> float:
    """Samples/s of a DataModule with worker processes; the first step (worker start-up) is not timed."""
    steps, start = 0, None
    for _ in _steps(dm):
        steps += 1
        if start is None:
            start = time.perf_counter()
    return (steps - 1) * samples_per_step(dm) / (time.perf_counter() - start)


def _timed(fn, x, clock: dict, key: str):
    t = time.perf_counter()
    y = fn(x)
    clock[key].append(time.perf_counter() - t)
    return y


def profile(dm, cache, rows: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per image of each stage, for the original JPEGs and for the cache.

    Stages: reading the bytes, decoding them (with DCT scaling to >= 224 px), the resize to 224 px that the
    views share, then every further transform of the weak and the strong view in pipeline order
    (``weak:RandomCrop``, ``strong:RandAugment``, ...). The two
    sources alternate image by image, so that both see the same load of the machine.
    """
    from ssl_kvasir.data.decode import decode_image
    from ssl_kvasir.data.transforms import build_view

    paths = dm.catalog.images.path.to_numpy()[rows]
    root = dm.catalog.root
    views = {v: build_view(v, IMAGE_SIZE, dm.mean, dm.std) for v in ("weak", "strong")}
    read = {"jpeg": lambda p: (root / p).read_bytes(), "cache": cache.read_bytes}
    clocks: dict[str, dict[str, list[float]]] = {s: defaultdict(list) for s in read}
    for _ in range(repeats):
        for path in paths:
            for source, clock in clocks.items():
                data = _timed(read[source], path, clock, "read")
                image = _timed(lambda d, p=path: decode_image(d, IMAGE_SIZE, name=p), data, clock, "decode")
                # The views share one resize (apply_views), then each runs the rest of its pipeline.
                resized = _timed(views["weak"].resize, image, clock, "resize")
                for name, view in views.items():
                    x = resized
                    for tf in view.rest.transforms:
                        x = _timed(tf, x, clock, f"{name}:{type(tf).__name__}")
    return {s: {k: 1e3 * statistics.median(v) for k, v in clock.items()} for s, clock in clocks.items()}


def print_profile(prof: dict, batch_size: int, mu: int) -> None:
    """Per-stage milliseconds and each stage's share of one step's work (B labeled weak, mu B unlabeled weak +
    strong; decoding once per image)."""
    n_lb, n_ulb = batch_size, mu * batch_size
    stages = list(prof["jpeg"])

    def per_step(source: str, stage: str) -> float:
        ms = prof[source][stage]
        if stage.startswith("strong:"):
            return n_ulb * ms
        return (n_lb + n_ulb) * ms  # read, decode, resize and every weak stage: each image of the step

    totals = {s: sum(per_step(s, k) for k in stages) for s in ("jpeg", "cache")}
    print(f"profile, ms per image and share of a step ({n_lb} labeled weak + {n_ulb} unlabeled weak+strong):")
    print(f"  {'stage':<26}{'jpeg ms':>9}{'share':>8}{'cache ms':>10}{'share':>8}")
    for k in stages:
        print(
            f"  {k:<26}{prof['jpeg'][k]:>9.3f}{100 * per_step('jpeg', k) / totals['jpeg']:>7.1f}%"
            f"{prof['cache'][k]:>10.3f}{100 * per_step('cache', k) / totals['cache']:>7.1f}%"
        )
    print(
        f"  {'step total (1 process)':<26}{totals['jpeg']:>9.1f} ms{'':>4}{totals['cache']:>8.1f} ms"
        f"   -> predicted ratio {totals['jpeg'] / totals['cache']:.2f}x"
    )
    io_jpeg = per_step("jpeg", "read") + per_step("jpeg", "decode")
    io_cache = per_step("cache", "read") + per_step("cache", "decode")
    print(
        f"  read+decode alone: jpeg {io_jpeg:.1f} ms, cache {io_cache:.1f} ms per step ({io_jpeg / io_cache:.2f}x); "
        f"the views cost {totals['cache'] - io_cache:.1f} ms per step on both sides"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller archive, fewer steps and rounds")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader workers of each stream, the same for both (0: in-process, timed in lockstep)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="labeled images per step")
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    args = parser.parse_args()

    import torch

    from ssl_kvasir.data.cache import ImageCache, prepare_cache

    torch.set_num_threads(args.threads)
    per_class, unlabeled = (2, 60) if args.quick else (4, 200)
    steps, rounds = (4, 2) if args.quick else (8, 3)
    with tempfile.TemporaryDirectory(prefix="ssl_kvasir_bench_loading_") as tmp:
        root = make_archive(Path(tmp) / "archive", per_class, unlabeled)
        jpeg_dm = datamodule(root, None, args.batch_size, args.mu, steps, args.workers)
        paths = list(jpeg_dm.catalog.images.path)
        report = prepare_cache(root, paths, Path(tmp) / "cache", CACHE_SIZE, workers=1, progress=False)
        cache = ImageCache(report.cache_dir)
        cache_dm = datamodule(root, cache, args.batch_size, args.mu, steps, args.workers)
        print(
            f"{len(paths)} synthetic JPEGs (720x576 / 1280x1024 / 1920x1072), cache at {CACHE_SIZE} px; FixMatch "
            f"batches of {args.batch_size} labeled (weak) + {args.mu * args.batch_size} unlabeled (weak + strong) "
            f"at {IMAGE_SIZE} px, {args.workers} worker(s), {steps} steps a round"
        )
        if args.workers == 0:
            jpeg_rate, cache_rate = lockstep_rates(jpeg_dm, cache_dm, rounds)
            how = f"median step, {rounds} x {steps} steps each, in lockstep"
        else:
            # Workers prefetch, so the two cannot be interleaved step by step: alternate whole rounds.
            jpeg_rate = cache_rate = 0.0
            for _ in range(rounds):
                jpeg_rate = max(jpeg_rate, worker_rate(jpeg_dm))
                cache_rate = max(cache_rate, worker_rate(cache_dm))
            how = f"best of {rounds} alternating rounds of {steps} steps"
        print(
            f"loading ({how}): jpeg {jpeg_rate:7.1f} images/s | cache {cache_rate:7.1f} images/s | "
            f"cache/jpeg {cache_rate / jpeg_rate:.2f}x"
        )
        rows = np.arange(len(paths))[:: max(1, len(paths) // (40 if args.quick else 120))]
        print_profile(profile(jpeg_dm, cache, rows, repeats=1 if args.quick else 2), args.batch_size, args.mu)


if __name__ == "__main__":
    main()
