"""Supervised baseline: labeled images only (the paper's protocol with its defaults in configs/)."""

from __future__ import annotations

import torch

from ssl_kvasir.methods.base import BaseMethod


class Supervised(BaseMethod):
    """The labeled loss (cross-entropy, or logit-adjusted with ``loss=logit_adjusted``) on the weakly augmented
    labeled stream."""

    name = "supervised"
    labeled_views = ("weak",)

    def step_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        loss = self.labeled_loss(self.forward_streams(batch, ("x_lb",)).logits["x_lb"], batch["lb"]["label"])
        return {"loss": loss}
