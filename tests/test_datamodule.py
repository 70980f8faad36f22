"""Views, the epoch sampler and the DataModule's batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kvasir.data.archive import load_catalog
from ssl_kvasir.data.datamodule import EpochSampler, KvasirDataModule
from ssl_kvasir.data.splits import make_split
from ssl_kvasir.data.transforms import COLOR_OPS, build_view

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", ["weak", "strong", "eval"])
def test_views_give_normalised_square_tensors(name):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    x = build_view(name, 48, MEAN, STD)(image)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32


def test_eval_view_is_deterministic_and_weak_is_not():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ev, weak = build_view("eval", 32, MEAN, STD), build_view("weak", 32, MEAN, STD)
    assert torch.equal(ev(image), ev(image))
    torch.manual_seed(0)
    assert any(not torch.equal(weak(image), weak(image)) for _ in range(5))


def test_strong_view_without_colour_never_changes_hue():
    from timm.data.auto_augment import RandAugment

    ops_of = lambda view: {op.name for t in view.transforms if isinstance(t, RandAugment) for op in t.ops}  # noqa: E731
    with_colour = ops_of(build_view("strong", 32, MEAN, STD, strong_color=True))
    without = ops_of(build_view("strong", 32, MEAN, STD, strong_color=False))
    assert set(COLOR_OPS) <= with_colour
    assert not (set(COLOR_OPS) & without) and {"Rotate", "ShearX", "Brightness"} <= without
    # A pure blue image (the dye) stays blue-dominant through the colour-free strong view.
    blue = Image.new("RGB", (32, 32), (20, 40, 200))
    view = build_view("strong", 32, (0, 0, 0), (1, 1, 1), strong_color=False)
    for seed in range(20):
        torch.manual_seed(seed)
        x = view(blue)
        kept = x.abs().sum(0) > 0  # outside the Cutout square and the padding
        assert (x[2][kept] >= x[0][kept]).all() and (x[2][kept] >= x[1][kept]).all()


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


def test_augmentation_is_a_function_of_the_sampled_seed(synth_archive):
    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    split = make_split(catalog, eval_fold=0, seed=0)
    dm = KvasirDataModule(catalog, split, image_size=32, mean=MEAN, std=STD, num_workers=0, strong_color=True)
    ds = dm.dataset(split.labeled[:3], ("weak", "strong"))
    a = ds[(1, 12345)]
    torch.manual_seed(999)  # whatever the generators held before
    b = ds[(1, 12345)]
    assert torch.equal(a["strong"], b["strong"]) and torch.equal(a["weak"], b["weak"])
    assert not torch.equal(ds[(1, 54321)]["strong"], a["strong"])


def test_datamodule_serves_the_methods_streams(synth_archive):
    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    split = make_split(catalog, eval_fold=0, label_fraction=0.5, seed=0)
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
    lb, ulb, pl = (next(iter(loaders[k])) for k in ("lb", "ulb", "pl"))
    assert lb["weak"].shape == (4, 3, 32, 32) and set(lb["label"].tolist()) <= set(range(23))
    assert set(lb["index"].tolist()) <= set(split.labeled.tolist())
    assert ulb["weak"].shape == ulb["strong"].shape == (12, 3, 32, 32)
    pool = dm.streams["ulb"].rows
    assert (pool[ulb["pos"].numpy()] == ulb["index"].numpy()).all()  # positions index the pool
    images = catalog.images
    assert all(images.path[i] == p for i, p in zip(ulb["index"].tolist(), ulb["path"], strict=True))
    assert pl["target"].shape == (4, 23) and pl["strong"].shape == (4, 3, 32, 32) and "weak" not in pl
    assert set(pl["index"].tolist()) <= set(rows.tolist())
    test = next(iter(dm.test_dataloader()))
    assert set(test) >= {"index", "pos", "path", "label", "eval"}
    assert (images.fold.to_numpy()[test["index"].numpy()] == 0).all()
