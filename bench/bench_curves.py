"""`ssl-kvasir curves` over 1,000 generated results files: a naive reader vs ssl_kvasir.study.curves.

Baseline: walk the folder, ``json.load`` each results file and append it to a DataFrame with ``pandas.concat``
one row at a time, then group by method, backbone and label fraction. Ours: ``load_runs`` (one checked record
per file, one DataFrame at the end) + ``summarize``; and the whole ``write_curves`` (CSV, Markdown, PNG), whose
plot is a fixed cost. Target: reading + summary at least 2x the naive reader. The files look like real ones (23 classes, confusion matrix, per-class report, resolved
config, about 15 kB each) and are read from the page cache in both cases; only the ratio matters.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from harness import best_of, closing_line, parser

from ssl_kvasir.names import LabelBudget
from ssl_kvasir.run.folder import RESULTS_FORMAT, RunFolder

METHODS = ("supervised", "fixmatch", "self_training", "flexmatch")
FRACTIONS = (0.01, 0.05, 0.1, 0.25, 1.0)
FOLDS = (0, 1)


def make_results(root: Path, n_files: int, seed: int = 0) -> list[Path]:
    """``n_files`` results files in the sweep layout, with random metrics."""
    from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
    from ssl_kvasir.metrics import METRIC_KEYS

    rng = np.random.default_rng(seed)
    classes = [c.folder for c in HYPERKVASIR_CLASSES]
    per_point = len(METHODS) * len(FRACTIONS) * len(FOLDS)
    paths = []
    for i in range(n_files):
        method = METHODS[i % len(METHODS)]
        fraction = FRACTIONS[(i // len(METHODS)) % len(FRACTIONS)]
        fold = FOLDS[(i // (len(METHODS) * len(FRACTIONS))) % len(FOLDS)]
        run_seed = i // per_point
        cm = rng.integers(0, 30, (23, 23)) + np.diag(rng.integers(50, 400, 23))  # (C, C)
        metrics = {k: float(rng.uniform(0.3, 0.95)) for k in METRIC_KEYS}
        results = {
            "format": RESULTS_FORMAT,
            "method": method,
            "backbone": "resnet18",
            "system": None,
            "fold": fold,
            "seed": run_seed,
            "data_seed": run_seed,
            "label_budget": LabelBudget("fraction", fraction).record(),
            "n_labeled": 532,
            "n_unlabeled": 99417,
            "n_val": 530,
            "n_test": int(cm.sum()),
            "steps": 10000,
            "code_version": "0.1.0",
            "classes": classes,
            "metrics": metrics,
            "metrics_weights": "ema",
            "val_metrics": metrics,
            "per_class": [
                {"class": c, "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 100} for c in classes
            ],
            "confusion_matrix": cm.tolist(),
            "checkpoint": "checkpoints/best.ckpt",
            "group": f"{method}-resnet18",
            "config": {
                "data": {f"key{k}": k for k in range(20)},
                "method": {f"key{k}": k for k in range(20)},
                "trainer": {f"key{k}": k for k in range(10)},
                "logger": {"kind": "csv"},
            },
        }
        path = (
            root
            / method
            / "resnet18"
            / f"frac{fraction:g}"
            / f"fold{fold}"
            / f"seed{run_seed}"
            / RunFolder.RESULTS
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        paths.append(path)
    return paths


def naive_curves(root: Path, metrics: tuple[str, ...]) -> pd.DataFrame:
    """The obvious script: json.load and pandas.concat row by row, then groupby."""
    table = pd.DataFrame()
    for path in sorted(root.rglob(RunFolder.RESULTS)):
        with open(path) as f:
            results = json.load(f)
        row = {
            "method": results["method"],
            "backbone": results["backbone"],
            "label_fraction": results["label_budget"]["amount"],
            **{m: results["metrics"][m] for m in metrics},
        }
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    return table.groupby(["method", "backbone", "label_fraction"])[list(metrics)].agg(
        ["mean", "std", "count"]
    )


def main() -> None:
    from ssl_kvasir.study.curves import CURVE_METRICS, load_runs, summarize, write_curves

    p = parser(__doc__, quick="200 files instead of 1,000")
    p.add_argument("--files", type=int, help="number of results files (default 1,000)")
    args = p.parse_args()
    n = args.files or (200 if args.quick else 1000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        paths = make_results(root, n)
        size_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        naive_s, naive = best_of(lambda: naive_curves(root, CURVE_METRICS))
        ours_s, summary = best_of(lambda: summarize(load_runs([root], CURVE_METRICS), CURVE_METRICS))
        whole_s, _ = best_of(lambda: write_curves([root], Path(tmp) / "curves", CURVE_METRICS), repeat=2)
    # Same numbers from both: the means of every curve point.
    ours_mean = summary.set_index(["method", "backbone", "label_fraction"])["mcc_mean"].sort_index()
    worst = float(np.max(np.abs(ours_mean.to_numpy() - naive[("mcc", "mean")].sort_index().to_numpy())))
    print(f"curves over {n} results files ({size_kb:.1f} kB each, {len(summary)} curve points):")
    print(f"  naive json.load + pandas.concat per row: {naive_s:7.3f} s  {1e3 * naive_s / n:6.3f} ms/file")
    print(f"  ssl_kvasir load_runs + summarize:        {ours_s:7.3f} s  {1e3 * ours_s / n:6.3f} ms/file")
    print(f"  ssl_kvasir write_curves (CSV, MD, PNG):  {whole_s:7.3f} s  {1e3 * whole_s / n:6.3f} ms/file")
    print(f"  max |MCC mean difference| between the two: {worst:.1e}")
    # Target: the 2.5-3.0x measured when load_runs landed, less a margin for a loaded machine.
    closing_line("curves", "reading + summary speed-up over naive", naive_s / ours_s, ">=", 2.0, digits=1)


if __name__ == "__main__":
    main()
