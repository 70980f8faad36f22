"""SimPro: its step against the naive EM losses (its defaults and the reference code's form), and its label anchor
at HyperKvasir's ratios of unlabeled to labeled images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import LONG_TAIL, long_tailed_batch, long_tailed_method, naive_ce, naive_softmax, one_hot

C = len(LONG_TAIL)


# The reference code's form; SimPro's defaults (the config file's).
REFERENCE_FORM = {"scale_labeled_loss": True, "em_posteriors": "confident", "em_warmup_steps": 0}


@pytest.mark.parametrize("form", ["default", "reference"])
def test_simpro_step_matches_the_naive_em_losses(form):
    """Posterior under pi_u, soft targets above the threshold, losses adjusted by the training prior; the
    reference form scales the labeled loss by mu |L| / |U| and its M-step sums only the confident posteriors."""
    reference = form == "reference"
    extra = REFERENCE_FORM if reference else {}
    module = long_tailed_method("simpro", loss="logit_adjusted", la_tau=2.0, threshold=0.3, **extra)
    # A prior state as after some epochs, so that both adjustments matter.
    module.prior.unlabeled_prior.copy_(torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3]))
    module.prior.train_prior.copy_(torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1]))
    batch = long_tailed_batch(1)
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"], batch["ulb"]["strong"]])
        z_lb, z_w, z_s = (t.tolist() for t in module.model(x).split([4, 8, 8]))
    pi_u, pi = module.prior.unlabeled_prior.tolist(), module.prior.train_prior.tolist()
    loss_x = np.mean(
        [
            naive_ce([v + 2 * math.log(p) for v, p in zip(row, pi, strict=True)], one_hot(int(y), C))
            for row, y in zip(z_lb, batch["lb"]["label"], strict=True)
        ]
    )
    if reference:
        loss_x *= (8 * sum(LONG_TAIL)) / (4 * 40)  # n_ulb |L| / (n_lb |U|)
    terms, masses = [], np.zeros(C)
    for w, s in zip(z_w, z_s, strict=True):
        q = naive_softmax([v + 2 * math.log(p) for v, p in zip(w, pi_u, strict=True)])
        keep = max(q) >= 0.3
        masses += np.array(q) * (keep if reference else 1.0)
        terms.append(keep * naive_ce([v + 2 * math.log(p) for v, p in zip(s, pi, strict=True)], q))
    assert loss.item() == pytest.approx(loss_x + np.mean(terms), rel=1e-4)
    np.testing.assert_allclose(module.prior.unlabeled_mass.numpy(), masses, rtol=1e-5)
    assert module.prior.labeled_seen.tolist() == [1, 1, 0, 1, 1]


@pytest.mark.parametrize("ratio", [30, 300])
def test_simpro_keeps_its_label_anchor_at_hyperkvasir_ratios(ratio):
    """With an unlabeled pool 30 or 300 times the labeled set, the default labeled loss keeps its full weight;
    the reference form's scale mu |L| / |U| would leave it 2 / ratio of it (mu 2 in this batch)."""
    pool = ratio * sum(LONG_TAIL)
    batch = long_tailed_batch(3)
    default = long_tailed_method(
        "simpro", num_unlabeled=pool, threshold=1.0
    )  # threshold 1: no pseudo-label counts
    scaled = long_tailed_method("simpro", num_unlabeled=pool, threshold=1.0, **REFERENCE_FORM)
    scaled.load_state_dict(default.state_dict())
    loss, loss_scaled = default.training_step(batch, 0), scaled.training_step(batch, 0)
    # One forward pass over the three batches, as the step makes it (BatchNorm sees them together).
    x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"], batch["ulb"]["strong"]])
    logits_lb = default.model(x)[:4]
    full = default.labeled_loss(logits_lb, batch["lb"]["label"], default.prior.train_prior)
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    assert loss_scaled.item() == pytest.approx(full.item() * 2 / ratio, rel=1e-4)
