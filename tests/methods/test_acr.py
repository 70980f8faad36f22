"""ACR: its step against the naive two-head losses, its estimate of the unlabeled mix after a step, and the
balanced head predicting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import LONG_TAIL, long_tailed_batch, long_tailed_method, naive_ce, naive_softmax, one_hot

C = len(LONG_TAIL)


def test_acr_step_matches_the_naive_two_head_losses_and_predicts_with_the_balanced_head():
    module = long_tailed_method("acr", threshold=0.3, tau_balanced=2.0, tau_pseudo_balanced=1.0, est_epoch=-1)
    assert module.fit_warnings() == []  # a long-tailed training prior: ACR is not inert
    module.adjustment.tau.fill_(0.5)
    batch = long_tailed_batch(2)
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"], batch["ulb"]["strong"]])
        features = module.model.backbone(x)
        z_lb, z_w, z_s = (t.tolist() for t in module.model.head(features).split([4, 8, 8]))
        b_lb, b_w, b_s = (t.tolist() for t in module.balanced_head(features).split([4, 8, 8]))
    log_p = [math.log(n / sum(LONG_TAIL)) for n in LONG_TAIL]
    y = [int(v) for v in batch["lb"]["label"]]
    loss_x = np.mean([naive_ce(row, one_hot(k, C)) for row, k in zip(z_lb, y, strict=True)])
    loss_x_b = np.mean(
        [
            naive_ce([v + 2 * lp for v, lp in zip(row, log_p, strict=True)], one_hot(k, C))
            for row, k in zip(b_lb, y, strict=True)
        ]
    )
    loss_u, loss_u_b, hist = [], [], np.zeros(C)
    for w, wb, s, sb in zip(z_w, b_w, z_s, b_s, strict=True):
        adjusted = naive_softmax([v - 0.5 * lp for v, lp in zip(w, log_p, strict=True)])
        keep = max(adjusted) >= 0.3 or max(naive_softmax(w)) >= 0.3
        loss_u.append(keep * naive_ce(s, one_hot(int(np.argmax(adjusted)), C)))
        adjusted_b = naive_softmax([v - 1.0 * lp for v, lp in zip(w, log_p, strict=True)])
        keep_b = max(adjusted_b) >= 0.3 or max(naive_softmax(wb)) >= 0.3
        loss_u_b.append(keep_b * naive_ce(sb, one_hot(int(np.argmax(adjusted_b)), C)))
        if max(naive_softmax(wb)) >= 0.3:
            hist[int(np.argmax(wb))] = 1  # mix_estimate=reference: a class counts once per step
    expected = loss_x + loss_x_b + np.mean(loss_u) + np.mean(loss_u_b)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # The step's confident balanced predictions moved the estimate: p_u = 0.99 * uniform + 0.01 * their classes.
    expected_prior = 0.99 * np.full(C, 1 / C) + 0.01 * hist / hist.sum()
    np.testing.assert_allclose(module.adjustment.unlabeled_prior.numpy(), expected_prior, rtol=1e-5)
    loss.backward()
    assert module.balanced_head.weight.grad is not None and module.balanced_head.weight.grad.abs().sum() > 0
    # The balanced head is averaged by the EMA and is the one that predicts.
    assert set(module.trainable_modules()) == {"model", "balanced_head"}
    module.eval()
    with torch.no_grad():
        x = batch["lb"]["weak"]
        _, logits = module.predict_batch(x)
        ema = module.ema.module
        assert torch.allclose(logits, ema["balanced_head"](ema["model"].backbone(x)))
