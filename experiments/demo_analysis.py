"""The demo's analysis step: the runs beside the paper's Table 3, and the best run picked for the analysis of
the unlabeled images.

    python experiments/demo_analysis.py --runs demo/runs --out demo/analysis [--split-file FILE]

Writes ``table3.csv``, ``table3.md`` and confusion matrices (``ssl-kvasir report``), and ``best_run.json``: the
run with the highest validation MCC, its checkpoint and its metrics. ``experiments/demo.py`` then analyses the
unlabeled images with that checkpoint (``ssl-kvasir analyze`` and ``export-pseudo-labels``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssl_kvasir.errors import DataError, SslKvasirError
from ssl_kvasir.files import atomic_write_json
from ssl_kvasir.run.folder import read_results
from ssl_kvasir.study.report import write_report
from ssl_kvasir.study.results import find_results_files
from ssl_kvasir.study.table3 import render_markdown


def best_run(runs_dir: Path, metric: str = "mcc") -> dict:
    """The run with the highest *validation* ``metric`` (ties: the first path in sorted order).

    The choice never looks at the evaluation fold: that would make the analysed checkpoint a model selected
    on test data. Runs without validation images (a budget too small to spare one per class, or
    ``data.val_policy=none``) cannot be chosen, and are named.
    """
    candidates = []
    for path in sorted(find_results_files([runs_dir])):
        results = read_results(path)
        if results.get("val_metrics") is None:
            print(f"note: {path.parent} has no validation images to be chosen by (its label budget)")
            continue
        candidates.append((results["val_metrics"][metric], path, results))
    if not candidates:
        raise DataError(f"no run below {runs_dir} has validation metrics to choose it by")
    _, path, results = max(candidates, key=lambda c: c[0])  # max keeps the first of equal scores
    return {
        "results": str(path),
        "run_dir": str(path.parent),
        # The record names it relative to the run's folder.
        "checkpoint": str(path.parent / results["checkpoint"]),
        "method": results["method"],
        "backbone": results["backbone"],
        "label_budget": results["label_budget"],
        "fold": results["fold"],
        "selected_by": f"validation {metric}",
        "val_metrics": results["val_metrics"],
        "metrics": results["metrics"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="the sweep folder")
    p.add_argument("--out", type=Path, required=True, help="folder for table3.* and best_run.json")
    p.add_argument("--split-file", type=Path, help="adds the majority-class and random-guessing rows")
    a = p.parse_args(argv)
    try:
        rows = write_report([a.runs], a.out / "table3", split_file=a.split_file, n_random_repeats=20)
        print(render_markdown(rows), end="")
        best = best_run(a.runs)
    except SslKvasirError as e:
        print(f"demo_analysis: error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(a.out / "best_run.json", best)
    kind, amount = best["label_budget"]["kind"], best["label_budget"]["amount"]
    budget = f"{100 * amount:g} % of the labels" if kind == "fraction" else f"{amount} labels per class"
    print(
        f"\nbest run: {best['method']} {best['backbone']} with {budget}, fold {best['fold']}: "
        f"validation MCC {best['val_metrics']['mcc']:.4f}, evaluation MCC {best['metrics']['mcc']:.4f}\n  checkpoint {best['checkpoint']}\n-> {a.out / 'best_run.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
