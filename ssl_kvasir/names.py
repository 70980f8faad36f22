"""One spelling for each idea that appears in folders, W&B groups, results files, tables and plots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from ssl_kvasir.errors import ConfigError

FRACTION, PER_CLASS = "fraction", "per_class"
"""The two kinds of :class:`LabelBudget`."""

METRIC_LABELS = {
    "mcc": "MCC",
    "macro_f1": "macro-F1",
    "micro_f1": "micro-F1",
    "macro_precision": "macro precision",
    "macro_recall": "macro recall",
    "micro_precision": "micro precision",
    "micro_recall": "micro recall",
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
}
"""How a metric of ``ssl_kvasir.metrics`` is written for people (tables, plots, logs)."""


@dataclass(frozen=True)
class LabelBudget:
    """How many labels a run may use: a share of each class's labeled training images (``kind="fraction"``,
    ``frac0.1``) or a number of labeled images per class (``kind="per_class"``, ``lpc25``).

    It is made once, from ``data.label_fraction`` and ``data.labels_per_class``, when the config is checked
    (:meth:`from_settings`); the split carries it (``ExperimentSplit.budget``) and a results record stores it
    as :meth:`record`. The number of labeled images a run ends up with is not the budget: it is
    ``n_labels_used`` in a results record.

    Attributes:
        kind: ``fraction`` or ``per_class``.
        amount: the share, in (0, 1], or the count per class, at least 1.
    """

    kind: str
    amount: float | int

    def __post_init__(self) -> None:
        if self.kind == FRACTION:
            ok = _is_number(self.amount) and 0 < self.amount <= 1
            want = "a share in (0, 1]"
        elif self.kind == PER_CLASS:
            ok = isinstance(self.amount, int) and not isinstance(self.amount, bool) and self.amount >= 1
            want = "a whole number of images per class, at least 1"
        else:
            raise ConfigError(f"a label budget is {FRACTION} or {PER_CLASS}, got {self.kind!r}")
        if not ok:
            raise ConfigError(f"a label budget of kind {self.kind} must be {want}, got {self.amount!r}")

    @classmethod
    def from_settings(cls, label_fraction: float | None, labels_per_class: int | None) -> LabelBudget:
        """The budget that ``data.label_fraction`` and ``data.labels_per_class`` name (exactly one of them set).

        Raises:
            ConfigError: naming both keys when neither or both are set, or the key whose value is out of range.
        """
        if (label_fraction is None) == (labels_per_class is None):
            raise ConfigError(
                "set exactly one of data.label_fraction and data.labels_per_class (the other to null), got "
                f"{label_fraction} and {labels_per_class}"
            )
        try:
            if label_fraction is not None:
                return cls(FRACTION, label_fraction)
            return cls(
                PER_CLASS, cast(int, labels_per_class)
            )  # set: exactly one of the two is, checked above
        except ConfigError:
            key, value = (
                ("data.label_fraction", label_fraction)
                if labels_per_class is None
                else ("data.labels_per_class", labels_per_class)
            )
            want = "in (0, 1]" if labels_per_class is None else "an integer >= 1"
            raise ConfigError(f"{key} must be {want}, got {value!r}") from None

    @classmethod
    def from_record(cls, record: object) -> LabelBudget:
        """The budget a record stores (:meth:`record`).

        Raises:
            ConfigError: when ``record`` is not a budget's record.
        """
        if not isinstance(record, Mapping) or not {"kind", "amount"} <= set(record):
            raise ConfigError(f"a label budget is recorded as {{'kind', 'amount', 'id'}}, got {record!r}")
        budget = cls(record["kind"], record["amount"])
        if "id" in record and record["id"] != budget.id:
            raise ConfigError(f"label budget {dict(record)!r}: its id should be {budget.id!r}")
        return budget

    @property
    def id(self) -> str:
        """``frac0.1`` or ``lpc25``: the budget in folder names, W&B groups and table rows."""
        return f"frac{self.amount:g}" if self.kind == FRACTION else f"lpc{self.amount}"

    @property
    def label_fraction(self) -> float | None:
        """The share of each class's images (``None`` for a per-class budget)."""
        return float(self.amount) if self.kind == FRACTION else None

    @property
    def labels_per_class(self) -> int | None:
        """The images per class (``None`` for a fraction)."""
        return int(self.amount) if self.kind == PER_CLASS else None

    @property
    def is_every_label(self) -> bool:
        """Whether the budget is every labeled training image (fraction 1)."""
        return self.kind == FRACTION and self.amount == 1

    def record(self) -> dict:
        """``{"kind", "amount", "id"}``, as results records and checkpoints store it."""
        amount = float(self.amount) if self.kind == FRACTION else int(self.amount)
        return {"kind": self.kind, "amount": amount, "id": self.id}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


