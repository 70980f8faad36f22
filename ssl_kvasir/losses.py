"""Loss functions: pure tensor functions, each tested alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against a distribution: ``-sum_c targets_c * log softmax(logits)_c``.

    Args:
        logits: (B, C).
        targets: (B, C) probabilities (rows sum to 1).
        reduction: ``mean``, ``sum`` or ``none``.
    """
    loss = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)  # (B,)
    return _reduce(loss, reduction)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FixMatch's unlabeled loss: ``1/mu_B * sum_b 1[max q_b >= tau] H(q_b_hat, p(y | A(u_b)))``.

    The mean runs over *all* unlabeled images, masked or not, as in the paper (eq. 4), so the loss's weight
    grows with the share of confident pseudo-labels.

    Args:
        logits: (B, C) of the strong view.
        targets: (B,) hard pseudo-labels or (B, C) soft ones.
        mask: (B,) weights in [0, 1].
    """
    if targets.dim() == 1:
        loss = F.cross_entropy(logits, targets, reduction="none")  # (B,)
    else:
        loss = soft_cross_entropy(logits, targets, reduction="none")  # (B,)
    return (loss * mask).mean()


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def logit_adjusted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    prior: torch.Tensor,
    tau: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Menon et al. 2021's logit-adjusted loss: cross-entropy of ``logits + tau * log prior``.

    "we add a label-dependent offset to each of the logits ... ``l(y, f(x)) = -log e^{f_y(x) + tau log pi_y} /
    sum_y' e^{f_y'(x) + tau log pi_y'}``": training through the offset lets the raw logits ``f(x)`` estimate the
    balanced posterior, so that predicting with ``argmax f(x)`` minimises the balanced error. ``tau = 0`` is
    plain cross-entropy.

    Args:
        logits: (B, C).
        targets: (B,) class indices or (B, C) probabilities.
        prior: (C,) class prior pi (counts or shares; normalised here; a zero share counts as 1e-12).
        tau: strength of the adjustment.
        reduction: ``mean``, ``sum`` or ``none``.
    """
    prior = prior.to(logits.device, torch.float32)
    log_prior = torch.log((prior / prior.sum()).clamp_min(1e-12))  # (C,)
    adjusted = logits + (tau * log_prior).to(logits.dtype)  # (B, C)
    if targets.dim() == 1:
        return F.cross_entropy(adjusted, targets, reduction=reduction)
    return soft_cross_entropy(adjusted, targets, reduction=reduction)
