"""FreeMatch (Wang et al., ICLR 2023): FixMatch with a self-adaptive threshold and a fairness loss."""

from __future__ import annotations

from typing import cast

import torch

from ssl_kvasir.losses import fairness_loss
from ssl_kvasir.methods.base import StreamOutputs
from ssl_kvasir.methods.fixmatch import FixMatch, PseudoTargets
from ssl_kvasir.pseudo_labels.masking import SelfAdaptiveThreshold


class FreeMatch(FixMatch):
    """ "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning".

    "the confidence threshold should be adjusted according to the model's learning status": the masking is the
    self-adaptive threshold (:class:`~ssl_kvasir.pseudo_labels.masking.SelfAdaptiveThreshold`, ``masking:
    freematch``), a global EMA of the confidence scaled per class by the EMA of the class probabilities. The
    unlabeled loss adds the self-adaptive fairness loss (:func:`~ssl_kvasir.losses.fairness_loss`) with weight
    ``lambda_f``, "to encourage the model to make diverse predictions for each class".

    Compared with USB's ``freematch.py``: the same hard pseudo-labels of the weak view, the same order (the
    statistics are updated with the step's predictions before they mask it) and the same fairness loss. Departures:
    the matched protocol's unlabeled batch (``data.mu``) and cosine schedule rather than USB's per-dataset ones;
    ``lambda_f`` is USB's CIFAR-10 40-label value (0.001; its default argument is 0.01); USB's ``use_quantile`` and
    ``clip_thresh`` options (both off in its configs) are not offered.

    Args:
        lambda_f: weight of the fairness loss.
        **fixmatch: arguments of :class:`~ssl_kvasir.methods.fixmatch.FixMatch`; its ``masking`` must be the
            self-adaptive threshold, whose running statistics the fairness loss reads.
    """

    name = "freematch"

    def __init__(self, lambda_f: float, **fixmatch):
        super().__init__(**fixmatch)
        if not isinstance(self.masking, SelfAdaptiveThreshold):
            raise ValueError(
                "freematch's fairness loss needs masking=freematch (the self-adaptive threshold)"
            )

    def unlabeled_losses(self, out: StreamOutputs, pseudo: PseudoTargets) -> dict[str, torch.Tensor]:
        """FixMatch's ``loss_u`` and ``loss_fair``, ``lambda_f`` times the fairness loss on the strong views."""
        masking = cast(SelfAdaptiveThreshold, self.masking)  # as __init__ checked
        fair = fairness_loss(out.logits["x_ulb_s"], pseudo.mask, masking.class_probs, masking.label_hist)
        return {**super().unlabeled_losses(out, pseudo), "loss_fair": self.hparams.lambda_f * fair}
