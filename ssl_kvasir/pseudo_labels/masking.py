"""Which pseudo-labels to trust: masking strategies and distribution alignment.

Following USB's split of a semi-supervised step, FixMatch's masking rule is a strategy object, picked by name
from :data:`MASKINGS` (``method.masking``), and so is the distribution alignment (:data:`ALIGNMENTS`). Each
strategy is an ``nn.Module`` so that its state (class statistics) lives in the checkpoint and a resumed run
continues exactly where it stopped.

HyperKvasir is heavily imbalanced (6 to 1,148 images a class), and published FixMatch results on it lost
macro-F1 on the rare classes: a fixed 0.95 threshold lets the common classes' confident predictions through
and starves the rare ones. Class-adaptive thresholds and distribution alignment are the two standard fixes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ssl_kvasir import names


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Masking(nn.Module):
    """A masking strategy: (B,) weights in [0, 1] of the pseudo-labels of a step, from their (B, C) probabilities.

    ``forward`` weighs a step's pseudo-labels with the current state; ``update`` records the step's predictions
    (of every process, under DDP) in the state; :meth:`step` does both in the strategy's order.
    """

    def forward(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> torch.Tensor:
        """The (B,) weights of (B, C) probabilities of the unlabeled images at pool positions ``idx_ulb``."""
        raise NotImplementedError

    def update(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> None:
        """Record a step's predictions. A strategy without state records nothing."""

    def step(
        self,
        probs: torch.Tensor,
        idx_ulb: torch.Tensor,
        gather: Callable[[torch.Tensor], torch.Tensor] = _identity,
    ) -> torch.Tensor:
        """The step's (B,) weights, then the step recorded (``gather`` collects a tensor of every process).

        FixMatch and FlexMatch weigh with the state before the step, as USB's hooks do.
        """
        mask = self(probs, idx_ulb)  # (B,)
        self.update(gather(probs), gather(idx_ulb))
        return mask


