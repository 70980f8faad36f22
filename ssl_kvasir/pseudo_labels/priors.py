"""The class prior of the unlabeled pool: ACR's adaptive logit adjustment and SimPro's EM estimate.

HyperKvasir's 99,417 unlabeled images have their own, unknown class mix (the paper's Fig. 9), so a method that
assumes the labeled mix for them (FixMatch does, implicitly) hands the head classes the rare classes'
pseudo-labels. Both estimators here learn the unlabeled prior while training and turn it into a logit
adjustment (Menon et al. 2021): an additive offset ``tau * log pi`` on the logits.

Like the masking strategies, they are ``nn.Module`` objects whose state (priors, the running sums of an
epoch) lives in buffers, so checkpoints carry it and a resumed run continues where it stopped. Their updates
take tensors that the method has already gathered over the DDP processes (``BaseMethod.gather``): every
process folds in the same numbers and the priors stay identical without a reduction of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssl_kvasir.names import EM_POSTERIORS, MIX_ESTIMATES

ANCHORS = ("consistent", "uniform", "reversed")
"""ACR's anchor distributions for the unlabeled class mix, in the order of :func:`anchor_distributions`."""


EPS = 1e-12
"""Smallest share a prior takes inside a logarithm (the reference implementations' ``+ 1e-12``)."""


