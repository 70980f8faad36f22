"""Pseudo-Label (Lee 2013): the network's own confident predictions on unlabeled images as targets."""

from __future__ import annotations

import torch

from ssl_kvasir.losses import masked_cross_entropy
from ssl_kvasir.methods.semi_supervised import SemiSupervised


def linear_rampup(step: int, total_steps: int, ratio: float) -> float:
    """USB's ``unsup_warmup``: ``min(step / (ratio * total_steps), 1)``, the unlabeled loss weight's ramp."""
    return min(step / max(ratio * total_steps, 1e-12), 1.0)


class PseudoLabel(SemiSupervised):
    """ "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep Neural Networks".

    "Pseudo-Label are target classes for unlabeled data as if they were true labels. We just pick up the class
    which has maximum predicted probability", trained with a weight that grows "slowly" from 0 so that early,
    poor predictions do not dominate. One view only: the pseudo-label and the loss are both on the weak view
    (no strong augmentation), kept when its confidence passes ``threshold``.

    Compared with USB's ``pseudolabel.py``: the same threshold (0.95), hard labels and linear ramp over the first
    ``unsup_warmup`` share of training (Lee's deterministic annealing is also a linear ramp, in epochs).
    Departures: the labeled and unlabeled batches share one forward pass (BatchNorm sees both, as in FixMatch; USB
    freezes BatchNorm for the unlabeled batch), and the matched protocol's unlabeled batch (``data.mu``).

    Args:
        threshold: confidence a pseudo-label needs to count.
        lambda_u: final weight of the unlabeled loss.
        unsup_warmup: share of the training steps over which the weight ramps up linearly from 0.
        **base: arguments of :class:`~ssl_kvasir.methods.semi_supervised.SemiSupervised`.
    """

    name = "pseudo_label"
    unlabeled_views = ("weak",)

    def __init__(self, threshold: float, lambda_u: float, unsup_warmup: float, **base):
        super().__init__(**base)

    def step_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        out = self.forward_streams(batch, ("x_lb", "x_ulb_w"))
        logits_w = out.logits["x_ulb_w"]  # (mu B, C)
        conf, pseudo = logits_w.detach().float().softmax(1).max(1)  # (mu B,)
        mask = (conf >= hp.threshold).float()
        loss_x = self.labeled_loss(out.logits["x_lb"], batch["lb"]["label"])
        ramp = linear_rampup(self.global_step, hp.max_steps, hp.unsup_warmup)
        loss_u = hp.lambda_u * ramp * masked_cross_entropy(logits_w, pseudo, mask)
        return {
            "loss": loss_x + loss_u,
            "loss_x": loss_x,
            "loss_u": loss_u,
            "mask_rate": mask.mean(),
            "pl_acc": self.record_pseudo_labels(pseudo, mask, batch["ulb"]["label"]),
        }
