"""A kNN probe: the FAISS kNN vote of the label budget's own frozen features, no training."""

from __future__ import annotations

import numpy as np
import torch

from ssl_kvasir.methods.base import BaseMethod


class KnnProbe(BaseMethod):
    """Each image is classified by the similarity-weighted vote of its ``k`` nearest labeled images
    (:func:`ssl_kvasir.analysis.knn.knn_classify`, Wu et al. 2018's vote, cosine similarity) in the frozen
    backbone's feature space (``backbone.weights=FILE`` or ``backbone.pretrained=true``); the database is the
    labeled training images of the budget, seen through the ``eval`` view.

    The fit only fills the database: each step embeds a labeled batch and stores its features and labels at the
    images' positions (gathered over the processes), so that the first pass over the labeled stream (an epoch of
    ``data.steps_per_epoch`` steps covers it when ``steps_per_epoch * batch_size`` reaches its size, with the
    uniform sampler) fills it, and the fit ends at the end of that epoch. Nothing is optimised; the database is
    state, so the checkpoint carries it, and validation, selection, test, results and curves are those of every
    method.

    Args:
        k: neighbours per query (fewer while the database holds fewer images).
        temperature: the vote's tau.
        **base: arguments of :class:`BaseMethod` (the labeled class counts give the database's size).
    """

    bank: torch.Tensor
    bank_labels: torch.Tensor

    name = "knn_probe"
    labeled_views = ("eval",)

    def __init__(self, k: int, temperature: float, **base):
        super().__init__(**base)
        self.model.requires_grad_(False)
        if self.hparams.labeled_class_counts is None:
            raise ValueError("knn_probe needs labeled_class_counts (the size of its database)")
        size = round(sum(self.hparams.labeled_class_counts))
        self.register_buffer("bank", torch.zeros(size, self.model.num_features))  # (N_lb, D)
        self.register_buffer("bank_labels", torch.full((size,), -1, dtype=torch.long))  # (N_lb,) -1: not yet

    def configure_optimizers(self):
        """Nothing to optimise."""
        return None

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """Store the labeled batch's features and labels at the images' positions (no loss, no backward)."""
        # Set at every step: Lightning puts the whole module back in training mode around validation.
        self.model.eval()
        with torch.no_grad():
            features = self.model.backbone(batch["lb"]["eval"])  # (B, D)
        pos, labels = self.gather(batch["lb"]["pos"]), self.gather(batch["lb"]["label"])
        self.bank[pos] = self.gather(features).to(self.bank.dtype)
        self.bank_labels[pos] = labels
        self.log_training_step({"train/bank_filled": (self.bank_labels >= 0).float().mean()})
        return None

    def on_train_epoch_end(self) -> None:
        """End the fit at the end of the epoch that completed the database: further steps would change nothing."""
        if bool((self.bank_labels >= 0).all()):
            self.trainer.should_stop = True

    def classify(self, modules, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, D) and the log of the vote's class probabilities (B, C) as logits. The frozen network
        predicts whatever ``modules`` are asked for (nothing trains, so the EMA holds no copy of it)."""
        from ssl_kvasir.analysis.knn import knn_classify

        features = self.model.backbone(x)  # (B, D)
        filled = (self.bank_labels >= 0).nonzero().flatten()
        if len(filled) == 0:
            probs = np.full((len(x), self.num_classes), 1.0 / self.num_classes, dtype=np.float32)
        else:
            probs = knn_classify(
                self.bank[filled].float().cpu().numpy(),
                self.bank_labels[filled].cpu().numpy(),
                features.float().cpu().numpy(),
                k=min(self.hparams.k, len(filled)),
                temperature=self.hparams.temperature,
                num_classes=self.num_classes,
                use_gpu=False,
            )  # (B, C)
        probs_t = torch.from_numpy(probs).to(features.device)
        return features, torch.log(probs_t.clamp_min(1e-12))  # (B, D), (B, C)