def normalize(prior: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """``prior / prior.sum()`` as float32: counts or shares -> a (C,) distribution."""
    prior = torch.as_tensor(prior, dtype=torch.float32)
    if prior.dim() != 1 or len(prior) == 0 or (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"a class prior must be non-negative (C,) counts with a positive sum, got {prior}")
    return prior / prior.sum()


def log_prior(prior: torch.Tensor, tau: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The logit adjustment ``tau * log pi`` of a (C,) distribution (shares below 1e-12 count as 1e-12)."""
    return tau * torch.log(prior.clamp_min(EPS))


def anchor_distributions(labeled_prior: torch.Tensor) -> torch.Tensor:
    """ACR's three anchors for the unlabeled class mix: consistent, uniform and reversed, as (3, C).

    "consistent" is the labeled distribution itself, "uniform" is ``1/C`` and "reversed" gives the share of the
    k-th largest class to the k-th smallest (the reference code flips a class list sorted by size; HyperKvasir's
    classes are not sorted by size, so the flip is done on the ranks).

    Args:
        labeled_prior: (C,) distribution of the labeled set.
    """
    num_classes = len(labeled_prior)
    ascending = torch.argsort(labeled_prior, stable=True)  # (C,) smallest class first
    reversed_prior = torch.empty_like(labeled_prior)
    reversed_prior[ascending] = labeled_prior[ascending.flip(0)]  # smallest class gets the largest share
    uniform = torch.full_like(labeled_prior, 1.0 / num_classes)
    return torch.stack([labeled_prior, uniform, reversed_prior])  # (3, C)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(KL(p || q) + KL(q || p)) / 2`` over the last dimension (shares below 1e-12 count as 1e-12)."""
    log_p, log_q = torch.log(p.clamp_min(EPS)), torch.log(q.clamp_min(EPS))
    return 0.5 * ((p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1))


class AdaptiveLogitAdjustment(nn.Module):
    """ACR's adaptive consistency regulariser (Wei & Gan, CVPR 2023): how strongly to adjust pseudo-labels.

    The balanced head's confident predictions on unlabeled images estimate the unlabeled class distribution
    ``p_u`` (a running average over steps). Its symmetric KL divergence to the three anchors (consistent,
    uniform, reversed; :func:`anchor_distributions`), averaged over an epoch, sets the next epoch's strength:
    ``tau = tau_min + (tau_max - tau_min) * softmax(d)_consistent`` with ``d = (d_con, d_uni, d_rev)``. An
    unlabeled pool that looks like the labeled one (small ``d_con``) gets little adjustment; one that looks
    reversed gets ``tau_max``. The standard head's pseudo-labels are then ``softmax(logits - tau log p_l)``.

    How a step counts (``mix_estimate``):

    - ``reference`` (the default): as the official code (Gank0078/ACR, ``now_mask[t] += m``), where PyTorch's
      indexed add with repeated indices keeps one write, so a class counts at most once per step: the step's
      distribution is uniform over the classes with a confident prediction. We count a class when any of its
      predictions is confident, so the result does not depend on the order of the writes. This is the estimator
      the paper's ``tau`` values were tuned with: in a simulation the histogram moves ``tau`` from 0.42 to 0.07
      on a consistent mix and from 1.27 to 1.76 on a reversed one, so it is the default.
    - ``histogram``: a true histogram of the confident predictions (``bincount``), as the paper describes the
      estimate in words.

    Args:
        labeled_counts: (C,) the training prior (the labeled stream's class counts or shares as sampled).
        tau_min: adjustment strength for an unlabeled pool that matches the consistent anchor.
        tau_max: strength for one that matches the reversed anchor, and before the first estimate.
        momentum: of the running average ``p_u`` (the reference's ``ema_u``).
        mix_estimate: ``reference`` or ``histogram`` (above).
    """

    labeled_prior: torch.Tensor
    anchors: torch.Tensor
    unlabeled_prior: torch.Tensor
    tau: torch.Tensor
    distances: torch.Tensor
    distance_sum: torch.Tensor
    distance_steps: torch.Tensor

    def __init__(
        self,
        labeled_counts: Sequence[int] | torch.Tensor,
        tau_min: float = 0.0,
        tau_max: float = 2.0,
        momentum: float = 0.99,
        mix_estimate: str = "reference",
    ):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if mix_estimate not in MIX_ESTIMATES:
            raise ValueError(f"unknown mix_estimate {mix_estimate!r}; valid: {', '.join(MIX_ESTIMATES)}")
        self.tau_min, self.tau_max, self.momentum = tau_min, tau_max, momentum
        self.mix_estimate = mix_estimate
        labeled_prior = normalize(labeled_counts)  # (C,)
        num_classes = len(labeled_prior)
        self.register_buffer("labeled_prior", labeled_prior)
        self.register_buffer("anchors", anchor_distributions(labeled_prior))  # (3, C)
        self.register_buffer("unlabeled_prior", torch.full((num_classes,), 1.0 / num_classes))  # (C,)
        self.register_buffer("tau", torch.tensor(float(tau_max)))
        # The last finished epoch's mean distances to the anchors, and the running sums of this epoch.
        self.register_buffer("distances", torch.zeros(3))
        self.register_buffer("distance_sum", torch.zeros(3))
        self.register_buffer("distance_steps", torch.zeros(()))

    @torch.no_grad()
    def update(self, pred: torch.Tensor, mask: torch.Tensor) -> None:
        """Fold one step's balanced-head predictions into ``p_u`` and the epoch's distance sums.

        Args:
            pred: (N,) predicted classes of the unlabeled images (of every process).
            mask: (N,) weights in [0, 1]; the confident ones count.
        """
        counts = torch.bincount(pred, weights=mask.float(), minlength=len(self.unlabeled_prior))  # (C,)
        if self.mix_estimate == "reference":
            counts = (counts > 0).float()  # each class with a confident prediction once
        total = counts.sum()
        seen = (total > 0).float()  # a step without a confident prediction changes nothing
        step_dist = counts / total.clamp_min(EPS)  # (C,)
        updated = self.momentum * self.unlabeled_prior + (1 - self.momentum) * step_dist  # (C,)
        self.unlabeled_prior.copy_(seen * updated + (1 - seen) * self.unlabeled_prior)
        self.distance_sum += seen * symmetric_kl(self.anchors, self.unlabeled_prior[None])  # (3,)
        self.distance_steps += seen

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Set ``tau`` from the epoch's mean distances to the anchors and start the next epoch's sums.

        An epoch without an estimate (all steps before the start, or nothing confident) keeps ``tau``.
        """
        if self.distance_steps > 0:
            self.distances.copy_(self.distance_sum / self.distance_steps)
            weight = torch.softmax(self.distances, dim=0)[0]
            self.tau.fill_(self.tau_min + (self.tau_max - self.tau_min) * float(weight))
        self.distance_sum.zero_()
        self.distance_steps.zero_()

    def adjustment(self) -> torch.Tensor:
        """The (C,) offset ``tau * log p_l`` that ACR subtracts from the standard head's logits."""
        return log_prior(self.labeled_prior, self.tau)

    @property
    def inert(self) -> bool:
        """Whether the labeled prior is uniform: the three anchors then coincide, ``tau`` stays at
        ``tau_min + (tau_max - tau_min) / 3`` whatever the unlabeled mix, and every adjustment is a constant shift of the
        logits, which changes no prediction: ACR is FixMatch with a second head."""
        return bool(
            torch.allclose(
                self.labeled_prior, torch.full_like(self.labeled_prior, 1 / len(self.labeled_prior))
            )
        )


class EMClassPrior(nn.Module):
    """SimPro's closed-form M-step for the unlabeled class prior (Du et al., ICML 2024).

    SimPro writes semi-supervised learning as EM with the class-conditional ``p(x | y)`` shared by labeled and
    unlabeled images and separate priors ``pi_l`` and ``pi_u``. The E-step's posterior of an unlabeled image
    is ``softmax(f(x) + tau log pi_u)``; the M-step maximises the expected log-likelihood over ``pi_u`` in
    closed form, ``pi_u = 1/N_u sum_i p(y | x_i)``: the mean posterior. The prior of the whole training set
    (labeled counts plus unlabeled posteriors) adjusts the training losses so that ``f`` itself learns the
    balanced ``p(x | y)``. Both are running averages over epochs (momentum ``ema_u``), updated at each epoch's
    end once ``warmup_steps`` steps have been seen.

    The reference code averages only the confident posteriors (``posteriors="confident"``) and makes its first
    M-step after one epoch. With a barely trained network that estimate collapses: the E-step adds
    ``tau log pi_u``, so a class whose share has fallen no longer reaches the threshold, and an M-step over the
    confident posteriors gives it still less mass. The defaults, ``posteriors="all"`` (the closed-form M-step
    itself) and a warm-up before the first M-step, were chosen on the long-tailed digits benchmark (README,
    "Rare classes").

    Departure from the reference code: it divides the epoch's posterior sum by ``sum + 1``, so its estimate
    sums to slightly less than 1; ours is normalised, so that it is a distribution (23 shares summing to 1).

    Args:
        labeled_counts: (C,) the training prior's starting point (the labeled stream's class counts or shares
            as sampled).
        momentum: of both running averages.
        posteriors: ``all`` or ``confident``: which posteriors the M-step averages.
        warmup_steps: steps (updates) before the first M-step; the sums of earlier epochs are dropped.
    """

    unlabeled_prior: torch.Tensor
    train_prior: torch.Tensor
    unlabeled_mass: torch.Tensor
    labeled_seen: torch.Tensor
    steps: torch.Tensor

    def __init__(
        self,
        labeled_counts: Sequence[int] | torch.Tensor,
        momentum: float = 0.9,
        posteriors: str = "all",
        warmup_steps: int = 0,
    ):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if posteriors not in EM_POSTERIORS:
            raise ValueError(f"unknown posteriors {posteriors!r}; valid: {', '.join(EM_POSTERIORS)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.momentum, self.posteriors, self.warmup_steps = momentum, posteriors, warmup_steps
        labeled_prior = normalize(labeled_counts)  # (C,)
        num_classes = len(labeled_prior)
        self.register_buffer("unlabeled_prior", torch.full((num_classes,), 1.0 / num_classes))  # (C,)
        self.register_buffer("train_prior", labeled_prior.clone())  # (C,)
        # This epoch's sums: posterior mass of confident unlabeled images, labeled images seen per class.
        self.register_buffer("unlabeled_mass", torch.zeros(num_classes))
        self.register_buffer("labeled_seen", torch.zeros(num_classes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # updates seen, for the warm-up

    @torch.no_grad()
    def update(self, probs: torch.Tensor, mask: torch.Tensor, y_lb: torch.Tensor) -> None:
        """Add one step's posteriors and labels to the epoch's sums.

        Args:
            probs: (N, C) E-step posteriors of the unlabeled images (of every process).
            mask: (N,) weights in [0, 1]: the confident ones (with ``posteriors="confident"`` only they count).
            y_lb: (M,) labels of the step's labeled images (of every process).
        """
        weight = mask.float() if self.posteriors == "confident" else torch.ones_like(mask, dtype=torch.float)
        self.unlabeled_mass += (probs.float() * weight[:, None]).sum(0)  # (C,)
        self.steps += 1
        self.labeled_seen += torch.bincount(y_lb, minlength=len(self.labeled_seen)).float()  # (C,)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """The M-step: fold the epoch's sums into ``pi_u`` and the training prior, then start new sums.

        With no unlabeled mass in the epoch ``pi_u`` is kept; before ``warmup_steps`` the sums are dropped.
        """
        # Still warming up: the posteriors of a barely trained network are not worth an estimate.
        if self.steps >= self.warmup_steps:
            m = self.momentum
            mass = self.unlabeled_mass.sum()
            if mass > 0:
                self.unlabeled_prior.mul_(m).add_(self.unlabeled_mass / mass, alpha=1 - m)
            seen = self.labeled_seen + self.unlabeled_mass  # (C,)
            if seen.sum() > 0:
                self.train_prior.mul_(m).add_(seen / seen.sum(), alpha=1 - m)
        self.unlabeled_mass.zero_()
        self.labeled_seen.zero_()

    def unlabeled_adjustment(self, tau: float) -> torch.Tensor:
        """The (C,) offset ``tau log pi_u`` added to weak-view logits to form the E-step posterior."""
        return log_prior(self.unlabeled_prior, tau)
