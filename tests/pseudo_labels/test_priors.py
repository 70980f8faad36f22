"""Logit adjustment, ACR's adaptive strength and SimPro's EM prior, against naive loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kvasir.losses import logit_adjusted_cross_entropy
from ssl_kvasir.names import MIX_ESTIMATES
from ssl_kvasir.pseudo_labels.priors import (
    AdaptiveLogitAdjustment,
    EMClassPrior,
    anchor_distributions,
    symmetric_kl,
)


def _naive_la_ce(logits, targets, prior, tau):
    """Per image: -log(exp(z_y + tau log pi_y) / sum_c exp(z_c + tau log pi_c)), or its soft-target form."""
    total = sum(prior)
    losses = []
    for b in range(len(logits)):
        z = [float(logits[b][c]) + tau * math.log(float(prior[c]) / total) for c in range(len(prior))]
        log_norm = math.log(sum(math.exp(v) for v in z))
        if targets.dim() == 1:
            losses.append(log_norm - z[int(targets[b])])
        else:
            losses.append(sum(float(targets[b][c]) * (log_norm - z[c]) for c in range(len(prior))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("soft", [False, True])
def test_logit_adjusted_cross_entropy_matches_naive_formula(tau, soft):
    g = torch.Generator().manual_seed(int(tau * 10) + soft)
    logits = torch.randn(6, 5, generator=g) * 3
    prior = torch.tensor([50.0, 20.0, 10.0, 3.0, 1.0])
    targets = (
        torch.softmax(torch.randn(6, 5, generator=g), 1) if soft else torch.randint(0, 5, (6,), generator=g)
    )
    got = logit_adjusted_cross_entropy(logits, targets, prior, tau=tau)
    assert got.item() == pytest.approx(_naive_la_ce(logits, targets, prior.tolist(), tau), rel=1e-5)
    if tau == 0.0 and not soft:
        assert got.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


def test_logit_adjusted_loss_goes_down_and_debiases_the_rare_class():
    """Trained through the offset, the raw logits favour the rare class more than plain CE's do."""
    torch.manual_seed(0)
    x = torch.cat(
        [torch.randn(90, 2) + torch.tensor([0.5, 0.0]), torch.randn(10, 2) - torch.tensor([0.5, 0.0])]
    )
    y = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    prior = torch.tensor([90.0, 10.0])
    rare_share = {}
    for tau in (0.0, 1.0):
        layer = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        first = None
        for _ in range(200):
            loss = logit_adjusted_cross_entropy(layer(x), y, prior, tau=tau)
            first = loss.item() if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < first
        rare_share[tau] = (layer(x).argmax(1) == 1).float().mean().item()
    assert rare_share[1.0] > rare_share[0.0]


def test_anchor_distributions_reverse_by_rank():
    prior = torch.tensor([0.1, 0.5, 0.05, 0.35])
    anchors = anchor_distributions(prior)
    assert torch.equal(anchors[0], prior)
    assert torch.allclose(anchors[1], torch.full((4,), 0.25))
    # Naive: the class of rank k (by size, descending) takes the share of rank C-1-k.
    ranks = sorted(range(4), key=lambda c: -prior[c].item())
    expected = [0.0] * 4
    for k, c in enumerate(ranks):
        expected[c] = prior[ranks[3 - k]].item()
    assert anchors[2].tolist() == pytest.approx(expected)
    # On a list sorted by size the reversed anchor is the reference code's flip.
    sorted_prior = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert torch.equal(anchor_distributions(sorted_prior)[2], sorted_prior.flip(0))


def test_symmetric_kl_matches_naive_sum():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, 7, generator=g), 1)
    q = torch.softmax(torch.randn(7, generator=g), 0)
    got = symmetric_kl(p, q[None])
    for i in range(3):
        kl_pq = sum(p[i, c] * math.log(p[i, c] / q[c]) for c in range(7))
        kl_qp = sum(q[c] * math.log(q[c] / p[i, c]) for c in range(7))
        assert got[i].item() == pytest.approx(0.5 * float(kl_pq + kl_qp), rel=1e-5)
    assert symmetric_kl(q, q).item() == pytest.approx(0.0, abs=1e-7)


