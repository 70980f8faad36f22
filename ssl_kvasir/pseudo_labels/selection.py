"""Which pseudo-labels to keep: the one selection rule, used by self-training's rounds and by the export."""

from __future__ import annotations

import numpy as np

from ssl_kvasir.errors import ConfigError
from ssl_kvasir.names import BALANCES


def select_pseudo_labels(
    confidence: np.ndarray,
    predicted: np.ndarray,
    num_classes: int,
    *,
    min_confidence: float = 0.0,
    balance: str = "none",
    max_per_class: int | None = None,
    agrees: np.ndarray | None = None,
) -> np.ndarray:
    """Positions of the pseudo-labels worth training on.

    Args:
        confidence: (N,) the model's top probability per image.
        predicted: (N,) its predicted class per image.
        num_classes: C.
        min_confidence: keep images with ``confidence >= min_confidence``.
        balance: ``none``; ``cap``: at most ``max_per_class`` most confident images per class (ties: the
            earlier image), so the common classes do not swamp the rare ones; ``duplicate``: like cap, and
            classes with fewer images are repeated up to it (Noisy Student: "we duplicate images in classes
            where there are not enough images").
        max_per_class: the per-class budget of ``cap`` and ``duplicate``; None = the median count over the
            classes that have any kept image.
        agrees: (N,) bool; when given, keep only images where it is True (the kNN vote agrees).

    Returns:
        (M,) ascending positions, repeated under ``duplicate``.

    Raises:
        ConfigError: for an unknown balance or a negative budget.
    """
    if balance not in BALANCES:
        raise ConfigError(f"unknown balance {balance!r}; valid: {', '.join(BALANCES)}")
    if max_per_class is not None and max_per_class < 0:
        raise ConfigError(f"the per-class budget must be >= 0, got {max_per_class}")
    confidence, predicted = np.asarray(confidence), np.asarray(predicted)
    keep = confidence >= min_confidence
    if agrees is not None:
        keep &= np.asarray(agrees, dtype=bool)
    kept = np.flatnonzero(keep)  # (K,)
    if balance == "none":
        return kept.astype(np.int64)
    if max_per_class is None:
        counts = np.bincount(predicted[kept], minlength=num_classes)  # (C,)
        present = counts[counts > 0]
        max_per_class = int(np.median(present)) if len(present) else 0
    chosen = []
    for c in range(num_classes):
        members = kept[predicted[kept] == c]
        members = members[np.argsort(-confidence[members], kind="stable")][:max_per_class]  # most confident
        if balance == "duplicate" and 0 < len(members) < max_per_class:
            members = np.resize(members, max_per_class)
        chosen.append(members)
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.empty(0, np.int64)
