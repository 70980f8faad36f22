"""The extension points of methods: every registered method fits through the same code, and a method defined
in this file alone (an extra trainable head) trains that head and averages it in the EMA."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny
from omegaconf import open_dict
from torch import nn

from ssl_kvasir.config import compose
from ssl_kvasir.methods import METHODS, BaseMethod
from ssl_kvasir.run.checkpoint import load_method
from ssl_kvasir.run.train import fit

pytestmark = pytest.mark.slow


def _cfg(archive, out, method: str, *extra: str):
    data = [f"data.root={archive}", f"data.split_file={archive / '2_fold_split.csv'}"]
    return compose("fit", [f"output_dir={out}", *data, *tiny(f"method={method}", *extra)])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_fits_through_the_same_code(name, synth_archive, tmp_path):
    extra = ["method.rounds=1"] if "rounds" in compose("fit", [f"method={name}"]).method else []
    results = fit(_cfg(synth_archive, tmp_path / name, name, *extra))
    assert results["method"] == name
    assert json.loads((tmp_path / name / "results.json").read_text())["method"] == name
    assert 0 <= results["metrics"]["accuracy"] <= 1


class TwoHeads(BaseMethod):
    """A toy method: cross-entropy through the network's head and through a second head of its own."""

    name = "two_heads"

    def __init__(self, **base):
        super().__init__(**base)
        self.extra_head = nn.Linear(self.model.num_features, self.num_classes)
        # Kept in the checkpoint so the test can see how far the head moved.
        self.register_buffer("initial_head", self.extra_head.weight.detach().clone())

    def training_step(self, batch: dict, batch_idx: int):
        x, y = batch["lb"]["weak"], batch["lb"]["label"]
        features, logits = self.model.features_and_logits(x)  # (B, D), (B, C)
        loss = F.cross_entropy(logits, y) + F.cross_entropy(self.extra_head(features), y)
        self.log("train/loss", loss)
        return loss


def test_a_method_with_an_extra_head_trains_and_averages_it(synth_archive, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, TwoHeads.name, TwoHeads)
    cfg = _cfg(synth_archive, tmp_path / "run", "supervised", "trainer.max_steps=6", "method.ema_decay=0.5")
    with open_dict(cfg):
        cfg.method.name = TwoHeads.name
    results = fit(cfg)
    assert results["method"] == "two_heads"
    checkpoint = tmp_path / "run" / results["checkpoint"]  # the record names it relative to the run
    trained = load_method(checkpoint)
    assert isinstance(trained, TwoHeads) and "extra_head" in trained.trainable_modules()
    initial, live = trained.initial_head, trained.extra_head.weight
    averaged = trained.ema.module["extra_head"].weight
    # The optimizer trained the head, and the EMA follows it: moved from the start, behind the live weights.
    assert not torch.allclose(live, initial)
    assert not torch.allclose(averaged, initial) and not torch.allclose(averaged, live)
    assert (averaged - initial).norm() < (live - initial).norm() * 1.5
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert "extra_head.weight" in state and "ema.module.extra_head.weight" in state
