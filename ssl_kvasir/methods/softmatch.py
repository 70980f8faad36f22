"""SoftMatch (Chen et al., ICLR 2023): FixMatch with truncated-Gaussian sample weights and uniform alignment."""

from __future__ import annotations

import dataclasses

import torch

from ssl_kvasir.methods.fixmatch import FixMatch, PseudoTargets


class SoftMatch(FixMatch):
    """ "SoftMatch: Addressing the Quantity-Quality Trade-off in Semi-supervised Learning".

    A hard threshold buys quality with quantity; SoftMatch weighs every pseudo-label instead, by a Gaussian of its
    confidence truncated at the running mean (:class:`~ssl_kvasir.pseudo_labels.masking.TruncatedGaussianWeights`,
    ``masking: softmatch``), so that "all unlabeled data [are] utilized". "Uniform Alignment" (``alignment:
    uniform``, :class:`~ssl_kvasir.pseudo_labels.masking.DistributionAlignment` towards balanced classes) is
    applied to the probabilities that the weights are computed from, "to ensure that the pseudo-labels of all
    classes are treated equally".

    Compared with USB's ``softmatch.py``: as there, the weights come from the aligned probabilities and the hard
    pseudo-labels from the raw ones (:meth:`pseudo_targets`), and the statistics are updated before they weigh
    the step. Departures: the running average of the predictions starts from the first step's mean (as USB's
    ``DistAlignEMAHook``, no 1e-6 added to the ratio's terms); a step with a single unlabeled image leaves the
    variance as it is; the matched protocol's unlabeled batch and schedule.

    Args:
        **fixmatch: arguments of :class:`~ssl_kvasir.methods.fixmatch.FixMatch` (its config sets ``masking:
            softmatch`` and ``alignment: uniform``).
    """

    name = "softmatch"

    def pseudo_targets(self, logits_w: torch.Tensor, idx_ulb: torch.Tensor) -> PseudoTargets:
        """Weights from the aligned probabilities; hard pseudo-labels from the raw ones ("uniform alignment in
        softmatch do not use aligned probs for generating pseudo labels", USB)."""
        pseudo = super().pseudo_targets(logits_w, idx_ulb)
        return dataclasses.replace(pseudo, targets=logits_w.argmax(1))  # (mu B,)
