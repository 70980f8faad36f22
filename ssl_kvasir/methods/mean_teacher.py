"""Mean Teacher (Tarvainen & Valpola 2017): consistency with the EMA of the network's own weights."""

from __future__ import annotations

import math

import torch

from ssl_kvasir.losses import probability_mse
from ssl_kvasir.methods.semi_supervised import SemiSupervised


def sigmoid_rampup(step: int, total_steps: int, ratio: float) -> float:
    """Mean Teacher's ramp-up ``exp(-5 (1 - t)^2)``, ``t = min(step / (ratio * total_steps), 1)``."""
    t = min(step / max(ratio * total_steps, 1e-12), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class MeanTeacher(SemiSupervised):
    """ "Mean teachers are better role models: Weight-averaged consistency targets improve semi-supervised deep
    learning results".

    "we define the consistency cost J as the expected distance between the prediction of the student model (with
    weights theta and noise eta) and the prediction of the teacher model (with weights theta' and noise eta')",
    the teacher's weights an exponential moving average of the student's. Here the teacher is the base's EMA
    (``ema_decay``), it sees the weak view and the student the strong view, the distance is the mean squared
    difference of the class probabilities, and its weight ramps up with the paper's sigmoid ``exp(-5 (1 - t)^2)``
    over the first ``unsup_warmup`` share of training.

    Compared with USB's ``meanteacher.py``: the same MSE of probabilities, weight (``lambda_u`` 50) and ramp length.
    Departures: USB's step feeds the teacher's logits into the loss in place of the student's strong-view logits
    (``logits_x_ulb_s = outs_x_ulb_w['logits']``), so that its consistency cost has no gradient; here the student's
    logits are used, as in the paper. The sigmoid ramp of the paper rather than USB's linear one. The teacher
    predicts with its averaged BatchNorm statistics (the EMA copy stays in eval mode); the student's labeled and
    strong batches share one forward pass.

    Args:
        lambda_u: final weight of the consistency cost.
        unsup_warmup: share of the training steps over which the weight ramps up.
        **base: arguments of :class:`~ssl_kvasir.methods.semi_supervised.SemiSupervised` (``ema_decay`` > 0).
    """

    name = "mean_teacher"

    def __init__(self, lambda_u: float, unsup_warmup: float, **base):
        super().__init__(**base)
        if not self.hparams.ema_decay:
            raise ValueError("mean_teacher's teacher is the EMA: set ema_decay > 0")

    def step_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        out = self.forward_streams(batch, ("x_lb", "x_ulb_s"))
        with torch.no_grad():
            teacher = self.classify(self.ema_modules, batch["ulb"]["weak"])[1].float().softmax(1)  # (mu B, C)
        loss_x = self.labeled_loss(out.logits["x_lb"], batch["lb"]["label"])
        ramp = sigmoid_rampup(self.global_step, hp.max_steps, hp.unsup_warmup)
        loss_u = hp.lambda_u * ramp * probability_mse(out.logits["x_ulb_s"], teacher)
        return {"loss": loss_x + loss_u, "loss_x": loss_x, "loss_u": loss_u}
