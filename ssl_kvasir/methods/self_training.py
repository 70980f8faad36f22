"""Self-training in the Noisy Student style (Xie et al. 2020): the student of each round.

"train a teacher model on labeled images, use the teacher to generate pseudo labels on unlabeled images,
then train a student model on the combination of labeled images and pseudo labeled images ... we iterate
this process by putting back the student as a teacher". The student is noised: RandAugment on the pseudo-labeled
images (the ``strong`` view) and, optionally, dropout and stochastic depth in the backbone
(``method.noise``). Labeled images get the standard weak view, so that the first teacher (round 0, labeled
images only) is as good as the supervised baseline: on short runs a teacher trained on strong views alone
was far weaker (bench/bench_label_efficiency.py). The rounds themselves (teacher predictions, selection,
a CSV per round) are run by :mod:`ssl_kvasir.self_training`; this module trains one round.
"""

from __future__ import annotations

import torch.nn.functional as F

from ssl_kvasir.losses import soft_cross_entropy
from ssl_kvasir.methods.base import BaseMethod


class SelfTraining(BaseMethod):
    """Cross-entropy on labeled images plus, from round 1 on, on noised pseudo-labeled ones.

    Args:
        lambda_pl: weight of the pseudo-labeled loss.
        **base: arguments of :class:`BaseMethod`.
    """

    name = "self_training"
    labeled_views = ("weak",)
    pseudo_views = ("strong",)

    def __init__(self, lambda_pl: float = 1.0, **base):
        super().__init__(**base)

    def training_step(self, batch: dict, batch_idx: int):
        x_lb, y_lb = batch["lb"]["weak"], batch["lb"]["label"]
        loss_x = F.cross_entropy(self.model(x_lb), y_lb)
        loss = loss_x
        logs = {"train/loss_x": loss_x}
        if "pl" in batch:
            x_pl, target_pl = batch["pl"]["strong"], batch["pl"]["target"]  # (B, 3, H, W), (B, C)
            loss_pl = soft_cross_entropy(self.model(x_pl), target_pl)
            loss = loss_x + self.hparams.lambda_pl * loss_pl
            logs["train/loss_pl"] = loss_pl
        logs["train/loss"] = loss
        self.log_dict(logs, prog_bar=True)
        return loss
