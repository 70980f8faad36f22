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


def probability_mse(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean Teacher's consistency cost: the squared difference of the student's probabilities and the teacher's,
    averaged over classes and images (USB's ``consistency_loss(..., 'mse')``).

    Args:
        logits: (B, C) of the student.
        targets: (B, C) probabilities of the teacher (no gradient flows into them).
    """
    return ((logits.softmax(dim=1) - targets) ** 2).mean()


def fairness_loss(
    logits_s: torch.Tensor, mask: torch.Tensor, class_probs: torch.Tensor, label_hist: torch.Tensor
) -> torch.Tensor:
    """FreeMatch's self-adaptive fairness loss (Wang et al., ICLR 2023, eq. 9):
    ``L_f = -H(SumNorm(p~ / h~), SumNorm(p_bar / h_bar))``, with ``H(p, q) = -sum_c p_c log q_c``.

    ``p~`` and ``h~`` are the running averages of the predicted probabilities and of the histogram of predicted
    classes (:class:`~ssl_kvasir.pseudo_labels.masking.SelfAdaptiveThreshold`); ``p_bar`` and ``h_bar`` are the
    same on this step's strong views that passed the mask. Dividing by the histograms keeps the loss from simply
    pushing every class to the same share. As in USB's ``entropy_loss``, a class absent from a histogram gets a
    factor 0 (not infinity), and the loss is 0 when no image passed the mask.

    Args:
        logits_s: (B, C) strong-view logits.
        mask: (B,) weights; a positive weight selects the image.
        class_probs: (C,) ``p~``.
        label_hist: (C,) ``h~``.
    """
    selected = logits_s[mask > 0]  # (M, C)
    if len(selected) == 0:
        return logits_s.sum() * 0.0  # keeps the graph (and the loss's dtype and device)
    probs = selected.float().softmax(dim=1)  # (M, C)
    hist = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).float()  # (C,)
    hist = hist / hist.sum()

    def sum_norm(p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        scaled = p * torch.where(h > 0, 1.0 / h, torch.zeros_like(h))  # (C,)
        return scaled / scaled.sum()

    target = sum_norm(class_probs.float(), label_hist.float()).detach()  # (C,)
    estimate = sum_norm(probs.mean(0), hist)  # (C,)
    return (target * torch.log(estimate + 1e-12)).sum()