def _naive_acr(counts, steps_per_epoch, batches, momentum, tau_min, tau_max, mix_estimate):
    """ACR's estimate and tau in plain Python: returns (p_u, tau) after every epoch. ``reference`` counts a class
    once per step (the official code's ``now_mask[t] += m``), ``histogram`` counts every confident prediction."""
    total = sum(counts)
    con = [c / total for c in counts]
    C = len(counts)
    order = sorted(range(C), key=lambda c: (con[c], c))
    rev = [0.0] * C
    for k, c in enumerate(order):
        rev[c] = con[order[C - 1 - k]]
    anchors = [con, [1.0 / C] * C, rev]

    def skl(p, q):
        return 0.5 * sum(a * math.log(a / b) + b * math.log(b / a) for a, b in zip(p, q, strict=True))

    p_u, tau, history = [1.0 / C] * C, tau_max, []
    for start in range(0, len(batches), steps_per_epoch):
        sums, steps = [0.0, 0.0, 0.0], 0
        for pred, mask in batches[start : start + steps_per_epoch]:
            hist = [0.0] * C
            for k, w in zip(pred, mask, strict=True):
                hist[k] = max(hist[k], w) if mix_estimate == "reference" else hist[k] + w
            if sum(hist) == 0:
                continue
            p_u = [momentum * a + (1 - momentum) * h / sum(hist) for a, h in zip(p_u, hist, strict=True)]
            sums = [s + skl(anchor, p_u) for s, anchor in zip(sums, anchors, strict=True)]
            steps += 1
        if steps:
            mean = [s / steps for s in sums]
            tau = tau_min + (tau_max - tau_min) * math.exp(mean[0]) / sum(math.exp(m) for m in mean)
        history.append((list(p_u), tau))
    return history


@pytest.mark.parametrize("mix_estimate", ["reference", "histogram"])
def test_adaptive_logit_adjustment_matches_naive_loop_and_survives_state_dict(mix_estimate):
    counts = [40, 20, 10, 5, 2]
    g = torch.Generator().manual_seed(3)
    batches = []
    for step in range(9):
        pred = torch.randint(0, 5, (12,), generator=g)
        mask = (torch.rand(12, generator=g) > 0.4).float()
        if step == 4:
            mask.zero_()  # a step with nothing confident changes nothing
        batches.append((pred, mask))
    expected = _naive_acr(
        counts, 3, [(p.tolist(), m.tolist()) for p, m in batches], 0.9, 0.5, 2.0, mix_estimate
    )

    def make():
        return AdaptiveLogitAdjustment(
            counts, tau_min=0.5, tau_max=2.0, momentum=0.9, mix_estimate=mix_estimate
        )

    acr = make()
    assert acr.tau.item() == 2.0
    for epoch in range(3):
        if epoch == 2:  # a resumed module continues where the saved one stopped, mid-sums included
            state = {k: v.clone() for k, v in acr.state_dict().items()}
            acr = make()
            acr.load_state_dict(state)
        for pred, mask in batches[3 * epoch : 3 * epoch + 3]:
            acr.update(pred, mask)
        acr.end_epoch()
        p_u, tau = expected[epoch]
        assert acr.unlabeled_prior.tolist() == pytest.approx(p_u, rel=1e-5)
        assert acr.tau.item() == pytest.approx(tau, rel=1e-5)
    prior = torch.tensor(counts, dtype=torch.float) / sum(counts)
    assert torch.allclose(acr.adjustment(), expected[-1][1] * prior.log(), atol=1e-5)


def test_adaptive_tau_follows_the_unlabeled_mix():
    """Predictions drawn from the consistent mix give a small tau, from the reversed mix a large one."""
    counts = torch.tensor([100.0, 50.0, 25.0, 12.0, 6.0, 3.0])
    prior = counts / counts.sum()
    taus = {}
    for name, mix in (
        ("consistent", prior),
        ("uniform", torch.full((6,), 1 / 6)),
        ("reversed", prior.flip(0)),
    ):
        acr = AdaptiveLogitAdjustment(
            counts, tau_min=0.0, tau_max=2.0, momentum=0.9, mix_estimate="histogram"
        )
        g = torch.Generator().manual_seed(0)
        for _ in range(100):
            acr.update(torch.multinomial(mix, 256, replacement=True, generator=g), torch.ones(256))
        acr.end_epoch()
        taus[name] = acr.tau.item()
        assert torch.allclose(acr.unlabeled_prior, mix, atol=0.03)
    assert taus["consistent"] < 0.3 < taus["uniform"] < 1.3 < taus["reversed"]


