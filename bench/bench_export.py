"""Building and writing the pseudo-label CSV: speed and peak memory, chunked (ours) vs all-at-once (baseline).

Inputs are generated embeddings' outputs: (N, 23) class probabilities, (N, 23) kNN probabilities, clusters,
outlier scores and N paths. Each (N, method) runs in a fresh subprocess:

- a timed run without tracing gives images/s;
- a second run under ``tracemalloc`` measures memory allocated by the build and by the write (inputs are
  allocated before tracing starts, so they do not count).

The output table itself must be held (measured as the traced memory still allocated after the build), so the
figures of merit are the peaks *beyond* it. Writing in chunks needs one chunk's text, whatever N; the
baseline writes the whole file as one string. Building holds the output plus pandas' transient arrays of
string pointers (a few bytes per image, a fraction of the output); the baseline adds whole (N, C)
temporaries. Target: the write's memory beyond the output does not grow with N (at most 1.5x from the
smallest N to the largest).

    python bench/bench_export.py           # N = 10k, 100k, 200k
    python bench/bench_export.py --quick   # N = 10k, 100k
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from argparse import SUPPRESS
from pathlib import Path

import numpy as np
import pandas as pd
from harness import closing_line, parser

from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.files import atomic_write_text
from ssl_kvasir.pseudo_labels.table import CHUNK_ROWS, build_pseudo_label_table, write_pseudo_labels

C = len(HYPERKVASIR_CLASSES)


def _inputs(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "paths": [
            f"unlabeled-images/images/{i:08x}-{i * 7919 % 65536:04x}-4a33-a1b7-30eac2d4bd22.jpg"
            for i in range(n)
        ],
        "probs": rng.dirichlet(np.full(C, 0.3), size=n).astype(np.float32),  # (n, C)
        "knn_probs": rng.dirichlet(np.full(C, 0.3), size=n).astype(np.float32),  # (n, C)
        "clusters": rng.integers(-1, 40, size=n),
        "outlier_scores": rng.random(n),
    }


def ours_build(inputs: dict) -> pd.DataFrame:
    return build_pseudo_label_table(
        inputs["paths"],
        inputs["probs"],
        knn_probs=inputs["knn_probs"],
        clusters=inputs["clusters"],
        outlier_scores=inputs["outlier_scores"],
        checkpoint="last.ckpt",
    )


def ours_write(table: pd.DataFrame, path: Path) -> None:
    write_pseudo_labels(table, path)


def baseline_build(inputs: dict) -> pd.DataFrame:
    """The straightforward version: whole-array temporaries."""
    p = inputs["probs"].astype(np.float64)  # (N, C)
    ranked = np.sort(p, axis=1)  # (N, C)
    top = p.argmax(axis=1)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    knn_top = inputs["knn_probs"].argmax(axis=1)
    names = np.asarray(HYPERKVASIR_CLASSES.names, dtype=object)
    return pd.DataFrame(
        {
            "filename": [s.rsplit("/", 1)[-1] for s in inputs["paths"]],
            "path": inputs["paths"],
            "predicted_class": names[top],
            "paper_index": top,
            "confidence": ranked[:, -1],
            "margin": ranked[:, -1] - ranked[:, -2],
            "entropy": entropy,
            "knn_class": names[knn_top],
            "knn_agrees": knn_top == top,
            "cluster": inputs["clusters"],
            "outlier_score": inputs["outlier_scores"],
            "checkpoint": "last.ckpt",
        }
    )


def baseline_write(table: pd.DataFrame, path: Path) -> None:
    """The whole file as one string, then one atomic write."""
    atomic_write_text(path, table.to_csv(index=False, lineterminator="\n"))


METHODS = {"ours": (ours_build, ours_write), "baseline": (baseline_build, baseline_write)}


def worker(n: int, method: str) -> dict:
    inputs = _inputs(n)
    build, write = METHODS[method]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pseudo_labels.csv"
        t = time.perf_counter()
        write(build(inputs), out)
        elapsed = time.perf_counter() - t
        file_bytes = out.stat().st_size
        tracemalloc.start()
        table = build(inputs)
        # While the table is alive, what is still allocated is the output; the rest of the peak was transient.
        output, build_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        write(table, out)
        after_write, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return {
        "n": len(table),
        "method": method,
        "seconds": elapsed,
        "output": output,
        "build_extra": build_peak - output,
        "write_extra": write_peak - after_write,
        "peak": max(build_peak, write_peak),
        "file": file_bytes,
    }


def main() -> None:
    p = parser(__doc__, quick="N = 10k and 100k only")
    p.add_argument("--worker", nargs=2, metavar=("N", "METHOD"), help=SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(int(a.worker[0]), a.worker[1])))
        return
    sizes = [10_000, 100_000] if a.quick else [10_000, 100_000, 200_000]
    mb = 1 / 2**20
    print(
        f"pseudo-label CSV build + write (ours: chunks of {CHUNK_ROWS:,} rows); memory = tracemalloc, in MB"
    )
    print("  output = the table, still allocated after the build; extra = peak beyond what stays allocated")
    print(
        f"{'N':>8} {'method':>9} {'images/s':>10} {'output':>7} {'build extra':>11} {'write extra':>11} "
        f"{'peak':>7} {'file':>6}"
    )
    results = {}
    for n in sizes:
        for method in METHODS:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(n), method],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results[n, method] = r
            print(
                f"{n:>8,} {method:>9} {n / r['seconds']:>10,.0f} {r['output'] * mb:>7.1f} "
                f"{r['build_extra'] * mb:>11.1f} {r['write_extra'] * mb:>11.1f} {r['peak'] * mb:>7.1f} "
                f"{r['file'] * mb:>6.1f}"
            )
        o, b = results[n, "ours"], results[n, "baseline"]
        print(
            f"{'':>8} ratio ours/baseline: speed {b['seconds'] / o['seconds']:.2f}x, peak {o['peak'] / b['peak']:.2f}x, "
            f"write extra {o['write_extra'] / max(b['write_extra'], 1):.3f}x"
        )
    small, large = sizes[0], sizes[-1]
    print(f"N grows {large / small:.0f}x from {small:,} to {large:,}:")
    for method in METHODS:
        lo, hi = results[small, method], results[large, method]
        print(
            f"  {method:>9}: write extra {lo['write_extra'] * mb:.1f} -> {hi['write_extra'] * mb:.1f} MB, "
            f"build extra {lo['build_extra'] / small:.0f} -> {hi['build_extra'] / large:.0f} bytes/image, "
            f"output {hi['output'] / large:.0f} bytes/image"
        )
    lo, hi = results[small, "ours"], results[large, "ours"]
    closing_line(
        "export",
        f"write memory beyond the output, {large // 1000}k / {small // 1000}k rows",
        hi["write_extra"] / max(lo["write_extra"], 1),
        "<=",
        1.5,
    )


if __name__ == "__main__":
    main()
