"""Datasets, samplers and the LightningDataModule.

Training is counted in steps; an "epoch" is ``steps_per_epoch`` steps, after which the model is validated and
checkpointed. Every training stream draws its indices from an :class:`EpochSampler`, a fixed function of
(seed, epoch), so a run resumed from an end-of-epoch checkpoint sees exactly the batches that an
uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ssl_kvasir.data.archive import Catalog
from ssl_kvasir.data.augment import STRONG_POLICIES, ViewMaker
from ssl_kvasir.data.splits import ExperimentSplit, unlabeled_pool
from ssl_kvasir.data.transforms import timm_strong_image
from ssl_kvasir.names import SAMPLERS

if TYPE_CHECKING:
    from lightning.pytorch.loops.progress import _ProcessedTracker


class ImageDataset(Dataset):
    """Images of a catalog, decoded and resized once to the network's input, plus their identity.

    A sample is ``{"index": catalog row, "pos": position in this dataset, "path": path relative to the root,
    "label": class or -1, "aug_seed": the seed of its views, "image": (3, S, S) uint8,
    "<view>_image": (3, S, S) uint8 for each view made here (``pil_views``), "target": (C,) probabilities when
    soft targets are given}``. The views themselves are made from ``image`` in batch, on the training device
    (:class:`~ssl_kvasir.data.augment.ViewMaker`).

    Args:
        root: the archive root (images are read from it when there is no cache).
        paths: image paths relative to ``root``.
        rows: the catalog rows of the images.
        labels: their classes (-1: unknown).
        image_size: the side S every image is resized to (bilinear, antialiased, as a square).
        cache: an ``ImageCache`` or None to decode the JPEGs.
        targets: optional ``(N, C)`` soft targets.
        pil_views: view name -> a PIL transform of the resized image returning ``(3, S, S)`` uint8, run in the
            worker under the sample's seed (timm's RandAugment policy).
    """

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        rows: np.ndarray,
        labels: np.ndarray,
        image_size: int,
        cache=None,
        targets: np.ndarray | None = None,
        pil_views: Mapping[str, Callable] | None = None,
    ):
        self.root = Path(root)
        self.paths = list(paths)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = image_size
        self.cache = cache
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        self.pil_views = dict(pil_views or {})

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int) -> Image.Image:
        """The decoded RGB image of item ``i`` (from the cache when there is one), resized to S x S."""
        from ssl_kvasir.data.decode import decode_image

        path = self.paths[i]
        if self.cache is not None:
            image = self.cache.load(path, self.image_size)
        else:
            image = decode_image(self.root / path, self.image_size, name=str(self.root / path))
        size = (self.image_size, self.image_size)
        # PIL's bilinear resize filters over the whole footprint when shrinking (antialiased).
        return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        # From an EpochSampler: (position, augmentation seed), so a sample's views are a function of (seed,
        # epoch, position in the epoch), whatever process makes them and whether the run was resumed.
        i, aug_seed = item if isinstance(item, tuple) else (item, 0)
        image = self.load(i)
        sample = {
            "index": int(self.rows[i]),
            "pos": i,
            "path": self.paths[i],
            "label": int(self.labels[i]),
            "aug_seed": aug_seed,
            "image": torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()),  # (3, S, S) uint8
        }
        for name, view in self.pil_views.items():
            with seeded(aug_seed):
                sample[f"{name}_image"] = view(image)  # (3, S, S) uint8
        if self.targets is not None:
            sample["target"] = torch.from_numpy(self.targets[i])
        return sample


@dataclass(frozen=True)
class StreamCollate:
    """Collates a stream's samples and says which views the batch needs; the random parameters of those views
    are drawn here, in the worker (a few numbers a sample, from each sample's ``aug_seed``), and travel as numpy
    arrays, which Lightning does not move: grouping samples by operation on the device then needs no sync.

    Args:
        views: the view names the stream's consumer reads.
        maker: the view settings (image size, colour, policy).
    """

    views: tuple[str, ...]
    maker: ViewMaker

    def __call__(self, samples: list[dict]) -> dict:
        batch = default_collate(samples)
        batch["views"] = self.views
        batch["aug"] = {v: self.maker.params(batch["aug_seed"], v) for v in self.views if v != "eval"}
        return batch


@contextlib.contextmanager
def seeded(seed: int):
    """Seed the generators that PIL augmentations draw from (torchvision: torch; timm's RandAugment: random and
    numpy), and restore them afterwards, so that loading data never shifts the random stream of training."""
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class EpochSampler(Sampler[tuple[int, int]]):
    """``num_samples`` items per epoch and per process, drawn as reshuffled passes over ``n`` items.

    Yields ``(position, augmentation seed)`` pairs. Both are fixed functions of ``(seed, epoch)``; under DDP
    every rank takes its own stride of one shared order, so ranks never see the same item in a step.

    Args:
        n: number of items.
        num_samples: items per epoch and process.
        seed: the stream's seed.
        epoch_fn: reads the current epoch when an epoch's iterator is made (the trainer's epoch, which a
            resumed run restores); without it, the epoch given to :meth:`set_epoch`.
        skip_fn: reads, when an epoch's iterator is made, how many of this process's items of the epoch were
            already trained on (non-zero only for a run resumed from a checkpoint written mid-epoch, see
            ``run.preempt``); those are left out, so the resumed epoch serves what the interrupted one had
            left. The order and seeds of the items served do not change.
    """

    def __init__(
        self,
        n: int,
        num_samples: int,
        seed: int,
        epoch_fn: Callable[[], int] | None = None,
        skip_fn: Callable[[], int] | None = None,
    ):
        if n == 0:
            raise ValueError("cannot sample from an empty set")
        self.n, self.num_samples, self.seed, self.epoch, self.epoch_fn = n, num_samples, seed, 0, epoch_fn
        self.skip_fn = skip_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        total = self.num_samples * world
        order = self.order(total, g)  # (total,)
        base = (self.seed * 1_000_003 + epoch) * 10_000_019
        skip = self.skip_fn() if self.skip_fn is not None else 0  # items of this process already trained on
        return iter((int(order[k]), (base + k) % 2**63) for k in range(rank + skip * world, total, world))

    def order(self, total: int, g: torch.Generator) -> torch.Tensor:
        """``total`` positions for one epoch of all processes: reshuffled passes over the ``n`` items."""
        passes = -(-total // self.n)
        return torch.cat([torch.randperm(self.n, generator=g) for _ in range(passes)])[:total]


class ClassBalancedSampler(EpochSampler):
    """An :class:`EpochSampler` whose every draw picks a class uniformly, then an item of that class uniformly
    (with replacement): rare classes are seen as often as common ones. A function of ``(seed, epoch)`` like
    its parent, so resumed runs stay exact.

    Args:
        labels: ``(n,)`` the items' classes.
        num_samples, seed, epoch_fn: as for :class:`EpochSampler`.
    """

    def __init__(
        self,
        labels: np.ndarray,
        num_samples: int,
        seed: int,
        epoch_fn: Callable[[], int] | None = None,
        skip_fn: Callable[[], int] | None = None,
    ):
        super().__init__(len(labels), num_samples, seed, epoch_fn, skip_fn)
        classes = torch.as_tensor(np.asarray(labels), dtype=torch.long)  # (n,)
        counts = torch.bincount(classes)  # (C,)
        # Each item weighs 1 / (its class's size): every present class then carries the same total weight.
        self.weights = 1.0 / counts[classes].double()  # (n,)

    def order(self, total: int, g: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.weights, total, replacement=True, generator=g)


@dataclass(frozen=True)
class Stream:
    """One training stream: which images, which views, how many per step."""

    rows: np.ndarray
    labels: np.ndarray
    views: tuple[str, ...]
    batch_size: int
    targets: np.ndarray | None = None


class KvasirDataModule(L.LightningDataModule):
    """Serves the training streams of a method plus validation, test and predict loaders.

    Args:
        catalog: the archive.
        split: the experiment's parts.
        image_size: input side in pixels.
        mean, std: normalisation (the backbone's timm data config).
        batch_size: labeled images per step (per process under DDP).
        mu: unlabeled images per labeled image in a step (FixMatch's mu).
        labeled_views: views of the labeled stream (``lb``).
        unlabeled_views: views of the unlabeled stream (``ulb``); empty = no unlabeled stream.
        unlabeled_rest: whether the training-fold images outside the labeled subset join the unlabeled pool
            (their labels are kept only to measure pseudo-label accuracy).
        use_archive_unlabeled: whether the archive's unlabeled images join the unlabeled pool.
        pseudo_labeled: an optional pseudo-labeled stream (``pl``): catalog rows and (N, C) target
            probabilities.
        pseudo_views: views of the pseudo-labeled stream.
        steps_per_epoch: steps between validations and checkpoints.
        num_workers: DataLoader worker processes.
        cache: an ``ImageCache`` or None to decode the JPEGs.
        strong_color: whether the strong view may change colours.
        strong_policy: ``fixmatch`` (the FixMatch paper's RandAugment, on the training device) or ``timm``
            (timm's ``rand-m10-n2-mstd0.5`` on PIL images in the workers).
        sampler: how the labeled stream draws: ``uniform`` (reshuffled passes) or ``class_balanced`` (each
            class equally likely per draw).
        seed: seed of the samplers.

    Workers only decode (to ``image``, uint8 at ``image_size``); the views are made in batch after the batch
    reaches the training device (:meth:`on_after_batch_transfer`, which Lightning calls in every loop that
    runs with this DataModule; :meth:`transfer` for hand-written loops).
    """

    def __init__(
        self,
        catalog: Catalog,
        split: ExperimentSplit,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_size: int = 32,
        mu: int = 7,
        labeled_views: tuple[str, ...] = ("weak",),
        unlabeled_views: tuple[str, ...] = (),
        unlabeled_rest: bool = True,
        use_archive_unlabeled: bool = True,
        pseudo_labeled: tuple[np.ndarray, np.ndarray] | None = None,
        pseudo_views: tuple[str, ...] = ("strong",),
        pseudo_batch_size: int | None = None,
        steps_per_epoch: int = 500,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        cache=None,
        strong_color: bool = True,
        strong_policy: str = "fixmatch",
        sampler: str = "uniform",
        seed: int = 0,
    ):
        super().__init__()
        if strong_policy not in STRONG_POLICIES:
            raise ValueError(f"unknown strong policy {strong_policy!r}; valid: {', '.join(STRONG_POLICIES)}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        self.strong_policy, self.sampler = strong_policy, sampler
        self.catalog, self.split, self.cache = catalog, split, cache
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.batch_size, self.mu = batch_size, mu
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.steps_per_epoch, self.num_workers, self.strong_color, self.seed = (
            steps_per_epoch,
            num_workers,
            strong_color,
            seed,
        )
        self.view_maker = ViewMaker(self.mean, self.std, image_size, strong_color, strong_policy)
        labels = catalog.images.label.to_numpy()
        self.streams: dict[str, Stream] = {
            "lb": Stream(split.labeled, labels[split.labeled], tuple(labeled_views), batch_size)
        }
        if unlabeled_views:
            rows = unlabeled_pool(split, use_archive_unlabeled, unlabeled_rest)
            if len(rows) == 0:
                raise ValueError(
                    "the unlabeled pool is empty: the archive has no unlabeled images "
                    f"(data.use_archive_unlabeled={use_archive_unlabeled}) and data.unlabeled_rest={unlabeled_rest}"
                )
            self.streams["ulb"] = Stream(rows, labels[rows], tuple(unlabeled_views), mu * batch_size)
        if pseudo_labeled is not None and len(pseudo_labeled[0]):
            rows, targets = pseudo_labeled
            self.streams["pl"] = Stream(
                rows, labels[rows], tuple(pseudo_views), pseudo_batch_size or batch_size, targets
            )

    def state_dict(self) -> dict:
        """Stored in checkpoints, so that analysis of a checkpoint uses the data settings it was trained with."""
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "classes": self.catalog.classes.names,
            "split": self.split.record(),  # how to cut the labeled images again (analysis kNN)
        }

    @property
    def num_classes(self) -> int:
        return len(self.catalog.classes)

    @property
    def training_prior(self) -> np.ndarray:
        """(C,) the class distribution of the labeled stream as the sampler draws it: the labeled set's class
        shares under ``sampler=uniform``, the same share for every class that has labeled images under
        ``class_balanced``.

        This is the prior a model trained on the stream learns, so every component that corrects for the
        training prior (logit adjustment, distribution alignment's target, ACR's anchors, SimPro's starting
        prior) takes this one: correcting a class-balanced stream by the labeled set's counts would correct twice.
        """
        counts = np.bincount(self.streams["lb"].labels, minlength=self.num_classes).astype(np.float64)  # (C,)
        if self.sampler == "class_balanced":
            counts = (counts > 0).astype(
                np.float64
            )  # ClassBalancedSampler: each present class equally likely
        return counts / counts.sum()

    def _current_epoch(self) -> int:
        """The epoch that the next training iterator serves, as Lightning numbers it for ``set_epoch``.

        ``processed``, not ``trainer.current_epoch``: a checkpoint is written at an epoch's end before the
        epoch counts as completed, so right after a resume ``current_epoch`` still names the finished epoch,
        and Lightning makes (and, with worker processes, primes) the first iterator before it calls
        ``set_epoch``.
        """
        if self.trainer is None:
            return 0
        # The fit loop's progress holds a _ProcessedTracker; Lightning declares the field as its base class.
        current = cast("_ProcessedTracker", self.trainer.fit_loop.epoch_progress.current)
        return current.processed

    def _batches_done(self) -> int:
        """Training steps of the current epoch already done when its iterator is made: non-zero only right after
        a resume from a checkpoint written mid-epoch, before a step (``run.preempt``), whose loop counters
        Lightning restores before it makes the iterator; at an epoch's start (or after an epoch-end checkpoint)
        the count is 0 or a whole epoch."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed % self.steps_per_epoch

    def dataset(
        self, rows: np.ndarray, views: Sequence[str], targets: np.ndarray | None = None
    ) -> ImageDataset:
        """A dataset of catalog rows, decoded for the named views (timm's strong view is made here)."""
        images = self.catalog.images
        pil_views = {}
        if "strong" in views and self.strong_policy == "timm":
            pil_views["strong"] = timm_strong_image(self.image_size, self.mean, self.strong_color)
        return ImageDataset(
            root=self.catalog.root,
            paths=images.path.to_numpy()[rows],
            rows=rows,
            labels=images.label.to_numpy()[rows],
            image_size=self.image_size,
            cache=self.cache,
            targets=targets,
            pil_views=pil_views,
        )

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        views: Sequence[str],
        sampler: Sampler | None = None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=StreamCollate(tuple(views), self.view_maker),
            pin_memory=torch.cuda.is_available(),
            drop_last=sampler is not None,
        )

    def _sampler(self, name: str, stream: Stream, seed: int) -> EpochSampler:
        num_samples = self.steps_per_epoch * stream.batch_size

        def skip() -> int:
            return self._batches_done() * stream.batch_size

        if name == "lb" and self.sampler == "class_balanced":
            return ClassBalancedSampler(
                stream.labels, num_samples, seed=seed, epoch_fn=self._current_epoch, skip_fn=skip
            )
        return EpochSampler(
            len(stream.rows), num_samples, seed=seed, epoch_fn=self._current_epoch, skip_fn=skip
        )

    def train_dataloader(self) -> dict[str, DataLoader]:
        loaders = {}
        for k, (name, s) in enumerate(self.streams.items()):
            sampler = self._sampler(name, s, seed=self.seed * 7 + k)
            loaders[name] = self._loader(
                self.dataset(s.rows, s.views, s.targets), s.batch_size, s.views, sampler
            )
        return loaders

    def loader(self, rows: np.ndarray, view: str = "eval") -> DataLoader:
        """An ordered evaluation loader over any catalog rows. Its batches carry the uint8 ``image``; the
        device makes ``view`` from it (:meth:`transfer`, or the Lightning hook).

        Args:
            rows: catalog rows.
            view: the view its batches' consumer reads.
        """
        return self._loader(self.dataset(rows, (view,)), self.eval_batch_size, (view,))

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.split.val)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.split.test)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Make the views of every stream in the batch, on the device it was moved to."""
        return self.view_maker(batch)

    def transfer(self, batch: dict, device: torch.device | str) -> dict:
        """Move a batch to ``device`` and make its views there (for loops outside a Lightning trainer)."""
        return self.view_maker(move_data_to_device(batch, device))