@pytest.mark.parametrize("posteriors", ["all", "confident"])
def test_em_class_prior_matches_naive_loop_and_survives_state_dict(posteriors):
    counts = [30, 12, 6, 2]
    g = torch.Generator().manual_seed(5)
    steps = [
        (
            torch.softmax(2 * torch.randn(10, 4, generator=g), 1),
            (torch.rand(10, generator=g) > 0.5).float(),
            torch.randint(0, 4, (3,), generator=g),
        )
        for _ in range(6)
    ]
    em = EMClassPrior(counts, momentum=0.8, posteriors=posteriors)
    pi_u, pi = [0.25] * 4, [c / sum(counts) for c in counts]
    for epoch in range(3):
        if epoch == 1:
            state = {k: v.clone() for k, v in em.state_dict().items()}
            em = EMClassPrior(counts, momentum=0.8, posteriors=posteriors)
            em.load_state_dict(state)
        mass, seen = [0.0] * 4, [0.0] * 4
        for probs, mask, y in steps[2 * epoch : 2 * epoch + 2]:
            em.update(probs, mask, y)
            for i in range(len(probs)):
                for c in range(4):
                    mass[c] += float(probs[i, c]) * (float(mask[i]) if posteriors == "confident" else 1.0)
            for k in y.tolist():
                seen[k] += 1
        em.end_epoch()
        pi_u = [0.8 * a + 0.2 * m / sum(mass) for a, m in zip(pi_u, mass, strict=True)]
        both = [m + s for m, s in zip(mass, seen, strict=True)]
        pi = [0.8 * a + 0.2 * b / sum(both) for a, b in zip(pi, both, strict=True)]
        assert em.unlabeled_prior.tolist() == pytest.approx(pi_u, rel=1e-5)
        assert em.train_prior.tolist() == pytest.approx(pi, rel=1e-5)
        assert em.unlabeled_prior.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(em.unlabeled_adjustment(2.0), 2 * torch.tensor(pi_u).log(), atol=1e-5)


def test_em_iterations_recover_the_unlabeled_mix():
    """With a balanced likelihood p(x | y) (1-D Gaussians), E-step posteriors softmax(log p(x | y) + log pi_u)
    and the closed-form M-step converge to the true unlabeled mix, whatever the start."""
    g = torch.Generator().manual_seed(0)
    true_mix = torch.tensor([0.1, 0.2, 0.7])
    means = torch.tensor([-2.0, 0.0, 2.0])
    y = torch.multinomial(true_mix, 20000, replacement=True, generator=g)
    x = means[y] + torch.randn(20000, generator=g)
    log_lik = -0.5 * (x[:, None] - means[None]) ** 2  # (N, 3): the balanced "logits"
    em = EMClassPrior([1, 1, 1], momentum=0.0)
    for _ in range(200):
        posterior = torch.softmax(log_lik + em.unlabeled_adjustment(1.0), 1)  # (N, 3)
        em.update(posterior, torch.ones(len(x)), torch.zeros(0, dtype=torch.long))
        em.end_epoch()
    assert torch.allclose(em.unlabeled_prior, true_mix, atol=0.02)


@pytest.mark.parametrize("cls", [AdaptiveLogitAdjustment, EMClassPrior])
def test_bad_priors_and_momenta_are_refused(cls):
    with pytest.raises(ValueError, match="prior"):
        cls([0, 0, 0])
    with pytest.raises(ValueError, match="momentum"):
        cls([1, 2], momentum=1.0)


def _long_tail(num_classes: int = 10, ratio: float = 10.0) -> torch.Tensor:
    shares = torch.tensor([ratio ** (-k / (num_classes - 1)) for k in range(num_classes)])
    return shares / shares.sum()  # (C,)


