"""Oracle tests of losses, masking strategies, distribution alignment, EMA and the schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kvasir.losses import masked_cross_entropy, soft_cross_entropy
from ssl_kvasir.methods.base import fixmatch_cosine
from ssl_kvasir.models.ema import EMA
from ssl_kvasir.pseudo_labels.masking import ClassAdaptiveThreshold, DistributionAlignment, FixedThreshold


@pytest.mark.parametrize(("b", "c"), [(1, 2), (7, 5), (64, 23)])
def test_soft_cross_entropy_equals_naive_and_hard_case(b, c):
    g = torch.Generator().manual_seed(b * c)
    logits = torch.randn(b, c, generator=g)
    targets = torch.rand(b, c, generator=g).softmax(1)
    naive = torch.stack(
        [-sum(targets[i, k] * torch.log(logits[i].softmax(0)[k]) for k in range(c)) for i in range(b)]
    )
    assert torch.allclose(soft_cross_entropy(logits, targets, "none"), naive, atol=1e-5)
    y = torch.randint(0, c, (b,), generator=g)
    assert torch.allclose(
        soft_cross_entropy(logits, F.one_hot(y, c).float()), F.cross_entropy(logits, y), atol=1e-6
    )


def test_masked_cross_entropy_averages_over_all_unlabeled_images():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(10, 4, generator=g), torch.randint(0, 4, (10,), generator=g)
    mask = (torch.arange(10) % 3 == 0).float()
    naive = sum(F.cross_entropy(logits[i : i + 1], y[i : i + 1]) * mask[i] for i in range(10)) / 10
    assert torch.allclose(masked_cross_entropy(logits, y, mask), naive)
    assert masked_cross_entropy(logits, y, torch.zeros(10)) == 0


@pytest.mark.parametrize("loss_fn", ["soft", "masked"])
def test_losses_go_down(loss_fn):
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    y = (x @ torch.randn(8, 3)).argmax(1)  # linearly separable
    model = torch.nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        if loss_fn == "soft":
            loss = soft_cross_entropy(model(x), F.one_hot(y, 3).float())
        else:
            loss = masked_cross_entropy(model(x), y, torch.ones(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_fixed_threshold():
    probs = torch.tensor([[0.96, 0.04], [0.5, 0.5], [0.05, 0.95]])
    assert FixedThreshold(0.95)(probs, torch.arange(3)).tolist() == [1.0, 0.0, 1.0]


def test_class_adaptive_threshold_equals_flexmatch_formula():
    torch.manual_seed(0)
    n, c, tau = 50, 4, 0.9
    m = ClassAdaptiveThreshold(n, c, tau)
    naive_selected = [-1] * n
    for _ in range(5):
        idx = torch.randperm(n)[:16]
        probs = (torch.randn(16, c) * 3).softmax(1)
        # naive FlexMatch: sigma_c over the latest confident predictions, warm-up normaliser, convex mapping
        sigma = [sum(1 for s in naive_selected if s == k) for k in range(c)]
        unused = sum(1 for s in naive_selected if s == -1)
        norm = max(max(sigma), unused)
        thresholds = [(sigma[k] / norm) / (2 - sigma[k] / norm) * tau for k in range(c)]
        expected = [float(probs[i].max() >= thresholds[int(probs[i].argmax())]) for i in range(16)]
        assert m(probs, idx).tolist() == expected
        m.update(probs, idx)
        for i in range(16):
            if probs[i].max() > tau:
                naive_selected[int(idx[i])] = int(probs[i].argmax())
        assert m.selected.tolist() == naive_selected


def test_class_adaptive_threshold_lowers_bar_for_unlearned_classes():
    m = ClassAdaptiveThreshold(100, 3, 0.95)
    probs = torch.tensor([[0.99, 0.005, 0.005]] * 60)
    m.update(probs, torch.arange(60))
    t = m.class_thresholds()
    assert t[0] == pytest.approx(0.95) and t[1] == t[2] == 0  # learned class at tau, the others open


def test_distribution_alignment_equals_naive():
    torch.manual_seed(0)
    target = torch.tensor([1.0, 1.0, 2.0])
    da = DistributionAlignment(target, momentum=0.9)
    p_target = target / target.sum()
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    assert torch.allclose(da(probs), probs)  # no prediction seen yet: a ratio of 1
    running = None
    for step in range(6):
        batch = probs if step == 0 else (torch.randn(5, 3) * 2).softmax(1)
        da.update(batch)
        # naive: the running mean starts at the first batch's mean (USB's DistAlignEMAHook), then an EMA
        mean = [sum(float(batch[i, c]) for i in range(len(batch))) / len(batch) for c in range(3)]
        running = mean if running is None else [0.9 * running[c] + 0.1 * mean[c] for c in range(3)]
        for i in range(len(batch)):
            scaled = [float(batch[i, c]) * float(p_target[c]) / running[c] for c in range(3)]
            expected = [v / sum(scaled) for v in scaled]
            assert torch.allclose(da(batch)[i], torch.tensor(expected), atol=1e-6)
        assert torch.allclose(da.model_dist, torch.tensor(running), atol=1e-6)
    assert int(da.n_updates) == 6


def test_distribution_alignment_factor_of_a_rare_class_starts_near_one():
    # An imbalanced stream: a model that has learned the labeled prior predicts about that prior. Alignment
    # towards the labeled distribution must then leave the rare class alone from the first step (a running
    # mean started at the uniform distribution scaled it by about C * prior = 23 * 6 / 10662 = 0.013).
    counts = torch.tensor([6.0] + [10662.0 / 22] * 22)  # one class of 6 images among 23
    prior = counts / counts.sum()
    g = torch.Generator().manual_seed(0)
    da = DistributionAlignment(counts, momentum=0.999)
    factors = []
    for _ in range(50):
        logits = prior.log() + 0.3 * torch.randn(64, 23, generator=g)  # (64, 23) around the prior
        probs = logits.softmax(1)
        da.update(probs)
        factors.append(float(da.factor()[0]))
        aligned = da(probs)
        # the rare class keeps about its share, instead of losing 98 % of it
        assert float(aligned[:, 0].mean()) == pytest.approx(float(probs[:, 0].mean()), rel=0.3)
    assert all(0.7 < f < 1.3 for f in factors)
    uniform_start = float(prior[0] / (0.999 / 23 + 0.001 * prior[0]))
    assert uniform_start < 0.02  # what the former start gave at the first step


def test_distribution_alignment_state_resumes_from_a_checkpoint():
    da = DistributionAlignment(torch.tensor([1.0, 3.0]), momentum=0.999)
    da.update(torch.tensor([[0.9, 0.1]]))
    again = DistributionAlignment(torch.tensor([1.0, 3.0]), momentum=0.999)
    again.load_state_dict(da.state_dict())
    again.update(torch.tensor([[0.2, 0.8]]))  # an EMA step, not a fresh start
    assert torch.allclose(
        again.model_dist, 0.999 * torch.tensor([0.9, 0.1]) + 0.001 * torch.tensor([0.2, 0.8])
    )


def test_ema_equals_naive_average_with_warmup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.99)
    naive = {k: v.clone().float() for k, v in model.state_dict().items()}
    for k in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves the BatchNorm running statistics
        d = min(0.99, (1 + k) / (10 + k))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for name, v in model.state_dict().items():
            naive[name] = d * naive[name] + (1 - d) * v.float() if v.dtype.is_floating_point else v.clone()
    for name, v in ema.module.state_dict().items():
        assert torch.allclose(v.float(), naive[name].float(), atol=1e-5), name
    assert ema.module.training is False and all(not p.requires_grad for p in ema.module.parameters())


def test_fixed_decay_keeps_initial_weights_a_long_time():
    # The reason for the warm-up: 0.999**1300 of the random initial weights remain without it.
    assert pytest.approx(0.27, abs=0.01) == 0.999**1300
    assert EMA(torch.nn.Linear(1, 1), 0.999, warmup=False).current_decay() == 0.999


def test_fixmatch_cosine_schedule():
    assert fixmatch_cosine(0, 100) == 1.0
    assert fixmatch_cosine(100, 100) == pytest.approx(math.cos(7 * math.pi / 16))
    assert fixmatch_cosine(50, 100) == pytest.approx(math.cos(7 * math.pi * 50 / 1600))
    assert fixmatch_cosine(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert fixmatch_cosine(10, 100, warmup_steps=10) == 1.0


def test_self_adaptive_threshold_updates_then_masks_as_computed_by_hand():
    """FreeMatch's SAT on three fixed predictions, momentum 0.5, from the uniform start (tau = p~ = h~ = 1/2)."""
    from ssl_kvasir.pseudo_labels.masking import SelfAdaptiveThreshold

    sat = SelfAdaptiveThreshold(num_classes=2, momentum=0.5)
    probs = torch.tensor([[0.8, 0.2], [0.45, 0.55], [0.56, 0.44]])
    mask = sat.step(probs, torch.arange(3))
    # tau = 0.5 * 1/2 + 0.5 * mean(0.8, 0.55, 0.56); p~ = 0.5 * 1/2 + 0.5 * mean probs; h~ from classes (0, 1, 0).
    tau = 0.5 * 0.5 + 0.5 * (0.8 + 0.55 + 0.56) / 3
    p = [0.5 * 0.5 + 0.5 * (0.8 + 0.45 + 0.56) / 3, 0.5 * 0.5 + 0.5 * (0.2 + 0.55 + 0.44) / 3]
    h = [0.5 * 0.5 + 0.5 * 2 / 3, 0.5 * 0.5 + 0.5 * 1 / 3]
    assert sat.global_threshold.item() == pytest.approx(tau)
    assert sat.class_probs.tolist() == pytest.approx(p)
    assert sat.label_hist.tolist() == pytest.approx(h)
    thresholds = [p[0] / max(p) * tau, p[1] / max(p) * tau]  # MaxNorm(p~) * tau
    assert sat.class_thresholds().tolist() == pytest.approx(thresholds)
    expected = [float(thresholds[0] <= 0.8), float(thresholds[1] <= 0.55), float(thresholds[0] <= 0.56)]
    assert mask.tolist() == expected == [1.0, 1.0, 0.0]


