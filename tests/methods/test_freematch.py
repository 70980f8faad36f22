"""FreeMatch: the fairness loss, the masking and one update of the running statistics against formulas computed
by hand, and a step's losses against a naive recomputation."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_kvasir.losses import fairness_loss


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def _sum_norm(p: list[float], h: list[float]) -> list[float]:
    scaled = [a / b if b > 0 else 0.0 for a, b in zip(p, h, strict=True)]
    return [v / sum(scaled) for v in scaled]


def _naive_fairness(
    logits: list[list[float]], mask: list[float], p_model: list[float], hist: list[float]
) -> float:
    """-H(SumNorm(p~ / h~), SumNorm(p_bar / h_bar)) over the masked strong views (FreeMatch eq. 9)."""
    rows = [_softmax(z) for z, m in zip(logits, mask, strict=True) if m > 0]
    c = len(p_model)
    mean = [sum(r[k] for r in rows) / len(rows) for k in range(c)]
    counts = [sum(1 for r in rows if r.index(max(r)) == k) for k in range(c)]
    h_bar = [n / len(rows) for n in counts]
    target, estimate = _sum_norm(p_model, hist), _sum_norm(mean, h_bar)
    return sum(t * math.log(e + 1e-12) for t, e in zip(target, estimate, strict=True))


def test_fairness_loss_on_fixed_tensors():
    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.5, 0.0]]
    mask = [1.0, 1.0, 0.0, 1.0]
    p_model, hist = [0.5, 0.3, 0.2], [0.6, 0.4, 0.0]  # a class absent from h~ gets the factor 0
    # By hand: the masked rows predict classes 0, 1, 0, so h_bar = (2/3, 1/3, 0); SumNorm(p~/h~) = (0.526, 0.474, 0).
    got = fairness_loss(torch.tensor(logits), torch.tensor(mask), torch.tensor(p_model), torch.tensor(hist))
    assert got.item() == pytest.approx(_naive_fairness(logits, mask, p_model, hist), rel=1e-5)
    target = _sum_norm(p_model, hist)
    assert target == pytest.approx([0.5 / 0.6 / (0.5 / 0.6 + 0.75), 0.75 / (0.5 / 0.6 + 0.75), 0.0])
    nothing = fairness_loss(torch.tensor(logits), torch.zeros(4), torch.tensor(p_model), torch.tensor(hist))
    assert nothing.item() == 0.0


def test_fairness_loss_gradient_flows_into_the_strong_logits():
    logits = torch.randn(6, 4, requires_grad=True)
    fairness_loss(logits, torch.ones(6), torch.full((4,), 0.25), torch.full((4,), 0.25)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_freematch_step_masks_with_the_updated_statistics_and_adds_the_fairness_loss(make_method, make_batch):
    module = make_method("freematch", ema_p=0.5, lambda_f=0.1, lambda_u=1.0)
    batch = make_batch(1)
    losses = module.step_losses(batch)
    with (
        torch.no_grad()
    ):  # the step's own forward pass (training mode: BatchNorm uses the batch's statistics)
        x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"], batch["ulb"]["strong"]])
        z_lb, z_w, z_s = (t.tolist() for t in module.model(x).split([4, 8, 8]))
    c = 5
    probs = [_softmax(z) for z in z_w]
    conf = [max(p) for p in probs]
    # One update from the uniform start, momentum 0.5, then the mask.
    tau = 0.5 / c + 0.5 * sum(conf) / len(conf)
    p_model = [0.5 / c + 0.5 * sum(p[k] for p in probs) / len(probs) for k in range(c)]
    counts = [sum(1 for p in probs if p.index(max(p)) == k) for k in range(c)]
    hist = [0.5 / c + 0.5 * n / len(probs) for n in counts]
    assert module.masking.global_threshold.item() == pytest.approx(tau, rel=1e-5)
    assert module.masking.class_probs.tolist() == pytest.approx(p_model, rel=1e-5)
    assert module.masking.label_hist.tolist() == pytest.approx(hist, rel=1e-5)
    mask = [float(max(p) >= p_model[p.index(max(p))] / max(p_model) * tau) for p in probs]
    assert losses["mask_rate"].item() == pytest.approx(sum(mask) / len(mask))
    pseudo = [p.index(max(p)) for p in probs]
    loss_u = sum(m * -math.log(_softmax(s)[k]) for s, k, m in zip(z_s, pseudo, mask, strict=True)) / len(z_s)
    assert losses["loss_u"].item() == pytest.approx(loss_u, rel=1e-4)
    expected_fair = 0.1 * _naive_fairness(z_s, mask, p_model, hist) if sum(mask) else 0.0
    assert losses["loss_fair"].item() == pytest.approx(expected_fair, rel=1e-4, abs=1e-7)
    loss_x = sum(-math.log(_softmax(z)[k]) for z, k in zip(z_lb, [0, 1, 2, 3], strict=True)) / 4
    assert losses["loss"].item() == pytest.approx(loss_x + loss_u + expected_fair, rel=1e-4)


def test_freematch_refuses_another_masking(make_method):
    with pytest.raises(ValueError, match="masking=freematch"):
        make_method("freematch", masking="fixed")
