"""A linear probe: a linear head trained on the label budget over the frozen features of pretrained weights."""

from __future__ import annotations

import torch

from ssl_kvasir.methods.base import BaseMethod


class LinearProbe(BaseMethod):
    """The baseline a reviewer asks for first: does the unlabeled pile beat a frozen pretrained feature with the
    same labels? The backbone keeps the weights it was built with (``backbone.weights=FILE`` or
    ``backbone.pretrained=true``) and stays in evaluation mode (its BatchNorm statistics do not move); only the
    network's head trains, with the labeled loss on the weak view of the labeled stream, under the same
    optimiser, schedule, validation and selection as every other method.

    On a backbone built without pretrained weights this probes random features (the tests do so for speed).

    Args:
        **base: arguments of :class:`BaseMethod`.
    """

    name = "linear_probe"
    labeled_views = ("weak",)

    def __init__(self, **base):
        super().__init__(**base)
        self.model.backbone.requires_grad_(False)

    def step_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        # Set at every step: Lightning puts the whole module back in training mode around validation.
        self.model.backbone.eval()
        with torch.no_grad():
            features = self.model.backbone(batch["lb"]["weak"])  # (B, D)
        loss = self.labeled_loss(self.model.head(features), batch["lb"]["label"])
        return {"loss": loss}
