"""Pseudo-Label: the mask, the linear ramp of its weight and the step's loss, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_kvasir.methods.pseudo_label import linear_rampup


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def test_linear_rampup():
    assert [linear_rampup(k, 100, 0.4) for k in (0, 10, 20, 40, 90)] == pytest.approx([0, 0.25, 0.5, 1, 1])


def test_pseudo_label_step_trains_the_weak_view_on_its_confident_predictions(make_method, make_batch):
    module = make_method("pseudo_label", threshold=0.2, lambda_u=2.0, unsup_warmup=0.5)
    assert module.unlabeled_views == ("weak",)  # no strong view is served
    batch = make_batch(3)
    del batch["ulb"]["strong"]
    module.trainer = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(module), "global_step", property(lambda self: 2))  # 2 of 10 steps: ramp 2 / 5
        losses = module.step_losses(batch)
    with torch.no_grad():
        x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"]])
        z_lb, z_w = (t.tolist() for t in module.model(x).split([4, 8]))
    probs = [_softmax(z) for z in z_w]
    mask = [float(max(p) >= 0.2) for p in probs]
    ce_u = sum(m * -math.log(p[p.index(max(p))]) for p, m in zip(probs, mask, strict=True)) / 8
    assert losses["mask_rate"].item() == pytest.approx(sum(mask) / 8)
    assert losses["loss_u"].item() == pytest.approx(2.0 * (2 / 5) * ce_u, rel=1e-4)
    loss_x = sum(-math.log(_softmax(z)[k]) for z, k in zip(z_lb, [0, 1, 2, 3], strict=True)) / 4
    assert losses["loss"].item() == pytest.approx(loss_x + 2.0 * 0.4 * ce_u, rel=1e-4)
