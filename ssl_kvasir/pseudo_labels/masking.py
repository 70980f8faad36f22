"""Which pseudo-labels to trust: masking strategies and distribution alignment.

Following USB's split of a semi-supervised step, FixMatch's masking rule is a strategy object. Each strategy
is an ``nn.Module`` so that its state (class statistics) lives in the checkpoint and a resumed run continues
exactly where it stopped.

HyperKvasir is heavily imbalanced (6 to 1,148 images a class), and published FixMatch results on it lost
macro-F1 on the rare classes: a fixed 0.95 threshold lets the common classes' confident predictions through
and starves the rare ones. Class-adaptive thresholds and distribution alignment are the two standard fixes.
"""

from __future__ import annotations

import torch
from torch import nn


class FixedThreshold(nn.Module):
    """FixMatch: keep a pseudo-label when its confidence ``max_c p_c >= threshold`` (0.95 in the paper)."""

    def __init__(self, threshold: float = 0.95):
        super().__init__()
        self.threshold = threshold

    def forward(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> torch.Tensor:
        """Return the (B,) float mask for (B, C) probabilities of unlabeled images ``idx_ulb``."""
        return (probs.max(dim=1).values >= self.threshold).float()

    def update(self, probs: torch.Tensor, idx_ulb: torch.Tensor) -> None:
        """Record a step's predictions (of every process, under DDP). A fixed threshold keeps no state."""


class ClassAdaptiveThreshold(nn.Module):
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

    def __init__(self, num_unlabeled: int, num_classes: int, threshold: float = 0.95):
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

    def __init__(self, target: torch.Tensor, momentum: float = 0.999):
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


MASKINGS = ("fixed", "flexmatch")
ALIGNMENTS = ("labeled", "uniform")


def build_alignment(
    kind: str | None, labeled_class_counts: list[int] | None, num_classes: int
) -> DistributionAlignment | None:
    """Distribution alignment towards the labeled class distribution (``labeled``), towards balanced classes
    (``uniform``), or none (None)."""
    if kind is None:
        return None
    if kind == "labeled":
        if labeled_class_counts is None:
            raise ValueError("alignment=labeled needs the labeled class counts")
        return DistributionAlignment(torch.tensor(labeled_class_counts, dtype=torch.float))
    if kind == "uniform":
        return DistributionAlignment(torch.ones(num_classes))
    raise ValueError(f"unknown alignment {kind!r}; valid: {', '.join(ALIGNMENTS)} or null")


def build_masking(kind: str, threshold: float, num_unlabeled: int, num_classes: int) -> nn.Module:
    """The masking strategy named ``kind`` (``fixed`` or ``flexmatch``)."""
    if kind == "fixed":
        return FixedThreshold(threshold)
    if kind == "flexmatch":
        return ClassAdaptiveThreshold(num_unlabeled, num_classes, threshold)
    raise ValueError(f"unknown masking {kind!r}; valid: {', '.join(MASKINGS)}")
