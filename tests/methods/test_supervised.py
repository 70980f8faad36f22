"""Supervised training with the logit-adjusted labeled loss: its step against the naive formula, the prior it
adjusts by (the labeled stream as sampled), and a fit through the real CLI with the class-balanced sampler."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import LONG_TAIL, long_tailed_batch, long_tailed_method, naive_ce, one_hot, tiny

from ssl_kvasir.cli import main
from ssl_kvasir.methods import METHODS
from ssl_kvasir.models import build_network

C = len(LONG_TAIL)


def test_supervised_logit_adjusted_loss_is_menon_et_al():
    module = long_tailed_method("supervised", loss="logit_adjusted", la_tau=1.5)
    batch = long_tailed_batch()
    loss = module.training_step(batch, 0)
    logits = module.model(batch["lb"]["weak"]).tolist()
    prior = [n / sum(LONG_TAIL) for n in LONG_TAIL]
    expected = np.mean(
        [
            naive_ce([z + 1.5 * math.log(p) for z, p in zip(row, prior, strict=True)], one_hot(int(y), C))
            for row, y in zip(logits, batch["lb"]["label"], strict=True)
        ]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert long_tailed_method("supervised").training_step(batch, 0).item() != pytest.approx(
        expected, rel=1e-3
    )
    with pytest.raises(ValueError, match="unknown loss"):
        long_tailed_method("supervised", loss="focal")


@pytest.mark.parametrize("sampler", ["uniform", "class_balanced"])
def test_logit_adjustment_follows_the_labeled_stream_as_sampled(synth_archive, sampler):
    """The class-balanced sampler makes the labeled stream uniform: logit adjustment by the training prior is then
    a constant shift of the logits, the loss is plain cross-entropy and no decision moves. Under the uniform
    sampler it adjusts by the labeled set's long tail (log 3 between its largest and smallest class here)."""
    from dataclasses import replace

    from ssl_kvasir.data.archive import load_catalog
    from ssl_kvasir.data.datamodule import KvasirDataModule
    from ssl_kvasir.data.splits import make_split

    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    split = make_split(catalog, eval_fold=0, seed=0)
    labels = catalog.images.label.to_numpy()
    # 1, 2 or 3 labeled images per class: a tail of ratio 3 over all 23 classes.
    rows = np.concatenate([split.labeled[labels[split.labeled] == c][: 1 + c % 3] for c in range(23)])
    dm = KvasirDataModule(
        catalog, replace(split, labeled=rows), image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, sampler=sampler
    )
    cls = METHODS["supervised"]
    module = cls.from_config(
        build_network("test_resnet", 23),
        class_names=catalog.classes.names,
        max_steps=10,
        loss="logit_adjusted",
        la_tau=1.0,
        **cls.data_kwargs(dm),
    )
    offset = module.labeled_prior.log()  # (C,) what the adjustment adds to the logits
    z = torch.randn(64, 23, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.arange(64) % 23
    loss = module.labeled_loss(z, y)
    (grad,) = torch.autograd.grad(loss, z)
    (grad_ce,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    if sampler == "class_balanced":
        assert torch.allclose(offset, offset[0].expand(23))
        assert torch.equal((z + offset).argmax(1), z.argmax(1))
        assert loss.item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
        assert torch.allclose(grad, grad_ce, atol=1e-7)
    else:
        assert (offset.max() - offset.min()).item() == pytest.approx(math.log(3), rel=1e-5)
        assert not torch.allclose(grad, grad_ce, atol=1e-4)


@pytest.mark.slow
def test_supervised_logit_adjusted_with_class_balanced_sampler_fits(synth_archive, tmp_path):
    out = tmp_path / "la"
    args = [
        "method=supervised",
        "method.loss=logit_adjusted",
        "method.la_tau=1.0",
        "data.sampler=class_balanced",
    ]
    assert (
        main(
            [
                "fit",
                *args,
                f"output_dir={out}",
                f"data.root={synth_archive}",
                f"data.split_file={synth_archive / '2_fold_split.csv'}",
                *tiny("trainer.max_steps=6", "data.val_fraction=0.2"),
            ]
        )
        == 0
    )
    r = json.loads((out / "results.json").read_text())
    assert (
        r["config"]["method"]["loss"] == "logit_adjusted"
        and r["config"]["data"]["sampler"] == "class_balanced"
    )
    assert r["unlabeled_prior"] is None
    assert np.array(r["confusion_matrix"]).sum() == r["n_test"]
