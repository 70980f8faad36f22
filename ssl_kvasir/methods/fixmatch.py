"""FixMatch (Sohn et al. 2020), with the masking rule and distribution alignment as strategy objects."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssl_kvasir.losses import masked_cross_entropy
from ssl_kvasir.methods.base import StreamOutputs
from ssl_kvasir.methods.semi_supervised import SemiSupervised
from ssl_kvasir.names import TEACHERS
from ssl_kvasir.pseudo_labels.masking import (
    DistributionAlignment,
    Knobs,
    Masking,
    build_alignment,
    build_masking,
)


@dataclass(frozen=True)
class PseudoTargets:
    """What the weak view teaches the strong one.

    Attributes:
        targets: (B,) hard pseudo-labels or (B, C) soft ones.
        mask: (B,) their weights in [0, 1].
        probs: (B, C) the weak-view probabilities they were made from (after any alignment).
    """

    targets: torch.Tensor
    mask: torch.Tensor
    probs: torch.Tensor


class FixMatch(SemiSupervised):
    """ "For each unlabeled image, we first compute an artificial label from the model's prediction on a weakly
    augmented version ... only retained if the model assigns a probability above a threshold. The model is
    then trained to predict the artificial label when fed a strongly-augmented version of the same image."

    The step is split as USB splits it, so that a variant overrides one part: :meth:`pseudo_targets` (alignment,
    masking, target making) and :meth:`unlabeled_losses` (the unlabeled loss terms).

    Args:
        masking: which pseudo-labels count, e.g. :class:`~ssl_kvasir.pseudo_labels.masking.FixedThreshold`
            (FixMatch) or :class:`~ssl_kvasir.pseudo_labels.masking.ClassAdaptiveThreshold` (FlexMatch).
        alignment: distribution alignment of the weak predictions, or None.
        lambda_u: weight of the unlabeled loss (1.0).
        teacher: ``model``: the live network labels the weak view in the same forward pass as the labeled and
            strong batches (the paper); ``ema``: the EMA copy labels it (a Mean-Teacher variant).
        **base: arguments of :class:`~ssl_kvasir.methods.semi_supervised.SemiSupervised`.
    """

    name = "fixmatch"

    @classmethod
    def strategies(cls, config: dict) -> dict:
        """``masking``/``alignment`` names (with ``threshold``, ``ema_p``, ``n_sigma``) -> strategy objects."""
        config = dict(config)
        knobs = Knobs(
            threshold=config.pop("threshold"),
            ema_p=config.pop("ema_p"),
            n_sigma=config.pop("n_sigma"),
            num_unlabeled=config["num_unlabeled"],
            num_classes=len(config["class_names"]),
            labeled_class_counts=config.get("labeled_class_counts"),
        )
        masking = build_masking(config.pop("masking"), knobs)
        alignment = build_alignment(config.pop("alignment"), knobs)
        return {**config, "masking": masking, "alignment": alignment}

    def __init__(
        self,
        masking: Masking,
        alignment: DistributionAlignment | None,
        lambda_u: float,
        teacher: str,
        **base,
    ):
        super().__init__(**base)
        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {teacher!r}; valid: {', '.join(TEACHERS)}")
        if teacher == "ema" and not self.hparams.ema_decay:
            raise ValueError("teacher=ema needs an EMA (ema_decay > 0)")
        self.masking: Masking = masking
        self.alignment: DistributionAlignment | None = alignment

    def step_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        ulb = batch["ulb"]
        if self.hparams.teacher == "model":
            # One forward pass over all three batches, so BatchNorm sees them together (as the paper does).
            out = self.forward_streams(batch, ("x_lb", "x_ulb_w", "x_ulb_s"))
            logits_w = out.logits["x_ulb_w"].detach()  # (mu B, C)
        else:
            out = self.forward_streams(batch, ("x_lb", "x_ulb_s"))
            with torch.no_grad():
                logits_w = self.classify(self.ema_modules, ulb["weak"])[1]  # (mu B, C)
        pseudo = self.pseudo_targets(logits_w, ulb["pos"])
        loss_x = self.labeled_loss(out.logits["x_lb"], batch["lb"]["label"])
        unlabeled = self.unlabeled_losses(out, pseudo)
        loss = loss_x
        for term in unlabeled.values():
            loss = loss + term
        hard = pseudo.targets if pseudo.targets.dim() == 1 else pseudo.targets.argmax(1)  # (mu B,)
        return {
            "loss": loss,
            "loss_x": loss_x,
            **unlabeled,
            "mask_rate": pseudo.mask.mean(),
            "pl_acc": self.record_pseudo_labels(hard, pseudo.mask, ulb["label"]),
        }

    def pseudo_targets(self, logits_w: torch.Tensor, idx_ulb: torch.Tensor) -> PseudoTargets:
        """The weak view's (B, C) logits -> hard pseudo-labels and their mask: probabilities, aligned when an
        alignment is set, weighed by the masking strategy (whose statistics see every process's predictions).

        Args:
            logits_w: (B, C) weak-view logits, detached.
            idx_ulb: (B,) positions of the images in the unlabeled pool.
        """
        probs_w = logits_w.float().softmax(1)  # (mu B, C)
        if self.alignment is not None:
            self.alignment.update(self.gather(probs_w))
            probs_w = self.alignment(probs_w)
        mask = self.masking.step(probs_w, idx_ulb, self.gather)  # (mu B,)
        return PseudoTargets(targets=probs_w.argmax(1), mask=mask, probs=probs_w)

    def unlabeled_losses(self, out: StreamOutputs, pseudo: PseudoTargets) -> dict[str, torch.Tensor]:
        """The unlabeled loss terms by name, each weighted (the step's loss is the labeled loss plus their sum):
        here ``loss_u``, ``lambda_u`` times the masked cross-entropy of the strong view against the targets."""
        loss_u = masked_cross_entropy(out.logits["x_ulb_s"], pseudo.targets, pseudo.mask)
        return {"loss_u": self.hparams.lambda_u * loss_u}

    def class_thresholds(self) -> torch.Tensor | None:
        """The masking's per-class thresholds where they adapt (FlexMatch, FreeMatch)."""
        thresholds = getattr(self.masking, "class_thresholds", None)
        return None if thresholds is None else thresholds()
