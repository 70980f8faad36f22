"""SimPro (Du et al., ICML 2024): semi-supervised learning as EM with an estimated unlabeled class prior."""

from __future__ import annotations

import torch

from ssl_kvasir.losses import logit_adjusted_cross_entropy
from ssl_kvasir.methods.base import PriorEstimator
from ssl_kvasir.methods.semi_supervised import SemiSupervised
from ssl_kvasir.pseudo_labels.priors import EMClassPrior


class SimPro(SemiSupervised):
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
    - M-step for the priors: at each epoch's end, a running average (``ema_u``) of the epoch's mean posterior
      (the base's prior seam folds it in at the next epoch's start, :meth:`BaseMethod.on_train_epoch_start`).

    The labeled loss is the base's :meth:`~BaseMethod.labeled_loss` with the training prior: SimPro's config
    sets ``loss: logit_adjusted``, and ``la_tau`` is SimPro's ``tau`` for all its adjustments. With
    ``scale_labeled_loss`` the labeled loss is divided by ``|U| / (mu |L|)``, as the reference code does: the
    EM objective sums over all images, and a step sees ``mu`` unlabeled images per labeled one.

    At HyperKvasir's ratios (30 to 300 unlabeled images per labeled one) that scale leaves the labeled loss 1/30
    to 1/282 of its weight, and the reference's M-step over the confident posteriors from the first epoch on
    collapses the prior estimate; so the defaults (``configs/method/simpro.yaml``) train with the full labeled
    loss, average every posterior and wait ``em_warmup_steps`` before the first M-step, and the reference form
    is ``scale_labeled_loss=true em_posteriors=confident em_warmup_steps=0`` (README, "Rare classes").

    Departures from the reference code: the labeled loss on the weak view only (not weak and strong) and one
    strong view per unlabeled image (not two), the streams FixMatch uses, so that SimPro costs what FixMatch
    costs per step; the prior estimate is normalised (see :class:`EMClassPrior`).

    Args:
        prior: the unlabeled and training priors (estimated while training).
        threshold: confidence threshold of the pseudo-labels (0.95 on CIFAR-10, 0.2 on CIFAR-100).
        lambda_u: weight of the unlabeled loss (1.0).
        scale_labeled_loss: divide the labeled loss by ``|U| / (mu |L|)``.
        **base: arguments of :class:`~ssl_kvasir.methods.semi_supervised.SemiSupervised` (its
            ``num_unlabeled`` is ``|U|``).
    """

    name = "simpro"

    @classmethod
    def strategies(cls, config: dict) -> dict:
        """``ema_u``, ``em_posteriors``, ``em_warmup_steps`` and the labeled stream's class counts -> the EM prior
        estimate."""
        config = dict(config)
        counts = config.get("labeled_class_counts")
        if counts is None:
            raise ValueError("SimPro needs labeled_class_counts (the starting training prior)")
        prior = EMClassPrior(
            counts,
            momentum=config.pop("ema_u"),
            posteriors=config.pop("em_posteriors"),
            warmup_steps=config.pop("em_warmup_steps"),
        )
        return {**config, "prior": prior}

    def __init__(
        self,
        prior: EMClassPrior,
        threshold: float,
        lambda_u: float,
        scale_labeled_loss: bool,
        **base,
    ):
        super().__init__(**base)
        self.prior = prior
        self.num_labeled = round(sum(self.hparams.labeled_class_counts))  # |L|

    def step_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        y_lb = batch["lb"]["label"]
        out = self.forward_streams(batch, ("x_lb", "x_ulb_w", "x_ulb_s"))
        logits_lb, logits_w, logits_s = out.logits["x_lb"], out.logits["x_ulb_w"], out.logits["x_ulb_s"]
        n_lb, n_ulb = len(logits_lb), len(logits_w)
        with torch.no_grad():
            # E-step: the posterior under the unlabeled prior.
            probs = (logits_w.detach().float() + self.prior.unlabeled_adjustment(hp.la_tau)).softmax(
                1
            )  # (mu B, C)
            mask = (probs.max(1).values >= hp.threshold).float()  # (mu B,)
            self.prior.update(self.gather(probs), self.gather(mask), self.gather(y_lb))

        loss_x = self.labeled_loss(logits_lb, y_lb, prior=self.prior.train_prior)
        if hp.scale_labeled_loss:
            loss_x = loss_x * (n_ulb * self.num_labeled) / (n_lb * self.num_unlabeled)
        loss_u = (
            logit_adjusted_cross_entropy(
                logits_s, probs, self.prior.train_prior, tau=hp.la_tau, reduction="none"
            )
            * mask
        ).mean()
        loss = loss_x + hp.lambda_u * loss_u
        return {
            "loss": loss,
            "loss_x": loss_x,
            "loss_u": loss_u,
            "mask_rate": mask.mean(),
            "pl_acc": self.record_pseudo_labels(probs.argmax(1), mask, batch["ulb"]["label"]),
        }

    def prior_estimator(self) -> PriorEstimator:
        """The EM estimate of the unlabeled prior (and of the training prior)."""
        return self.prior
