"""Does the loader keep training busy? FixMatch steps per second with loading vs on batches held in memory.

Both sides train the same FixMatch module (same backbone, batch, mu, precision) with a Lightning Trainer:
*with loading*, the real ``KvasirDataModule`` reads a prepared cache (``prepare_cache`` at 256 px of a
synthetic archive at realistic sizes) with ``--workers`` worker processes that only decode; *without*, the
same DataModule's batches, collected beforehand, are replayed from memory (loading excluded). The views
(flip, crop, FixMatch's RandAugment, Cutout, normalisation) are made on the training device on both sides,
so the ratio is what loading costs the step. Each side runs ``--rounds`` times alternately; the first
``--warmup`` steps of a fit (worker start-up, allocator, cuDNN) are not timed, nor is a first fit that
warms the process up.

Then, per CPU core (one process, one torch thread), FixMatch unlabeled items (a weak and a strong view each)
per second: the old path (decode, resize, then torchvision + timm PIL views on the CPU, as the workers did
before) against the new one (decode and resize to uint8 in the worker; views batched, timed on the CPU here,
on the GPU in training).

CPU default: ResNet-18 at 64 px, batch 8, mu 7, 1 worker, float32. With CUDA: ResNet-50 at 224 px,
bf16-mixed + channels_last, batch 32, mu 7, 8 workers.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import harness
import lightning as L
import numpy as np
import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CACHE_SIZE = 256


def prepared(out: Path, per_class: int, unlabeled: int):
    """A synthetic archive at realistic sizes and its 256 px cache: (catalog, split, cache)."""
    from ssl_kvasir.data.archive import load_catalog
    from ssl_kvasir.data.cache import ImageCache, prepare_cache
    from ssl_kvasir.data.splits import make_split
    from ssl_kvasir.data.synth import make_synthetic_archive

    root = make_synthetic_archive(out / "archive", per_class=per_class, unlabeled=unlabeled, seed=0)
    catalog = load_catalog(root, split_file=root / "2_fold_split.csv")
    prepare_cache(root, list(catalog.images.path), out / "cache", size=CACHE_SIZE, progress=False)
    split = make_split(catalog, eval_fold=0, val_fraction=0.0, seed=0)  # every label
    return catalog, split, ImageCache(out / "cache")


def datamodule(catalog, split, cache, args, steps: int):
    from ssl_kvasir.data.datamodule import KvasirDataModule
    from ssl_kvasir.methods import FixMatch

    return KvasirDataModule(
        catalog,
        split,
        image_size=args.image_size,
        mean=MEAN,
        std=STD,
        batch_size=args.batch_size,
        mu=args.mu,
        labeled_views=FixMatch.labeled_views,
        unlabeled_views=FixMatch.unlabeled_views,
        steps_per_epoch=steps,
        num_workers=args.workers,
        cache=cache,
        seed=0,
    )


class HeldBatches(L.LightningDataModule):
    """The batches of a DataModule's first ``n`` steps, collected once and replayed from memory; the views
    are made after the transfer exactly as the DataModule makes them."""

    def __init__(self, dm, n: int):
        super().__init__()
        self.view_maker = dm.view_maker
        loaders = dm.train_dataloader()
        steps = zip(*loaders.values(), strict=True)
        self.batches = [
            dict(zip(loaders, step, strict=True)) for step, _ in zip(steps, range(n), strict=False)
        ]

    def train_dataloader(self):
        return harness.Replay(self.batches)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.view_maker(batch)


class StepClock(L.Callback):
    """The wall time at the end of every training step (after the device finished it)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def steps_per_second(data: L.LightningDataModule, dm, args, cuda: bool, steps: int) -> float:
    """Train a fresh FixMatch module for ``warmup + steps`` steps on ``data``; timed steps per second."""
    from ssl_kvasir.methods import FixMatch
    from ssl_kvasir.models import build_network

    torch.manual_seed(0)
    network = build_network(args.backbone, dm.num_classes)
    if cuda:
        network = network.to(memory_format=torch.channels_last)
    module = FixMatch.from_config(
        network,
        class_names=dm.catalog.classes.names,
        max_steps=args.warmup + steps,
        **FixMatch.data_kwargs(dm),
    )
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(
            max_steps=args.warmup + steps,
            max_epochs=-1,
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            precision="bf16-mixed" if cuda else "32-true",
            logger=False,
            callbacks=[clock],
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
        )
        trainer.fit(module, datamodule=data)
    timed = clock.ends[args.warmup - 1 :]  # from the end of the last warm-up step
    return (len(timed) - 1) / (timed[-1] - timed[0])


