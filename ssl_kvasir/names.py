"""One spelling for each idea that appears in folders, W&B groups, results files, tables and plots."""

from __future__ import annotations

from ssl_kvasir.errors import ConfigError

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


def budget_id(label_fraction: float | None, labels_per_class: int | None) -> str:
    """The label budget: ``frac0.1`` (a share of each class's labeled images) or ``lpc25`` (25 a class)."""
    if (label_fraction is None) == (labels_per_class is None):
        raise ConfigError(
            "set exactly one of data.label_fraction and data.labels_per_class, got "
            f"{label_fraction} and {labels_per_class}"
        )
    return f"frac{label_fraction:g}" if labels_per_class is None else f"lpc{labels_per_class}"


def backbone_id(name: str, head: str) -> str:
    """The backbone: the timm name(s), plus the head when it is an MLP over an ensemble."""
    return name if head in ("linear", "averaged") else f"{name}+{head}"
