"""All nine paper metrics for one evaluation fold: scikit-learn's functions vs ssl_kvasir.metrics.

Baseline: accuracy_score + precision_recall_fscore_support (macro, micro) + balanced_accuracy_score +
matthews_corrcoef, each recounting the predictions. Ours: one bincount into a confusion matrix, then
arithmetic on the (C, C) matrix. Both run in this process on the same predictions; only the ratio matters.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def _sklearn_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    from sklearn import metrics as skm

    labels = list(range(num_classes))
    out = {"accuracy": skm.accuracy_score(y_true, y_pred)}
    for average in ("macro", "micro"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        out |= {f"{average}_precision": p, f"{average}_recall": r, f"{average}_f1": f}
    out["balanced_accuracy"] = skm.balanced_accuracy_score(y_true, y_pred)
    out["mcc"] = skm.matthews_corrcoef(y_true, y_pred)
    return out


def _rate(fn, repeats: int) -> float:
    """Calls per second, best of three rounds."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, time.perf_counter() - start)
    return repeats / best


def main() -> None:
    from ssl_kvasir.metrics import classification_metrics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    rng = np.random.default_rng(0)
    warnings.simplefilter("ignore")  # sklearn's warnings about absent classes are not what is measured
    for n in (5_338, 50_000):  # one HyperKvasir evaluation fold; a large pseudo-label pass
        y_true = rng.integers(0, 23, n)
        y_pred = np.where(rng.random(n) < 0.9, y_true, rng.integers(0, 23, n))
        ours, theirs = classification_metrics(y_true, y_pred, 23), _sklearn_metrics(y_true, y_pred, 23)
        worst = max(abs(ours[k] - theirs[k]) for k in ours)
        sk_rate = _rate(lambda t=y_true, p=y_pred: _sklearn_metrics(t, p, 23), repeats)
        our_rate = _rate(lambda t=y_true, p=y_pred: classification_metrics(t, p, 23), repeats)
        print(
            f"metrics N={n:>6} C=23: sklearn {sk_rate:8.1f} calls/s | ssl_kvasir {our_rate:8.1f} calls/s | "
            f"ratio {our_rate / sk_rate:5.1f}x | max |difference| {worst:.1e}"
        )


if __name__ == "__main__":
    main()