def items_per_core(dm, rows: np.ndarray, repeat: int) -> dict[str, float]:
    """Unlabeled items (weak + strong view) per second in one process with one torch thread."""
    from torchvision import transforms as T

    from ssl_kvasir.data.augment import make_views, weak_padding
    from ssl_kvasir.data.datamodule import seeded
    from ssl_kvasir.data.transforms import timm_rand_augment

    ds = dm.dataset(rows, ("weak", "strong"))
    # The old path: each view's PIL transforms after one shared resize (what the workers ran before): flip
    # and reflect-padded crop; for the strong view timm's RandAugment and, after normalisation, Cutout.
    size = dm.image_size
    weak = [T.RandomHorizontalFlip(), T.RandomCrop(size, padding=weak_padding(size), padding_mode="reflect")]
    to_tensor = [T.ToTensor(), T.Normalize(MEAN, STD)]
    cutout = T.RandomErasing(p=1.0, scale=(0.02, 0.25), ratio=(1.0, 1.0), value=0.0)
    old_views = [
        T.Compose([*weak, *to_tensor]),
        T.Compose([*weak, timm_rand_augment(size, MEAN, color=True), *to_tensor, cutout]),
    ]

    def old():
        for i in range(len(rows)):
            image = ds.load(i)
            with seeded(i):
                for view in old_views:
                    view(image)

    def decode():
        return [ds[(i, i)] for i in range(len(rows))]

    samples = decode()
    batch = {"image": torch.stack([s["image"] for s in samples]), "aug_seed": torch.arange(len(rows))}

    def views():
        make_views(batch, ("weak", "strong"), MEAN, STD, dm.image_size)

    n = len(rows)
    t_old = harness.best_of(old, repeat)[0]
    t_decode = harness.best_of(decode, repeat)[0]
    t_views = harness.best_of(views, repeat)[0]
    return {
        "old PIL views": n / t_old,
        "new, worker (decode + resize)": n / t_decode,
        "new, worker + batched views on this CPU": n / (t_decode + t_views),
    }


def main() -> None:
    p = harness.parser(__doc__, quick="fewer steps, one round, a smaller archive")
    cuda = torch.cuda.is_available()
    p.add_argument("--backbone", default="resnet50" if cuda else "resnet18")
    p.add_argument("--image-size", type=int, default=224 if cuda else 64)
    p.add_argument("--batch-size", type=int, default=32 if cuda else 8)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if cuda else 1)
    p.add_argument("--steps", type=int, default=None, help="timed steps per fit")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each fit")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of the two sides")
    args = p.parse_args()
    args.steps = args.steps or (4 if args.quick else 40 if cuda else 12)
    args.warmup = args.warmup or (2 if args.quick else 10 if cuda else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    if not cuda:
        torch.set_num_threads(1)  # steadier on a shared machine; the workers have their own cores
    warnings.filterwarnings("ignore")  # Lightning's hints about workers and loggers are not what is measured
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    per_class, unlabeled = (2, 40) if args.quick else (10, 600)
    with tempfile.TemporaryDirectory() as tmp:
        catalog, split, cache = prepared(Path(tmp), per_class, unlabeled)
        total = args.warmup + args.steps
        dm = datamodule(catalog, split, cache, args, total)
        held = HeldBatches(datamodule(catalog, split, cache, args, total), total)
        # An untimed fit first: the process's first fit pays one-off costs (thread pools, allocator) that
        # would otherwise fall on whichever side runs first. Then the sides alternate their order by round.
        steps_per_second(held, dm, args, cuda, 2)
        with_loading, without = [], []
        for r in range(args.rounds):
            sides = [(dm, with_loading), (held, without)]
            for data, rates in sides if r % 2 == 0 else sides[::-1]:
                rates.append(steps_per_second(data, dm, args, cuda, args.steps))
        rows = split.unlabeled[: 24 if args.quick else 96]
        rates = items_per_core(
            datamodule(catalog, split, cache, args, total), rows, repeat=2 if args.quick else 3
        )

    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch thread(s)"
    print(
        f"FixMatch {args.backbone} {args.image_size}px B={args.batch_size} mu={args.mu} "
        f"{'bf16-mixed + channels_last' if cuda else 'float32'} on {device}, {args.workers} worker(s), "
        f"{args.steps} timed steps x {args.rounds} round(s)"
    )
    print(f"  steps/s with loading:    {' '.join(f'{r:.3f}' for r in with_loading)}")
    print(f"  steps/s without loading: {' '.join(f'{r:.3f}' for r in without)}")
    print(
        f"unlabeled items (weak + strong) per second per core, {args.image_size}px from the {CACHE_SIZE}px cache:"
    )
    for what, rate in rates.items():
        print(f"  {what:42s} {rate:8.1f}  ({rate / rates['old PIL views']:.2f}x the old path)")
    ratio = statistics.median(a / b for a, b in zip(with_loading, without, strict=True))
    harness.closing_line("pipeline", "steps/s with loading / without", ratio, ">=", 0.90)


if __name__ == "__main__":
    main()
