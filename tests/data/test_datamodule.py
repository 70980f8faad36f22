"""The samplers and the DataModule's batches (decoded images in the workers, views after the transfer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_kvasir.data.archive import load_catalog
from ssl_kvasir.data.datamodule import ClassBalancedSampler, EpochSampler, KvasirDataModule
from ssl_kvasir.data.splits import make_split
from ssl_kvasir.names import LabelBudget

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _orders(sampler: EpochSampler, world: int, monkeypatch) -> list[list[int]]:
    orders = []
    for rank in range(world):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
        orders.append(list(sampler))
    return orders


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_ranks(monkeypatch):
    s = EpochSampler(10, num_samples=12, seed=3)
    first = list(s)
    items = [i for i, _ in first]
    assert len(first) == 12 and set(items) == set(range(10))  # 1.2 passes: every item, some twice
    assert len({seed for _, seed in first}) == 12  # one augmentation seed per draw
    assert list(EpochSampler(10, 12, seed=3)) == first
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first
    epoch = {"now": 1}
    assert list(EpochSampler(10, 12, seed=3, epoch_fn=lambda: epoch["now"])) == list(s.set_epoch(1) or s)
    a, b = _orders(EpochSampler(8, num_samples=4, seed=0), world=2, monkeypatch=monkeypatch)
    assert len(a) == len(b) == 4 and not {i for i, _ in a} & {i for i, _ in b}  # ranks share one pass
    assert not {x for _, x in a} & {x for _, x in b}


def test_class_balanced_sampler_draws_every_class_about_equally(monkeypatch):
    labels = np.repeat(np.arange(4), [2, 10, 50, 500])  # (562,) one class 250 times the size of another
    s = ClassBalancedSampler(labels, num_samples=8000, seed=1)
    draws = [i for i, _ in s]
    counts = np.bincount(labels[draws], minlength=4)
    assert len(draws) == 8000 and (np.abs(counts - 2000) < 150).all(), counts
    assert draws == [i for i, _ in ClassBalancedSampler(labels, 8000, seed=1)]  # a function of (seed, epoch)
    s.set_epoch(1)
    assert [i for i, _ in s] != draws
    a, b = _orders(ClassBalancedSampler(labels, 100, seed=0), world=2, monkeypatch=monkeypatch)
    assert len(a) == len(b) == 100 and not {x for _, x in a} & {x for _, x in b}  # ranks: own draws, seeds
    uniform = np.bincount(labels[[i for i, _ in EpochSampler(len(labels), 8000, seed=1)]], minlength=4)
    assert uniform[3] > 10 * uniform[0]  # the plain sampler follows the class sizes


def test_views_are_a_function_of_the_sampled_seed(synth_archive):
    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    split = make_split(catalog, eval_fold=0, seed=0)
    dm = KvasirDataModule(catalog, split, image_size=32, mean=MEAN, std=STD, num_workers=0)
    ds = dm.dataset(split.labeled[:3], ("weak", "strong"))
    sample = ds[(1, 12345)]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.uint8
    assert sample["aug_seed"] == 12345 and "weak" not in sample  # workers only decode

    def views(*items):
        batch = dm._loader(ds, len(items), ("weak", "strong")).collate_fn([ds[i] for i in items])
        return dm.transfer(batch, "cpu")

    a, b = views((1, 12345), (0, 7)), views((2, 99), (1, 12345))
    for v in ("weak", "strong"):
        assert a[v].shape == (2, 3, 32, 32) and a[v].dtype == torch.float32
        assert torch.allclose(a[v][0], b[v][1], atol=1e-5)  # the same sample and seed in another batch
    assert not torch.equal(views((1, 54321))["strong"][0], a["strong"][0])


@pytest.mark.parametrize("policy", ["fixmatch", "timm"])
def test_the_loader_leaves_the_views_to_the_device(synth_archive, policy):
    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    split = make_split(catalog, eval_fold=0, seed=0)
    dm = KvasirDataModule(
        catalog, split, image_size=32, mean=MEAN, std=STD, num_workers=0, strong_policy=policy, batch_size=5
    )
    rows = split.test[:5]
    batch = next(iter(dm.loader(rows)))
    assert (
        "eval" not in batch and batch["image"].dtype == torch.uint8 and batch["image"].shape == (5, 3, 32, 32)
    )
    made = dm.transfer(batch, "cpu")["eval"]  # (5, 3, 32, 32)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(made, (batch["image"] / 255 - mean) / std, atol=1e-5)
    ds = dm.dataset(rows, ("weak", "strong"))
    # timm's policy runs in the workers on PIL images: its strong image travels beside the plain one.
    assert ("strong_image" in ds[(0, 1000)]) == (policy == "timm")


def test_datamodule_serves_the_methods_streams(synth_archive):
    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    split = make_split(catalog, eval_fold=0, budget=LabelBudget("fraction", 0.5), seed=0)
    rows = split.unlabeled[:5]
    targets = np.full((5, 23), 1 / 23, dtype=np.float32)
    dm = KvasirDataModule(
        catalog,
        split,
        image_size=32,
        mean=MEAN,
        std=STD,
        batch_size=4,
        mu=3,
        labeled_views=("weak",),
        unlabeled_views=("weak", "strong"),
        pseudo_labeled=(rows, targets),
        steps_per_epoch=2,
        num_workers=0,
    )
    loaders = dm.train_dataloader()
    assert set(loaders) == {"lb", "ulb", "pl"} and all(len(dl) == 2 for dl in loaders.values())
    # What a training step receives: Lightning moves the combined batch, then the DataModule makes the views.
    batch = dm.on_after_batch_transfer({k: next(iter(dl)) for k, dl in loaders.items()}, 0)
    lb, ulb, pl = (batch[k] for k in ("lb", "ulb", "pl"))
    assert "image" not in ulb and "views" not in ulb and "aug" not in ulb
    assert lb["weak"].shape == (4, 3, 32, 32) and set(lb["label"].tolist()) <= set(range(23))
    assert set(lb["index"].tolist()) <= set(split.labeled.tolist())
    assert ulb["weak"].shape == ulb["strong"].shape == (12, 3, 32, 32)
    pool = dm.streams["ulb"].rows
    assert (pool[ulb["pos"].numpy()] == ulb["index"].numpy()).all()  # positions index the pool
    images = catalog.images
    assert all(images.path[i] == p for i, p in zip(ulb["index"].tolist(), ulb["path"], strict=True))
    assert pl["target"].shape == (4, 23) and pl["strong"].shape == (4, 3, 32, 32) and "weak" not in pl
    assert set(pl["index"].tolist()) <= set(rows.tolist())
    test = dm.transfer(next(iter(dm.test_dataloader())), "cpu")
    assert set(test) >= {"index", "pos", "path", "label", "eval"}
    assert (images.fold.to_numpy()[test["index"].numpy()] == 0).all()


@pytest.mark.parametrize("sampler", ["uniform", "class_balanced"])
def test_training_prior_is_the_labeled_stream_as_sampled(synth_archive, sampler):
    """The class distribution the labeled stream really has: the set's shares under the uniform sampler, the
    same share for every present class under the class-balanced one (what its draws show)."""
    from dataclasses import replace

    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    split = make_split(catalog, eval_fold=0, seed=0)
    labels = catalog.images.label.to_numpy()
    # A long tail: 3, 2 and 1 labeled images of the first three classes, none of the others.
    rows = np.concatenate([split.labeled[labels[split.labeled] == c][:n] for c, n in enumerate((3, 2, 1))])
    dm = KvasirDataModule(
        catalog,
        replace(split, labeled=rows),
        image_size=32,
        mean=MEAN,
        std=STD,
        num_workers=0,
        sampler=sampler,
    )
    prior = dm.training_prior  # (C,)
    assert prior.shape == (dm.num_classes,) and prior.sum() == pytest.approx(1.0)
    expected = [3 / 6, 2 / 6, 1 / 6] if sampler == "uniform" else [1 / 3] * 3
    assert prior[:3].tolist() == pytest.approx(expected) and not prior[3:].any()
    drawn = dm._sampler("lb", dm.streams["lb"], seed=0)
    drawn.num_samples = 6000
    counts = np.bincount(labels[rows[[i for i, _ in drawn]]], minlength=dm.num_classes) / 6000
    assert counts == pytest.approx(prior, abs=0.03)
