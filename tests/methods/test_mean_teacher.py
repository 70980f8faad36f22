"""Mean Teacher: the sigmoid ramp-up, the consistency cost against the EMA teacher, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_kvasir.losses import probability_mse
from ssl_kvasir.methods.mean_teacher import sigmoid_rampup


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def test_sigmoid_rampup_is_the_papers():
    assert sigmoid_rampup(0, 100, 0.4) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(20, 100, 0.4) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(40, 100, 0.4) == sigmoid_rampup(99, 100, 0.4) == 1.0


def test_probability_mse_on_fixed_tensors():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # probabilities (1/4, 3/4) and (1/2, 1/2)
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    expected = ((0.25 - 1) ** 2 + (0.75 - 0) ** 2 + 0 + 0) / 4
    assert probability_mse(logits, targets).item() == pytest.approx(expected)


def test_mean_teacher_step_is_the_mse_to_the_ema_teacher(make_method, make_batch):
    module = make_method("mean_teacher", lambda_u=10.0, unsup_warmup=0.4)
    batch = make_batch(4)
    for p in module.ema.module["model"].head.parameters():  # a teacher that differs from the student
        p.data.mul_(3.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(module), "global_step", property(lambda self: 2))  # t = 2 / 4
        losses = module.step_losses(batch)
    with torch.no_grad():
        x = torch.cat([batch["lb"]["weak"], batch["ulb"]["strong"]])
        z_lb, z_s = (t.tolist() for t in module.model(x).split([4, 8]))
        teacher = module.ema.module["model"](batch["ulb"]["weak"]).tolist()  # eval mode: averaged statistics
    mse = sum(
        (a - b) ** 2
        for s, t in zip(z_s, teacher, strict=True)
        for a, b in zip(_softmax(s), _softmax(t), strict=True)
    ) / (8 * 5)
    ramp = math.exp(-5 * (1 - 0.5) ** 2)
    assert losses["loss_u"].item() == pytest.approx(10.0 * ramp * mse, rel=1e-4)
    loss_x = sum(-math.log(_softmax(z)[k]) for z, k in zip(z_lb, [0, 1, 2, 3], strict=True)) / 4
    assert losses["loss"].item() == pytest.approx(loss_x + 10.0 * ramp * mse, rel=1e-4)
    losses["loss"].backward()  # the consistency cost reaches the student (USB's step does not)
    assert all(p.grad is not None for p in module.model.head.parameters())


def test_mean_teacher_needs_an_ema(make_method):
    with pytest.raises(ValueError, match="ema_decay"):
        make_method("mean_teacher", ema_decay=0.0, eval_weights="model")
