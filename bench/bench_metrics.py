"""All nine paper metrics for one evaluation fold: scikit-learn's functions vs ssl_kvasir.metrics.

Baseline: accuracy_score + precision_recall_fscore_support (macro, micro) + balanced_accuracy_score +
matthews_corrcoef, each recounting the predictions. Ours: one bincount into a confusion matrix, then
arithmetic on the (C, C) matrix. Both run in this process on the same predictions; only the ratio matters.
Target: at least 100x scikit-learn's speed at both sizes (145-216x was measured when the metrics landed).
"""

from __future__ import annotations

import warnings

import numpy as np
from harness import best_of, closing_line, parser


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
    """Calls per second, best of three rounds of ``repeats`` calls."""
    seconds, _ = best_of(lambda: [fn() for _ in range(repeats)], 3)
    return repeats / seconds


def main() -> None:
    from ssl_kvasir.metrics import classification_metrics

    args = parser(__doc__, quick="fewer repeats").parse_args()
    repeats = 5 if args.quick else 20
    rng = np.random.default_rng(0)
    warnings.simplefilter("ignore")  # sklearn's warnings about absent classes are not what is measured
    speeds = []
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
        speeds.append(our_rate / sk_rate)
    closing_line("metrics", "speed-up over scikit-learn (worst size)", min(speeds), ">=", 100.0, digits=0)


if __name__ == "__main__":
    main()
