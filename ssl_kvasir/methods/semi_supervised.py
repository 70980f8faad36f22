"""The layer every method with an unlabeled stream shares: the pool's size and the pseudo-label bookkeeping."""

from __future__ import annotations

from typing import ClassVar

import torch

from ssl_kvasir.methods.base import BaseMethod


class SemiSupervised(BaseMethod):
    """A labeled stream (weak view) and an unlabeled one (weak and strong views).

    It owns what such methods shared: the size of the unlabeled pool (from the data), and the per-class record
    of the pseudo-labels over an epoch (:meth:`record_pseudo_labels`, logged at the epoch's end). A method adds
    its :meth:`~BaseMethod.step_losses`; the forward pass over the streams and the step's logging are the base's.

    Args:
        num_unlabeled: size of the unlabeled pool (images are identified by their position ``pos`` in it).
        **base: arguments of :class:`BaseMethod`.
    """

    _pl_correct: torch.Tensor
    _pl_total: torch.Tensor
    _pl_count: torch.Tensor

    labeled_views = ("weak",)
    unlabeled_views: ClassVar[tuple[str, ...]] = ("weak", "strong")

    @classmethod
    def data_kwargs(cls, datamodule) -> dict:
        return {**super().data_kwargs(datamodule), "num_unlabeled": len(datamodule.streams["ulb"].rows)}

    def __init__(self, num_unlabeled: int, **base):
        super().__init__(**base)
        self.num_unlabeled = num_unlabeled
        # Pseudo-label accuracy per class over an epoch, where the true label is known.
        self.register_buffer("_pl_correct", torch.zeros(self.num_classes), persistent=False)
        self.register_buffer("_pl_total", torch.zeros(self.num_classes), persistent=False)
        # Pseudo-labels per class that passed the mask over an epoch, whether the true label is known or not.
        self.register_buffer("_pl_count", torch.zeros(self.num_classes), persistent=False)

    def record_pseudo_labels(
        self, pseudo: torch.Tensor, mask: torch.Tensor, y_ulb: torch.Tensor
    ) -> torch.Tensor:
        """Count a step's pseudo-labels per class for the epoch's log; returns their accuracy where the true label
        is known (NaN when no such image passed the mask).

        Args:
            pseudo: (B,) pseudo-labels.
            mask: (B,) their weights; a positive weight counts as passed.
            y_ulb: (B,) true labels, -1 where unknown.
        """
        known = (y_ulb >= 0) & (mask > 0)
        correct = known & (pseudo == y_ulb)  # (B,)
        # scatter_add_ rather than bincount or boolean indexing: neither makes the host wait for the GPU.
        self._pl_total.scatter_add_(0, pseudo, known.float())
        self._pl_correct.scatter_add_(0, pseudo, correct.float())
        self._pl_count.scatter_add_(0, pseudo, (mask > 0).float())
        return correct.sum() / known.sum()  # NaN (0 / 0) when no known image's pseudo-label passed the mask

    def class_thresholds(self) -> torch.Tensor | None:
        """The (C,) current confidence thresholds per class, for a method whose thresholds adapt; None here."""
        return None

    def on_train_epoch_end(self) -> None:
        """Log, per class, the epoch's pseudo-labels: how many passed the mask (``train/pl_count/<class>``), their
        precision where the true label is known (``train/pl_acc/<class>``), both summed over every process; and
        the current thresholds where they adapt (``train/threshold/<class>``). Together they show head classes
        taking over the pseudo-labels."""
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
        thresholds = self.class_thresholds()
        if thresholds is not None:
            # The masking state is updated from every process's predictions, so it is the same on all ranks.
            logged.update(
                {f"train/threshold/{names[c]}": float(thresholds[c]) for c in range(self.num_classes)}
            )
        # Already summed over ranks: rank_zero_only=True would skip Lightning's own (averaging) sync.
        self.log_dict(logged, rank_zero_only=True)
        self._pl_correct.zero_()
        self._pl_total.zero_()
        self._pl_count.zero_()
