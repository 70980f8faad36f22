"""SimPro (Du et al., ICML 2024): semi-supervised learning as EM with an estimated unlabeled class prior."""

from __future__ import annotations

import torch

from ssl_kvasir.losses import logit_adjusted_cross_entropy
from ssl_kvasir.methods.base import BaseMethod
from ssl_kvasir.pseudo_labels.priors import EMClassPrior


class SimPro(BaseMethod):
    """ "SimPro: A Simple Probabilistic Framework Towards Realistic Long-Tailed Semi-Supervised Learning".

    The network's logits ``f(x)`` model the class-conditional ``p(x | y)``, shared by labeled and unlabeled
    images; the two sets differ only in their class priors. The unlabeled prior ``pi_u`` is unknown and
    estimated in closed form (:class:`~ssl_kvasir.pseudo_labels.priors.EMClassPrior`), so nothing is assumed
    about the unlabeled mix:

    - E-step: the pseudo-label of an unlabeled image is the posterior ``softmax(f(x_w) + tau log pi_u)``, a soft
      target, kept when its largest probability passes the threshold.
    - M-step for the network: the labeled and the strong-view unlabeled losses are cross-entropies of
      ``f(x) + tau log pi``, ``pi`` the prior of the whole training set (labeled counts plus unlabeled
      posteriors), so ``f`` learns ``p(x | y)`` and predicts balanced classes with ``argmax f(x)``.
    - M-step for the priors: at each epoch's end, a running average (``ema_u``) of the epoch's mean posterior.

    The labeled loss is the base's :meth:`~BaseMethod.labeled_loss` with the training prior: SimPro's config
    sets ``loss: logit_adjusted``, and ``la_tau`` is SimPro's ``tau`` for all its adjustments. With
    ``scale_labeled_loss`` the labeled loss is divided by ``|U| / (mu |L|)``, as the reference code does: the
    EM objective sums over all images, and a step sees ``mu`` unlabeled images per labeled one.

    Departures from the reference code: the labeled loss on the weak view only (not weak and strong) and one
    strong view per unlabeled image (not two), the streams FixMatch uses, so that SimPro costs what FixMatch
    costs per step; the prior estimate is normalised (see :class:`EMClassPrior`).

    Args:
        prior: the unlabeled and training priors (estimated while training).
        num_unlabeled: size of the unlabeled pool, ``|U|``.
        threshold: confidence threshold of the pseudo-labels (0.95 on CIFAR-10, 0.2 on CIFAR-100).
        lambda_u: weight of the unlabeled loss (1.0).
        scale_labeled_loss: divide the labeled loss by ``|U| / (mu |L|)``.
        **base: arguments of :class:`BaseMethod`.
    """

    name = "simpro"
    labeled_views = ("weak",)
    unlabeled_views = ("weak", "strong")

    @classmethod
    def data_kwargs(cls, datamodule) -> dict:
        return {**super().data_kwargs(datamodule), "num_unlabeled": len(datamodule.streams["ulb"].rows)}

    @classmethod
    def strategies(cls, config: dict) -> dict:
        """``ema_u`` and the labeled class counts -> the EM prior estimate."""
        config = dict(config)
        counts = config.get("labeled_class_counts")
        if counts is None:
            raise ValueError("SimPro needs labeled_class_counts (the starting training prior)")
        prior = EMClassPrior(counts, momentum=config.pop("ema_u", 0.9))
        return {**config, "prior": prior}

    def __init__(
        self,
        prior: EMClassPrior,
        num_unlabeled: int,
        threshold: float = 0.95,
        lambda_u: float = 1.0,
        scale_labeled_loss: bool = True,
        **base,
    ):
        super().__init__(**base)
        self.prior = prior
        self.num_labeled = int(sum(self.hparams.labeled_class_counts))

    def training_step(self, batch: dict, batch_idx: int):
        hp = self.hparams
        x_lb, y_lb = batch["lb"]["weak"], batch["lb"]["label"]
        x_ulb_w, x_ulb_s = batch["ulb"]["weak"], batch["ulb"]["strong"]
        n_lb, n_ulb = len(x_lb), len(x_ulb_w)

        logits = self.model(torch.cat([x_lb, x_ulb_w, x_ulb_s]))  # (B + 2 mu B, C)
        logits_lb, logits_w, logits_s = logits.split([n_lb, n_ulb, n_ulb])
        with torch.no_grad():
            # E-step: the posterior under the unlabeled prior.
            probs = (logits_w.detach().float() + self.prior.unlabeled_adjustment(hp.la_tau)).softmax(
                1
            )  # (mu B, C)
            mask = (probs.max(1).values >= hp.threshold).float()  # (mu B,)
            self.prior.update(self.gather(probs), self.gather(mask), self.gather(y_lb))

        loss_x = self.labeled_loss(logits_lb, y_lb, prior=self.prior.train_prior)
        if hp.scale_labeled_loss:
            loss_x = loss_x * (n_ulb * self.num_labeled) / (n_lb * hp.num_unlabeled)
        loss_u = (
            logit_adjusted_cross_entropy(
                logits_s, probs, self.prior.train_prior, tau=hp.la_tau, reduction="none"
            )
            * mask
        ).mean()
        loss = loss_x + hp.lambda_u * loss_u
        self.log_dict(
            {
                "train/loss": loss,
                "train/loss_x": loss_x,
                "train/loss_u": loss_u,
                "train/mask_rate": mask.mean(),
            },
            prog_bar=True,
        )
        return loss

    def on_train_epoch_start(self) -> None:
        """The M-step for the priors over the last epoch (at the epoch start, so that a run resumed from an
        epoch-end checkpoint, whose running sums the checkpoint holds, does the same), then log ``pi_u``."""
        super().on_train_epoch_start()
        if self.current_epoch > 0:
            self.prior.end_epoch()
        self.log_dict({f"train/unlabeled_prior/{n}": p for n, p in self.unlabeled_prior.items()})

    def on_train_end(self) -> None:
        """Fold the last epoch in too, so the final estimate has seen every epoch."""
        self.prior.end_epoch()

    @property
    def unlabeled_prior(self) -> dict[str, float]:
        """The estimated class mix of the unlabeled images, class name -> share (sums to 1)."""
        return {
            n: float(p) for n, p in zip(self.hparams.class_names, self.prior.unlabeled_prior, strict=True)
        }
