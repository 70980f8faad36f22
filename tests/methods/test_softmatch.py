"""SoftMatch: uniform alignment, the truncated-Gaussian weights and one update of their running statistics,
computed by hand, and the step's loss against a naive recomputation."""

from __future__ import annotations

import math

import pytest
import torch


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def test_softmatch_weights_aligned_confidence_and_trains_towards_the_raw_argmax(make_method, make_batch):
    module = make_method("softmatch", ema_p=0.5, n_sigma=2.0, lambda_u=1.0)
    assert module.masking.conf_mean.item() == pytest.approx(1 / 5) and module.masking.conf_var.item() == 1.0
    batch = make_batch(2)
    losses = module.step_losses(batch)
    with torch.no_grad():
        x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"], batch["ulb"]["strong"]])
        z_lb, z_w, z_s = (t.tolist() for t in module.model(x).split([4, 8, 8]))
    c, n = 5, 8
    probs = [_softmax(z) for z in z_w]
    # Uniform alignment: the running mean of the predictions starts at the first step's mean.
    mean = [sum(p[k] for p in probs) / n for k in range(c)]
    aligned = []
    for p in probs:
        scaled = [p[k] * (1 / c) / mean[k] for k in range(c)]
        aligned.append([v / sum(scaled) for v in scaled])
    assert module.alignment.model_dist.tolist() == pytest.approx(mean, rel=1e-5)
    # One update of the Gaussian's mean and (unbiased) variance with the aligned confidences, then the weights.
    conf = [max(a) for a in aligned]
    batch_mean = sum(conf) / n
    batch_var = sum((v - batch_mean) ** 2 for v in conf) / (n - 1)
    mu, var = 0.5 * (1 / c) + 0.5 * batch_mean, 0.5 * 1.0 + 0.5 * batch_var
    assert module.masking.conf_mean.item() == pytest.approx(mu, rel=1e-5)
    assert module.masking.conf_var.item() == pytest.approx(var, rel=1e-5)
    weights = [math.exp(-(min(v - mu, 0.0) ** 2) / (2 * var / 2.0**2)) for v in conf]
    assert losses["mask_rate"].item() == pytest.approx(sum(weights) / n, rel=1e-5)
    # The targets are the raw predictions' classes, not the aligned ones'.
    pseudo = [p.index(max(p)) for p in probs]
    loss_u = sum(w * -math.log(_softmax(s)[k]) for s, k, w in zip(z_s, pseudo, weights, strict=True)) / n
    assert losses["loss_u"].item() == pytest.approx(loss_u, rel=1e-4)
    loss_x = sum(-math.log(_softmax(z)[k]) for z, k in zip(z_lb, [0, 1, 2, 3], strict=True)) / 4
    assert losses["loss"].item() == pytest.approx(loss_x + loss_u, rel=1e-4)


def test_softmatch_targets_differ_from_the_aligned_argmax_where_alignment_moves_it(make_method):
    """Alignment can move a prediction's class; the target stays the raw one."""
    module = make_method("softmatch")
    module.alignment.model_dist.copy_(torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1]))
    module.alignment.n_updates.fill_(1)
    module.alignment.momentum = 1.0  # keep the running mean where it was set
    logits = torch.log(torch.tensor([[0.5, 0.4, 0.05, 0.03, 0.02]]))
    pseudo = module.pseudo_targets(logits, torch.tensor([0]))
    assert pseudo.probs.argmax(1).item() == 1  # aligned: class 0 divided by its large running share
    assert pseudo.targets.item() == 0