class FixedThreshold(Masking):
    """FixMatch: keep a pseudo-label when its confidence ``max_c p_c >= threshold`` (0.95 in the paper)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> torch.Tensor:
        """Return the (B,) float mask for (B, C) probabilities of unlabeled images ``idx_ulb``."""
        return (probs.max(dim=1).values >= self.threshold).float()


class ClassAdaptiveThreshold(Masking):
    """FlexMatch's curriculum pseudo-labelling (Zhang et al. 2021).

    "the learning effect of class c is reflected by the number of samples whose predictions fall into class c
    and above the threshold": ``sigma_c = #{n : argmax p_n = c, max p_n > tau}`` over the latest prediction of
    every unlabeled image. The class threshold is ``T_c = M(beta_c) * tau`` with
    ``beta_c = sigma_c / max(max_c' sigma_c', N - sum_c sigma_c)`` (threshold warm-up) and the convex mapping
    ``M(x) = x / (2 - x)``. Classes the model has not learned yet get low thresholds, so rare classes receive
    pseudo-labels early instead of never.

    Args:
        num_unlabeled: size of the unlabeled pool (images are identified by their position ``idx_ulb``).
        num_classes: number of classes.
        threshold: the upper threshold tau.
    """

    selected: torch.Tensor

    def __init__(self, num_unlabeled: int, num_classes: int, threshold: float):
        super().__init__()
        self.threshold, self.num_classes = threshold, num_classes
        # Latest confident prediction per unlabeled image, -1 = none yet.
        self.register_buffer("selected", torch.full((num_unlabeled,), -1, dtype=torch.long))

    def class_thresholds(self) -> torch.Tensor:
        """The (C,) current thresholds."""
        valid = self.selected[self.selected >= 0]
        sigma = torch.bincount(valid, minlength=self.num_classes).float()  # (C,)
        unused = (self.selected < 0).sum().float()
        beta = sigma / torch.clamp(torch.maximum(sigma.max(), unused), min=1.0)  # (C,)
        return beta / (2.0 - beta) * self.threshold

    def forward(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> torch.Tensor:
        conf, pred = probs.max(dim=1)  # (B,), (B,)
        return (conf >= self.class_thresholds()[pred]).float()  # (B,)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> None:
        conf, pred = probs.max(dim=1)  # (B,), (B,)
        confident = conf > self.threshold
        self.selected[idx_ulb[confident]] = pred[confident]


class SelfAdaptiveThreshold(Masking):
    """FreeMatch's self-adaptive thresholding (Wang et al., ICLR 2023).

    "the global threshold ... is defined and adjusted as the exponential moving average (EMA) of the confidence
    from each training time step": ``tau_t = m tau_{t-1} + (1 - m) mean_b max(q_b)``, from ``tau_0 = 1/C``. "the
    local class-specific thresholds ... as the EMA of the probability for each class", ``p~_t(c) = m p~_{t-1}(c)
    + (1 - m) mean_b q_b(c)``, and the class threshold is ``tau_t(c) = MaxNorm(p~_t)(c) * tau_t``. A pseudo-label
    counts when ``max(q_b) >= tau_t(argmax q_b)``. The EMA of the histogram of the predicted classes, ``h~_t``,
    is kept for the fairness loss (:func:`ssl_kvasir.losses.fairness_loss`).

    As in USB's ``FreeMatchThresholingHook``, a step updates the statistics first and then masks with them, and
    all three start uniform (``1/C``).

    Args:
        num_classes: C.
        momentum: m of the three running averages (USB's ``ema_p``, 0.999).
    """

    global_threshold: torch.Tensor
    class_probs: torch.Tensor
    label_hist: torch.Tensor

    def __init__(self, num_classes: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        uniform = torch.full((num_classes,), 1.0 / num_classes)
        self.register_buffer("global_threshold", torch.tensor(1.0 / num_classes))  # tau_t
        self.register_buffer("class_probs", uniform.clone())  # p~_t, (C,)
        self.register_buffer("label_hist", uniform.clone())  # h~_t, (C,)

    def class_thresholds(self) -> torch.Tensor:
        """The (C,) current thresholds ``MaxNorm(p~_t) * tau_t``."""
        return self.class_probs / self.class_probs.max() * self.global_threshold

    def forward(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> torch.Tensor:
        conf, pred = probs.max(dim=1)  # (B,), (B,)
        return (conf >= self.class_thresholds()[pred]).to(probs.dtype)  # (B,)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> None:
        m = self.momentum
        conf, pred = probs.float().max(dim=1)  # (N,), (N,)
        self.global_threshold.mul_(m).add_(conf.mean(), alpha=1 - m)
        self.class_probs.mul_(m).add_(probs.float().mean(0), alpha=1 - m)
        hist = torch.bincount(pred, minlength=len(self.label_hist)).float()  # (C,)
        self.label_hist.mul_(m).add_(hist / hist.sum(), alpha=1 - m)

    def step(self, probs, idx_ulb, gather=_identity) -> torch.Tensor:
        """Update with the step's predictions, then mask (USB's order)."""
        self.update(gather(probs), gather(idx_ulb))
        return self(probs, idx_ulb)


class TruncatedGaussianWeights(Masking):
    """SoftMatch's sample weights (Chen et al., ICLR 2023): a Gaussian of the confidence, truncated at its mean.

    "lambda(p) = exp(-(max(p) - mu_t)^2 / (2 sigma_t^2)) if max(p) < mu_t, else lambda_max": confident
    pseudo-labels get weight 1 and less confident ones a weight that falls smoothly with the distance below the
    mean, instead of 0 under a hard threshold. ``mu_t`` and ``sigma_t^2`` are EMAs of the batch mean and
    (unbiased) variance of the confidence, from ``mu_0 = 1/C`` and ``sigma_0^2 = 1``; ``n_sigma`` scales the
    width: ``exp(-min(max(p) - mu, 0)^2 / (2 sigma^2 / n_sigma^2))`` (USB's ``SoftMatchWeightingHook``, its
    global form).

    As in USB, a step updates the statistics first and then weighs with them. Departure: a step whose gathered
    batch has a single image leaves the variance as it is (its unbiased variance is undefined; USB's becomes NaN).

    Args:
        num_classes: C.
        momentum: m of the running mean and variance (USB's ``ema_p``, 0.999).
        n_sigma: width of the Gaussian in standard deviations (2).
    """

    conf_mean: torch.Tensor
    conf_var: torch.Tensor

    def __init__(self, num_classes: int, momentum: float, n_sigma: float):
        super().__init__()
        self.momentum, self.n_sigma = momentum, n_sigma
        self.register_buffer("conf_mean", torch.tensor(1.0 / num_classes))  # mu_t
        self.register_buffer("conf_var", torch.tensor(1.0))  # sigma_t^2

    def forward(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> torch.Tensor:
        conf = probs.max(dim=1).values  # (B,)
        below = torch.clamp(conf - self.conf_mean, max=0.0)  # (B,) 0 above the mean
        return torch.exp(-(below**2) / (2 * self.conf_var / self.n_sigma**2))  # (B,)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> None:
        m = self.momentum
        conf = probs.float().max(dim=1).values  # (N,)
        self.conf_mean.mul_(m).add_(conf.mean(), alpha=1 - m)
        if len(conf) > 1:
            self.conf_var.mul_(m).add_(conf.var(unbiased=True), alpha=1 - m)

    def step(self, probs, idx_ulb, gather=_identity) -> torch.Tensor:
        """Update with the step's predictions, then weigh (USB's order)."""
        self.update(gather(probs), gather(idx_ulb))
        return self(probs, idx_ulb)


class DistributionAlignment(nn.Module):
    """ReMixMatch's distribution alignment (Berthelot et al. 2020).

    "we maintain a running average of the model's predictions on unlabeled data, p~(y) ... Given the model's
    prediction q on an unlabeled example u, we scale q by the ratio p(y) / p~(y) and then renormalize".
    With ``target="labeled"`` p(y) is the class distribution of the labeled set; ``uniform`` pushes the
    pseudo-labels towards balanced classes.

    The running average starts from the first batch's mean prediction, as USB's ``DistAlignEMAHook`` does
    (its ``p_model`` is None until the first update), not from the uniform distribution: started uniform,
    p~(y) would take thousands of steps (momentum 0.999) to reach the model's actual predictions, and until
    then the ratio multiplies a rare class's probabilities by about ``C * p(y)`` (x0.014 for a class of 6 of
    10,662 images in 23 classes), suppressing exactly the classes alignment exists to protect.

    Args:
        target: the (C,) target distribution p(y) (counts or probabilities).
        momentum: of the running average p~(y).
    """

    target: torch.Tensor
    model_dist: torch.Tensor
    n_updates: torch.Tensor

    def __init__(self, target: torch.Tensor, momentum: float):
        super().__init__()
        self.momentum = momentum
        target = target.float() / target.float().sum()
        self.register_buffer("target", target)  # (C,)
        # p~(y); equal to the target (a ratio of 1) until the first update replaces it.
        self.register_buffer("model_dist", target.clone())  # (C,)
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    def factor(self) -> torch.Tensor:
        """The (C,) ratio ``p(y) / p~(y)`` that scales the predictions."""
        # The floor only guards a class whose softmax underflowed to 0 in every prediction so far.
        return self.target / self.model_dist.clamp_min(1e-8)  # (C,)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        aligned = probs * self.factor()  # (B, C)
        return aligned / aligned.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """Fold a step's (B, C) predictions (of every process, under DDP) into the running average; the first
        step's mean starts it."""
        mean = probs.float().mean(0)  # (C,)
        if self.n_updates == 0:
            self.model_dist.copy_(mean)
        else:
            self.model_dist.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
        self.n_updates += 1