EVERY_LABEL = LabelBudget(FRACTION, 1.0)
"""Every labeled training image."""


def backbone_id(name: str, head: str) -> str:
    """The backbone: the timm name(s), plus the head when it is an MLP over an ensemble."""
    return name if head in ("linear", "averaged") else f"{name}+{head}"


# ---- Enumerated choices of the methods ---------------------------------------------------------------------
# The allowed values of the method settings, spelt once: ``config.RULES`` checks a config against them before
# torch is imported, and the code that acts on a value imports the same tuple (the registries are keyed by it;
# tests/test_config.py ties each registry to its tuple).
OPTIMIZERS = ("sgd", "adamw")
"""``method.optimizer``: SGD with (Nesterov) momentum, or AdamW."""
SCHEDULES = ("cosine", "constant")
"""``method.schedule``: FixMatch's cosine decay, or a constant rate (each after an optional warm-up)."""
EVAL_WEIGHTS = ("ema", "model")
"""``method.eval_weights``: the averaged or the live weights predict."""
LABELED_LOSSES = ("ce", "logit_adjusted")
"""``method.loss``: cross-entropy, or Menon et al.'s logit-adjusted cross-entropy."""
TEACHERS = ("model", "ema")
"""``method.teacher``: which weights label the weak view (FixMatch and its variants)."""
MASKINGS = ("fixed", "flexmatch", "freematch", "softmatch")
"""``method.masking``: which pseudo-labels count and how much (``ssl_kvasir.pseudo_labels.masking.MASKINGS``)."""
ALIGNMENTS = (None, "labeled", "uniform")
"""``method.alignment``: distribution alignment of the weak predictions, or none (null)."""
MIX_ESTIMATES = ("reference", "histogram")
"""``method.mix_estimate`` (ACR): a step's confident predictions count each class at most once (the official
code) or each one (a histogram)."""
EM_POSTERIORS = ("all", "confident")
"""``method.em_posteriors`` (SimPro): the M-step averages every unlabeled posterior, or only the confident ones
(the reference code)."""
SELECTION_RULES = ("later", "earlier", "final")
"""``trainer.selection``: the best validation score with a tie going to the later or the earlier checkpoint, or
the final weights (``ssl_kvasir.run.model_selection``)."""


# ---- Enumerated choices of the data and the models ---------------------------------------------------------
HEADS = ("linear", "averaged", "mlp")
"""``backbone.head``: one linear classifier, the average of one per ensemble part, or an MLP over them."""
VAL_POLICIES = ("budget", "none", "fold")
"""``data.val_policy``: validation images from the label budget, none, or from the training folds."""
STRONG_POLICIES = ("fixmatch", "timm")
"""``data.strong_policy``: FixMatch's RandAugment (a random magnitude per op, then Cutout) or timm's."""
SAMPLERS = ("uniform", "class_balanced")
"""``data.sampler``: of the labeled stream."""
BALANCES = ("none", "cap", "duplicate")
"""``method.pseudo.balance``: self-training's per-class balance of the selected pseudo-labels."""
