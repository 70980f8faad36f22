"""Supervised baseline: labeled images only (the paper's protocol with its defaults in configs/)."""

from __future__ import annotations

from ssl_kvasir.methods.base import BaseMethod


class Supervised(BaseMethod):
    """The labeled loss (cross-entropy, or logit-adjusted with ``loss=logit_adjusted``) on the weakly augmented
    labeled stream."""

    name = "supervised"
    labeled_views = ("weak",)

    def training_step(self, batch: dict, batch_idx: int):
        x_lb, y_lb = batch["lb"]["weak"], batch["lb"]["label"]
        loss = self.labeled_loss(self.model(x_lb), y_lb)
        self.log("train/loss", loss, prog_bar=True)
        return loss
