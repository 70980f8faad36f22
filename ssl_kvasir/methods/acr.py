"""ACR (Wei & Gan, CVPR 2023): a balanced second head and adaptively logit-adjusted pseudo-labels."""

from __future__ import annotations

import torch
from torch import nn

from ssl_kvasir.losses import logit_adjusted_cross_entropy, masked_cross_entropy
from ssl_kvasir.methods.base import PriorEstimator
from ssl_kvasir.methods.semi_supervised import SemiSupervised
from ssl_kvasir.pseudo_labels.priors import ANCHORS, AdaptiveLogitAdjustment, log_prior


class ACR(SemiSupervised):
    """ "Towards Realistic Long-Tailed Semi-Supervised Learning: Consistency Is All You Need": FixMatch with two
    classifiers on one backbone and pseudo-labels adjusted to the estimated class mix of the unlabeled images.

    - The *standard* head (the network's own) is trained with the labeled loss and with pseudo-labels
      ``softmax(z_w - tau log p_l)``, where ``tau`` follows the estimated unlabeled mix each epoch
      (:class:`~ssl_kvasir.pseudo_labels.priors.AdaptiveLogitAdjustment`): nearly 0 when it looks like the
      labeled mix, ``tau_max`` when it looks reversed.
    - The *balanced* head (``balanced_head``, a linear layer on the same features) is trained with the
      logit-adjusted loss (``tau_balanced``) and with pseudo-labels adjusted by the fixed ``tau_pseudo_balanced``;
      its confident predictions estimate the unlabeled mix, and it is the head that predicts (:meth:`classify`).
    - "dual-branch consistency": an unlabeled image counts for a head when the adjusted or the raw prediction
      passes the threshold (the reference code's ``mask + mask_t``).

    Departure from the reference code: one strong view per unlabeled image (the DataModule's FixMatch stream)
    instead of two, so that ACR costs what FixMatch costs per step.

    Args:
        adjustment: the estimate of the unlabeled mix and the adaptive strength ``tau``.
        threshold: confidence threshold of the pseudo-labels (0.95).
        lambda_u: weight of the unlabeled losses (1.0).
        tau_balanced: logit adjustment of the balanced head's labeled loss (the reference's ``tau2``, 2).
        tau_pseudo_balanced: adjustment of the balanced head's pseudo-labels (``tau12``, 2).
        est_epoch: the unlabeled mix is estimated from the epochs after this one (0-based; 5 in the reference).
        **base: arguments of :class:`~ssl_kvasir.methods.semi_supervised.SemiSupervised`.
    """

    name = "acr"

    @classmethod
    def strategies(cls, config: dict) -> dict:
        """``tau_min``, ``tau_max``, ``ema_u``, ``mix_estimate`` and the labeled stream's class counts -> the
        adaptive adjustment."""
        config = dict(config)
        counts = config.get("labeled_class_counts")
        if counts is None:
            raise ValueError("ACR needs labeled_class_counts (the labeled class prior)")
        adjustment = AdaptiveLogitAdjustment(
            counts,
            tau_min=config.pop("tau_min"),
            tau_max=config.pop("tau_max"),
            momentum=config.pop("ema_u"),
            mix_estimate=config.pop("mix_estimate"),
        )
        return {**config, "adjustment": adjustment}

    def __init__(
        self,
        adjustment: AdaptiveLogitAdjustment,
        threshold: float,
        lambda_u: float,
        tau_balanced: float,
        tau_pseudo_balanced: float,
        est_epoch: int,
        **base,
    ):
        super().__init__(**base)
        self.adjustment = adjustment
        self.balanced_head = nn.Linear(self.model.num_features, self.num_classes)

    def classify(self, modules, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The balanced head predicts (the reference evaluates ``classify1``)."""
        features = modules["model"].backbone(x)  # (B, D)
        return features, modules["balanced_head"](features)  # (B, D), (B, C)

    def step_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        y_lb = batch["lb"]["label"]
        # One backbone pass over all three batches (BatchNorm sees them together), two heads on its features.
        out = self.forward_streams(batch, ("x_lb", "x_ulb_w", "x_ulb_s"), features=True)
        logits_lb, logits_w, logits_s = out.logits["x_lb"], out.logits["x_ulb_w"], out.logits["x_ulb_s"]
        balanced = out.split(self.balanced_head(out.joint_features))
        logits_lb_b, logits_w_b, logits_s_b = balanced["x_lb"], balanced["x_ulb_w"], balanced["x_ulb_s"]

        with torch.no_grad():
            z_w, z_w_b = logits_w.detach().float(), logits_w_b.detach().float()  # (mu B, C)
            prior = self.adjustment.labeled_prior
            # Standard head: adaptively adjusted pseudo-labels, kept when they or the raw ones are confident.
            conf_adj, pseudo = (z_w - self.adjustment.adjustment()).softmax(1).max(1)  # (mu B,)
            conf_raw = z_w.softmax(1).max(1).values
            mask = ((conf_adj >= hp.threshold) | (conf_raw >= hp.threshold)).float()
            # Balanced head: pseudo-labels adjusted with the fixed strength, or its own confident predictions.
            conf_adj_b, pseudo_b = (z_w - log_prior(prior, hp.tau_pseudo_balanced)).softmax(1).max(1)
            conf_b, pred_b = z_w_b.softmax(1).max(1)  # (mu B,)
            mask_b = ((conf_adj_b >= hp.threshold) | (conf_b >= hp.threshold)).float()
            if self.current_epoch > hp.est_epoch:
                self.adjustment.update(self.gather(pred_b), self.gather((conf_b >= hp.threshold).float()))

        loss_x = self.labeled_loss(logits_lb, y_lb)
        loss_x_b = logit_adjusted_cross_entropy(logits_lb_b, y_lb, prior, tau=hp.tau_balanced)
        loss_u = masked_cross_entropy(logits_s, pseudo, mask)
        loss_u_b = masked_cross_entropy(logits_s_b, pseudo_b, mask_b)
        loss = loss_x + loss_x_b + hp.lambda_u * (loss_u + loss_u_b)
        return {
            "loss": loss,
            "loss_x": loss_x + loss_x_b,
            "loss_u": loss_u + loss_u_b,
            "mask_rate": mask.mean(),
            "mask_rate_balanced": mask_b.mean(),
            "pl_acc": self.record_pseudo_labels(pseudo, mask, batch["ulb"]["label"]),
        }

    def prior_estimator(self) -> PriorEstimator:
        """The balanced head's estimate of the unlabeled mix, which sets the adjustment's strength."""
        return self.adjustment

    def fit_warnings(self) -> list[str]:
        """ACR is inert when the training prior is uniform (a labels-per-class budget whose classes all have
        their share, or ``data.sampler=class_balanced``): its three anchors coincide and every adjustment is a
        constant shift of the logits."""
        if not self.adjustment.inert:
            return []
        return [
            "acr is inert here: the training prior is uniform (labels-per-class budget or class-balanced sampler), "
            "so its anchors coincide and its adjustments change no prediction; it trains as FixMatch with two heads"
        ]

    def on_train_epoch_start(self) -> None:
        """Set ``tau`` from the last epoch's estimate (the base's prior seam, :meth:`BaseMethod.on_train_epoch_start`)
        and log it with the distances to the anchors."""
        super().on_train_epoch_start()
        self.log_dict(
            {
                "train/acr_tau": float(self.adjustment.tau),
                **{
                    f"train/acr_distance/{k}": float(d)
                    for k, d in zip(ANCHORS, self.adjustment.distances, strict=True)
                },
            }
        )
