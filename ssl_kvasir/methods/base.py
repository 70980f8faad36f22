"""The base LightningModule: network, EMA, optimizer, schedule, evaluation and prediction.

A method adds only its ``__init__`` arguments and its ``training_step`` (solo-learn's split). It declares the
views its training streams need; the DataModule serves them, so no dataset branches on a method's name.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.fabric.utilities.seed import seed_everything
from torch import nn

from ssl_kvasir.errors import SslKvasirError
from ssl_kvasir.models import EMA, Network

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


class TrainingDiverged(SslKvasirError):
    """The loss stopped being finite."""


def fixmatch_cosine(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """FixMatch's learning-rate factor ``cos(7 pi k / (16 K))`` after an optional linear warm-up.

    The 7/16 keeps the final rate at cos(7 pi / 16) = 0.2 of the initial one instead of decaying to zero.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    k, K = step - warmup_steps, max(total_steps - warmup_steps, 1)
    return math.cos(7 * math.pi * min(k, K) / (16 * K))


class BaseMethod(L.LightningModule):
    """Owns the network, its EMA copy, the optimizer and schedule, and the evaluation metrics.

    Args:
        network: backbone + head.
        class_names: names in index order (for per-class logs and reports).
        optimizer: ``sgd`` (with Nesterov momentum) or ``adamw``.
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: on weights only (not on biases and normalisation parameters).
        schedule: ``cosine`` (FixMatch's) or ``constant``.
        warmup_steps: linear warm-up steps.
        max_steps: total steps, the K of the cosine schedule.
        ema_decay: final EMA decay; 0 disables the EMA.
        ema_warmup: warm the EMA decay up (see :class:`~ssl_kvasir.models.EMA`).
        eval_weights: ``ema`` or ``model``: which weights validation, test and prediction use.
        seed: re-seeds the random generators at every epoch start, so a resumed run repeats an
            uninterrupted one.
    """

    name: str = "base"
    labeled_views: tuple[str, ...] = ("weak",)
    unlabeled_views: tuple[str, ...] = ()
    pseudo_views: tuple[str, ...] = ()

    def __init__(
        self,
        network: Network,
        class_names: list[str],
        optimizer: str = "sgd",
        lr: float = 0.03,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        schedule: str = "cosine",
        warmup_steps: int = 0,
        max_steps: int = 1000,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        eval_weights: str = "ema",
        seed: int = 0,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if optimizer == "sgd" and nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0 (set nesterov=false)")
        if eval_weights == "ema" and not ema_decay:
            raise ValueError("eval_weights=ema needs an EMA (ema_decay > 0)")
        self.save_hyperparameters(ignore=["network"])
        self.model = network
        self.ema = EMA(network, ema_decay, ema_warmup) if ema_decay else None
        self.num_classes = len(class_names)
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_eval: dict = {}

    @classmethod
    def data_kwargs(cls, datamodule) -> dict:
        """Constructor arguments that come from the data (the unlabeled pool's size, class counts, ...)."""
        return {}

    # ---- training plumbing -------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.schedule == "constant":
            factor = (lambda k: min(1.0, (k + 1) / hp.warmup_steps)) if hp.warmup_steps else (lambda k: 1.0)
        else:
            factor = lambda k: fixmatch_cosine(k, hp.max_steps, hp.warmup_steps)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        seed_everything(self.hparams.seed * 1000 + self.current_epoch, workers=True, verbose=False)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss.item()} at step {self.global_step}; the last good checkpoint "
                "is kept (checkpoints/last.ckpt); lower the learning rate or check the data"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every process, concatenated along the batch (``x`` itself on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x).flatten(0, 1)

    # ---- evaluation --------------------------------------------------------------------------------
    @property
    def eval_network(self) -> nn.Module:
        """The network that validation, test and prediction use (EMA or live weights)."""
        return self.ema.module if self.hparams.eval_weights == "ema" else self.model

    def _eval_step(self, batch: dict) -> None:
        logits = self.eval_network(batch["eval"])  # (B, C)
        self._outputs.append((batch["label"].cpu(), logits.argmax(1).cpu()))

    def _eval_epoch_end(self, stage: str) -> None:
        from ssl_kvasir.metrics import confusion_matrix, metrics_from_confusion

        if not self._outputs:
            return
        y_true = torch.cat([y for y, _ in self._outputs]).numpy()
        y_pred = torch.cat([p for _, p in self._outputs]).numpy()
        self._outputs.clear()
        cm = confusion_matrix(y_true, y_pred, self.num_classes)
        metrics = metrics_from_confusion(cm)
        self.last_eval[stage] = {"metrics": metrics, "confusion_matrix": cm}
        # Every process evaluated the whole set (no distributed sampler), so no reduction is needed.
        self.log_dict(
            {f"{stage}/{k}": float(v) for k, v in metrics.items()}, sync_dist=False, rank_zero_only=False
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        features, logits = self.eval_network.features_and_logits(batch["eval"])  # (B, D), (B, C)
        return {
            "index": batch["index"].cpu(),
            "path": list(batch["path"]),
            "probs": logits.float().softmax(1).cpu(),
            "features": features.float().cpu(),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["network_spec"] = dict(self.model.spec)
        checkpoint["method"] = self.name