def test_truncated_gaussian_weights_update_then_weigh_as_computed_by_hand():
    """SoftMatch's weights on three fixed predictions of four classes, momentum 0.5, n_sigma 2."""
    from ssl_kvasir.pseudo_labels.masking import TruncatedGaussianWeights

    tg = TruncatedGaussianWeights(num_classes=4, momentum=0.5, n_sigma=2.0)
    probs = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.5, 0.3, 0.1, 0.1], [0.3, 0.25, 0.25, 0.2]])
    weights = tg.step(probs, torch.arange(3))
    conf = [0.9, 0.5, 0.3]
    mean = sum(conf) / 3
    var = sum((c - mean) ** 2 for c in conf) / 2  # unbiased
    mu, sigma2 = 0.5 * 0.25 + 0.5 * mean, 0.5 * 1.0 + 0.5 * var  # from mu_0 = 1/C, sigma_0^2 = 1
    assert tg.conf_mean.item() == pytest.approx(mu) and tg.conf_var.item() == pytest.approx(sigma2)
    expected = [
        1.0,
        1.0,
        math.exp(-((0.3 - mu) ** 2) / (2 * sigma2 / 2.0**2)),
    ]  # only 0.3 lies below the mean
    assert weights.tolist() == pytest.approx(expected)
    assert 0.9 < expected[2] < 1.0


@pytest.mark.parametrize("kind", ["freematch", "softmatch"])
def test_adaptive_masking_state_is_in_the_state_dict_and_restores(kind):
    from ssl_kvasir.pseudo_labels.masking import Knobs, build_masking

    knobs = Knobs(
        threshold=0.95, ema_p=0.9, n_sigma=2.0, num_unlabeled=10, num_classes=3, labeled_class_counts=None
    )
    trained, fresh = build_masking(kind, knobs), build_masking(kind, knobs)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        trained.step(torch.rand(6, 3, generator=g).softmax(1), torch.arange(6))
    fresh.load_state_dict(trained.state_dict())
    probs = torch.rand(6, 3, generator=g).softmax(1)
    assert torch.equal(fresh.step(probs, torch.arange(6)), trained.step(probs, torch.arange(6)))
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True)
    )


def test_masking_and_alignment_registries_are_the_names_config_checks():
    from ssl_kvasir import names
    from ssl_kvasir.pseudo_labels.masking import ALIGNMENTS, MASKINGS

    assert tuple(MASKINGS) == names.MASKINGS
    assert (None, *ALIGNMENTS) == names.ALIGNMENTS