@dataclass(frozen=True)
class Knobs:
    """What the strategies are built from: the method's settings and facts about the data.

    Attributes:
        threshold: the confidence threshold (``fixed``, ``flexmatch``).
        ema_p: momentum of the running statistics (``freematch``, ``softmatch``, the alignments).
        n_sigma: width of SoftMatch's Gaussian.
        num_unlabeled: size of the unlabeled pool (``flexmatch``).
        num_classes: C.
        labeled_class_counts: (C,) labeled images per class (``labeled`` alignment), or None.
    """

    threshold: float
    ema_p: float
    n_sigma: float
    num_unlabeled: int
    num_classes: int
    labeled_class_counts: Sequence[int] | None


def _labeled_alignment(k: Knobs) -> DistributionAlignment:
    if k.labeled_class_counts is None:
        raise ValueError("alignment=labeled needs the labeled class counts")
    return DistributionAlignment(torch.tensor(k.labeled_class_counts, dtype=torch.float), k.ema_p)


MASKINGS: dict[str, Callable[[Knobs], Masking]] = {
    "fixed": lambda k: FixedThreshold(k.threshold),
    "flexmatch": lambda k: ClassAdaptiveThreshold(k.num_unlabeled, k.num_classes, k.threshold),
    "freematch": lambda k: SelfAdaptiveThreshold(k.num_classes, k.ema_p),
    "softmatch": lambda k: TruncatedGaussianWeights(k.num_classes, k.ema_p, k.n_sigma),
}
"""``method.masking`` -> its strategy, keyed by :data:`ssl_kvasir.names.MASKINGS`."""

ALIGNMENTS: dict[str, Callable[[Knobs], DistributionAlignment]] = {
    "labeled": _labeled_alignment,
    "uniform": lambda k: DistributionAlignment(torch.ones(k.num_classes), k.ema_p),
}
"""``method.alignment`` -> its strategy (null: none), keyed by :data:`ssl_kvasir.names.ALIGNMENTS`."""


def build_masking(kind: str, knobs: Knobs) -> Masking:
    """The masking strategy named ``kind``."""
    if kind not in MASKINGS:
        raise ValueError(f"unknown masking {kind!r}; valid: {', '.join(names.MASKINGS)}")
    return MASKINGS[kind](knobs)


def build_alignment(kind: str | None, knobs: Knobs) -> DistributionAlignment | None:
    """The distribution alignment named ``kind``, or None for ``kind=None``."""
    if kind is None:
        return None
    if kind not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {kind!r}; valid: {', '.join(map(str, names.ALIGNMENTS))}")
    return ALIGNMENTS[kind](knobs)
