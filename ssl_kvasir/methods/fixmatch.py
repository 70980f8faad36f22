"""FixMatch (Sohn et al. 2020), with the masking rule and distribution alignment as strategy objects."""

from __future__ import annotations

import torch
from torch import nn

from ssl_kvasir.losses import masked_cross_entropy
from ssl_kvasir.methods.base import BaseMethod
from ssl_kvasir.pseudo_labels.masking import build_alignment, build_masking

TEACHERS = ("ema", "model")


class FixMatch(BaseMethod):
    """ "For each unlabeled image, we first compute an artificial label from the model's prediction on a weakly
    augmented version ... only retained if the model assigns a probability above a threshold. The model is
    then trained to predict the artificial label when fed a strongly-augmented version of the same image."

    Args:
        masking: which pseudo-labels count, e.g. :class:`~ssl_kvasir.pseudo_labels.masking.FixedThreshold`
            (FixMatch) or :class:`~ssl_kvasir.pseudo_labels.masking.ClassAdaptiveThreshold` (FlexMatch).
        alignment: distribution alignment of the weak predictions, or None.
        lambda_u: weight of the unlabeled loss (1.0).
        teacher: ``model``: the live network labels the weak view in the same forward pass as the labeled and
            strong batches (the paper); ``ema``: the EMA copy labels it (a Mean-Teacher variant).
        **base: arguments of :class:`BaseMethod`.
    """

    name = "fixmatch"
    labeled_views = ("weak",)
    unlabeled_views = ("weak", "strong")

    @classmethod
    def data_kwargs(cls, datamodule) -> dict:
        return {**super().data_kwargs(datamodule), "num_unlabeled": len(datamodule.streams["ulb"].rows)}

    @classmethod
    def strategies(cls, config: dict) -> dict:
        """``masking``/``alignment`` names (with ``threshold``, ``num_unlabeled``) -> strategy objects."""
        config = dict(config)
        num_classes = len(config["class_names"])
        masking = build_masking(
            config.pop("masking", "fixed"),
            config.pop("threshold", 0.95),
            config.pop("num_unlabeled"),
            num_classes,
        )
        alignment = build_alignment(
            config.pop("alignment", None), config.get("labeled_class_counts"), num_classes
        )
        return {**config, "masking": masking, "alignment": alignment}

    def __init__(
        self,
        masking: nn.Module,
        alignment: nn.Module | None = None,
        lambda_u: float = 1.0,
        teacher: str = "model",
        **base,
    ):
        super().__init__(**base)
        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {teacher!r}; valid: {', '.join(TEACHERS)}")
        if teacher == "ema" and not self.hparams.ema_decay:
            raise ValueError("teacher=ema needs an EMA (ema_decay > 0)")
        self.masking, self.alignment = masking, alignment
        # Pseudo-label accuracy per class over an epoch, where the true label is known.
        self.register_buffer("_pl_correct", torch.zeros(self.num_classes), persistent=False)
        self.register_buffer("_pl_total", torch.zeros(self.num_classes), persistent=False)
        # Pseudo-labels per class that passed the mask over an epoch, whether the true label is known or not.
        self.register_buffer("_pl_count", torch.zeros(self.num_classes), persistent=False)

    def training_step(self, batch: dict, batch_idx: int):
        x_lb, y_lb = batch["lb"]["weak"], batch["lb"]["label"]
        ulb = batch["ulb"]
        x_ulb_w, x_ulb_s, idx_ulb, y_ulb = ulb["weak"], ulb["strong"], ulb["pos"], ulb["label"]
        n_lb, n_ulb = len(x_lb), len(x_ulb_w)

        if self.hparams.teacher == "model":
            # One forward pass over all three batches, so BatchNorm sees them together (as the paper does).
            logits = self.model(torch.cat([x_lb, x_ulb_w, x_ulb_s]))  # (B + 2 mu B, C)
            logits_lb, logits_ulb_w, logits_ulb_s = logits.split([n_lb, n_ulb, n_ulb])
            probs_w = logits_ulb_w.detach().float().softmax(1)  # (mu B, C)
        else:
            logits_lb, logits_ulb_s = self.model(torch.cat([x_lb, x_ulb_s])).split([n_lb, n_ulb])
            with torch.no_grad():
                probs_w = self.classify(self.ema.module, x_ulb_w)[1].float().softmax(1)  # (mu B, C)

        if self.alignment is not None:
            self.alignment.update(self.gather(probs_w))
            probs_w = self.alignment(probs_w)
        mask = self.masking(probs_w, idx_ulb)  # (mu B,)
        self.masking.update(self.gather(probs_w), self.gather(idx_ulb))
        pseudo = probs_w.argmax(1)  # (mu B,)

        loss_x = self.labeled_loss(logits_lb, y_lb)
        loss_u = masked_cross_entropy(logits_ulb_s, pseudo, mask)
        loss = loss_x + self.hparams.lambda_u * loss_u

        known = (y_ulb >= 0) & (mask > 0)
        correct = known & (pseudo == y_ulb)  # (mu B,)
        # scatter_add_ rather than bincount or boolean indexing: neither makes the host wait for the GPU.
        self._pl_total.scatter_add_(0, pseudo, known.float())
        self._pl_correct.scatter_add_(0, pseudo, correct.float())
        self._pl_count.scatter_add_(0, pseudo, (mask > 0).float())
        pl_acc = correct.sum() / known.sum()  # NaN (0 / 0) when no known image's pseudo-label passed the mask
        self.log_training_step(
            {
                "train/loss": loss,
                "train/loss_x": loss_x,
                "train/loss_u": loss_u,
                "train/mask_rate": mask.mean(),
                "train/pl_acc": pl_acc,
            }
        )
        return loss

    def on_train_epoch_end(self) -> None:
        """Log, per class, the epoch's pseudo-labels: how many passed the mask (``train/pl_count/<class>``), their
        precision where the true label is known (``train/pl_acc/<class>``), both summed over every process; and
        the current threshold of a class-adaptive masking (FlexMatch, ``train/threshold/<class>``). Together
        they show head classes taking over the pseudo-labels."""
        names = self.hparams.class_names
        reduce = self.trainer.strategy.reduce
        count = reduce(self._pl_count.clone(), reduce_op="sum")  # (C,) all ranks
        correct = reduce(self._pl_correct.clone(), reduce_op="sum")  # (C,)
        total = reduce(self._pl_total.clone(), reduce_op="sum")  # (C,)
        logged = {f"train/pl_count/{names[c]}": float(count[c]) for c in range(self.num_classes)}
        logged.update(
            {
                f"train/pl_acc/{names[c]}": float(correct[c] / total[c])
                for c in range(self.num_classes)
                if total[c] > 0
            }
        )
        if hasattr(self.masking, "class_thresholds"):
            # The masking state is updated from every process's predictions, so it is the same on all ranks.
            thresholds = self.masking.class_thresholds()  # (C,)
            logged.update(
                {f"train/threshold/{names[c]}": float(thresholds[c]) for c in range(self.num_classes)}
            )
        # Already summed over ranks: rank_zero_only=True would skip Lightning's own (averaging) sync.
        self.log_dict(logged, rank_zero_only=True)
        self._pl_correct.zero_()
        self._pl_total.zero_()
        self._pl_count.zero_()