def test_reference_mix_estimate_counts_a_class_once_per_step_and_moves_tau_less():
    """Per step, the reference estimate is uniform over the classes predicted with confidence; on a mix like the
    labeled one it keeps tau higher, and on a reversed one lower, than a true histogram does."""
    acr = AdaptiveLogitAdjustment([4, 2, 1, 1], momentum=0.0)
    acr.update(torch.tensor([0, 0, 0, 1, 2, 3]), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    assert acr.unlabeled_prior.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    labeled = _long_tail()
    taus = {}
    for estimate in MIX_ESTIMATES:
        for name, mix in (("consistent", labeled), ("reversed", labeled.flip(0))):
            acr = AdaptiveLogitAdjustment(labeled * 1000, momentum=0.99, mix_estimate=estimate)
            g = torch.Generator().manual_seed(0)
            for _ in range(300):  # a FixMatch step's 7 x 8 unlabeled images, 60 % of them confident
                acr.update(
                    torch.multinomial(mix, 56, replacement=True, generator=g),
                    (torch.rand(56, generator=g) < 0.6).float(),
                )
            acr.end_epoch()
            taus[estimate, name] = acr.tau.item()
    assert taus["histogram", "consistent"] < taus["reference", "consistent"]
    assert taus["reference", "reversed"] < taus["histogram", "reversed"]
    with pytest.raises(ValueError, match="mix_estimate"):
        AdaptiveLogitAdjustment([1, 2], mix_estimate="bincount")


def test_acr_is_inert_under_a_uniform_labeled_prior():
    assert AdaptiveLogitAdjustment([5, 5, 5]).inert and not AdaptiveLogitAdjustment([5, 4, 5]).inert
    acr = AdaptiveLogitAdjustment([5, 5, 5], momentum=0.5)
    acr.update(torch.tensor([0, 0, 0, 0, 2]), torch.ones(5))
    acr.end_epoch()
    # The anchors coincide: tau is a third of the way up whatever the mix, and the adjustment a constant.
    assert acr.tau.item() == pytest.approx(2.0 / 3)
    assert torch.allclose(acr.adjustment(), acr.adjustment()[0].expand(3))


def test_em_warm_up_drops_the_first_epochs():
    em = EMClassPrior([3, 1], momentum=0.5, warmup_steps=3)
    probs, y = torch.tensor([[0.1, 0.9], [0.2, 0.8]]), torch.tensor([0])
    for _ in range(2):
        em.update(probs, torch.ones(2), y)
    em.end_epoch()  # 2 steps < 3: nothing folded in, the sums dropped
    assert em.unlabeled_prior.tolist() == [0.5, 0.5] and em.train_prior.tolist() == [0.75, 0.25]
    assert em.unlabeled_mass.sum() == 0 and em.labeled_seen.sum() == 0
    for _ in range(2):
        em.update(probs, torch.ones(2), y)
    em.end_epoch()  # 4 steps: the second epoch's sums are the first M-step
    assert em.unlabeled_prior.tolist() == pytest.approx([0.5 * 0.5 + 0.5 * 0.15, 0.5 * 0.5 + 0.5 * 0.85])
    with pytest.raises(ValueError, match="posteriors"):
        EMClassPrior([1, 2], posteriors="some")


def _simulated_simpro(posteriors: str, warmup_steps: int, seed: int) -> float:
    """SimPro's estimator in a loop with a simulated network: TV of the final estimate from the true mix.

    10 classes, the labeled stream long-tailed (ratio 10), the unlabeled images reversed; epochs of 20 steps of
    4 labeled and 28 unlabeled images; E-step at tau = 2 with threshold 0.95. The network's logits are the
    balanced log-likelihood ``a * onehot(y) + noise``, shifted by ``-(tau - 1) log pi`` (what training through
    the logit-adjusted losses by the training prior ``pi`` makes of them), and ``a`` grows from 0 to 3 over the
    first 200 steps: a network that learns.
    """
    g = torch.Generator().manual_seed(seed)
    labeled = _long_tail()
    true = labeled.flip(0)
    em = EMClassPrior(labeled * 100, momentum=0.9, posteriors=posteriors, warmup_steps=warmup_steps)
    for step in range(600):
        if step and step % 20 == 0:
            em.end_epoch()
        y = torch.multinomial(true, 28, replacement=True, generator=g)  # (28,)
        logits = 3 * min(1.0, step / 200) * F.one_hot(y, 10) + torch.randn(28, 10, generator=g)
        logits = logits - torch.log(em.train_prior)  # (tau - 1) log pi, tau = 2
        probs = (logits + em.unlabeled_adjustment(2.0)).softmax(1)  # (28, 10) E-step
        mask = (probs.max(1).values >= 0.95).float()
        em.update(probs, mask, torch.multinomial(labeled, 4, replacement=True, generator=g))
    em.end_epoch()
    return 0.5 * (em.unlabeled_prior - true).abs().sum().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_em_estimate_over_all_posteriors_does_not_collapse(seed):
    """The reference form (the confident posteriors, an M-step after every epoch) collapses onto a few classes;
    the default (every posterior, a warm-up) recovers the reversed mix."""
    assert _simulated_simpro("confident", 0, seed) > 0.5
    assert _simulated_simpro("all", 200, seed) < 0.06
