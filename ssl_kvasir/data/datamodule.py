"""Datasets, samplers and the LightningDataModule.

Training is counted in steps; an "epoch" is ``steps_per_epoch`` steps, after which the model is validated and
checkpointed. Every training stream draws its indices from an :class:`EpochSampler`, a fixed function of
(seed, epoch), so a run resumed from an end-of-epoch checkpoint sees exactly the batches that an
uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_kvasir.data.archive import Catalog
from ssl_kvasir.data.splits import ExperimentSplit, unlabeled_pool
from ssl_kvasir.data.transforms import apply_views, build_view


class ImageDataset(Dataset):
    """Images of a catalog, each returned as a dict of named views plus its identity.

    A sample is ``{"index": catalog row, "pos": position in this dataset, "path": path relative to the root,
    "label": class or -1,
    "<view>": tensor for each view, "target": (C,) probabilities when soft targets are given}``.
    """

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        rows: np.ndarray,
        labels: np.ndarray,
        views: dict[str, Callable],
        min_size: int,
        cache=None,
        targets: np.ndarray | None = None,
    ):
        self.root = Path(root)
        self.paths = list(paths)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.views = views
        self.min_size = min_size
        self.cache = cache
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int):
        """The decoded RGB image of item ``i`` (from the cache when there is one)."""
        from ssl_kvasir.data.decode import decode_image

        path = self.paths[i]
        if self.cache is not None:
            return self.cache.load(path, self.min_size)
        return decode_image(self.root / path, self.min_size, name=str(self.root / path))

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        if isinstance(item, tuple):
            # From an EpochSampler: (position, augmentation seed). The sample's augmentation is then a function of
            # (seed, epoch, position in the epoch), whatever process draws it and whether the run was resumed.
            i, augmentation_seed = item
            with seeded(augmentation_seed):
                return self._sample(i)
        return self._sample(item)

    def _sample(self, i: int) -> dict:
        image = self.load(i)
        sample = {"index": int(self.rows[i]), "pos": i, "path": self.paths[i], "label": int(self.labels[i])}
        sample.update(apply_views(image, self.views))  # one resize shared by the views
        if self.targets is not None:
            sample["target"] = torch.from_numpy(self.targets[i])
        return sample


@contextlib.contextmanager
def seeded(seed: int):
    """Seed the generators that augmentations draw from (torchvision: torch; timm's RandAugment: random and
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
    """

    def __init__(self, n: int, num_samples: int, seed: int, epoch_fn: Callable[[], int] | None = None):
        if n == 0:
            raise ValueError("cannot sample from an empty set")
        self.n, self.num_samples, self.seed, self.epoch, self.epoch_fn = n, num_samples, seed, 0, epoch_fn

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
        passes = -(-total // self.n)
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(passes)])[:total]
        base = (self.seed * 1_000_003 + epoch) * 10_000_019
        return iter((int(order[k]), (base + k) % 2**63) for k in range(rank, total, world))


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
        seed: seed of the samplers.
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
        seed: int = 0,
    ):
        super().__init__()
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
        }

    @property
    def num_classes(self) -> int:
        return len(self.catalog.classes)

    def _current_epoch(self) -> int:
        """The epoch that the next training iterator serves, as Lightning numbers it for ``set_epoch``.

        ``processed``, not ``trainer.current_epoch``: a checkpoint is written at an epoch's end before the
        epoch counts as completed, so right after a resume ``current_epoch`` still names the finished epoch,
        and Lightning makes (and, with worker processes, primes) the first iterator before it calls
        ``set_epoch``.
        """
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_progress.current.processed

    def dataset(
        self, rows: np.ndarray, views: Sequence[str], targets: np.ndarray | None = None
    ) -> ImageDataset:
        """A dataset of catalog rows with the named views."""
        images = self.catalog.images
        return ImageDataset(
            root=self.catalog.root,
            paths=images.path.to_numpy()[rows],
            rows=rows,
            labels=images.label.to_numpy()[rows],
            views={v: build_view(v, self.image_size, self.mean, self.std, self.strong_color) for v in views},
            min_size=self.image_size,
            cache=self.cache,
            targets=targets,
        )

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=sampler is not None,
        )

    def train_dataloader(self) -> dict[str, DataLoader]:
        loaders = {}
        for k, (name, s) in enumerate(self.streams.items()):
            sampler = EpochSampler(
                len(s.rows),
                self.steps_per_epoch * s.batch_size,
                seed=self.seed * 7 + k,
                epoch_fn=self._current_epoch,
            )
            loaders[name] = self._loader(self.dataset(s.rows, s.views, s.targets), s.batch_size, sampler)
        return loaders

    def loader(self, rows: np.ndarray, view: str = "eval") -> DataLoader:
        """An ordered evaluation loader over any catalog rows."""
        return self._loader(self.dataset(rows, (view,)), self.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.split.val)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.split.test)

    def predict_dataloader(self) -> DataLoader:
        return self.loader(unlabeled_pool(self.split))
