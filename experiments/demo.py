"""`make demo`: the label-efficiency study end to end on a small synthetic archive, on the CPU.

Phases, each timed: ``data`` (``ssl-kvasir synth``), ``prepare`` (``ssl-kvasir prepare``, the image cache),
``training`` (a 2 x 2 sweep through ``experiments/sweep.py``: supervised and FixMatch at 10 % and 100 % of the
labels, fold 0), ``report`` (``experiments/demo_analysis.py``: Table 3 and the best run by validation MCC),
``analysis`` (``ssl-kvasir analyze`` and ``export-pseudo-labels`` of that run) and ``curves``
(``ssl-kvasir curves``). Each phase runs the command a user would type, printed before it runs. A second
``make demo`` reuses what the first made (the sweep skips finished runs); delete ``demo/`` to start over.

    python experiments/demo.py [--out demo]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ssl_kvasir.run.folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("ssl-kvasir"))

# 16 labeled images per class (8 per fold) and 400 unlabeled ones: at 10 % FixMatch trains on one labeled image
# per class and the rest of the pile, where it can be seen to beat the supervised baseline.
ARCHIVE = ["--per-class", "16", "--unlabeled", "600", "--seed", "0"]
IMAGE_SIZE = 32
# Sized for two CPU cores: a tiny timm ResNet at 32 px, 300 steps per run, six checkpoints.
TRAINING = [
    "method=supervised,fixmatch",
    "data.label_fraction=0.1,1.0",
    "data.fold=0",
    "seed=0",
    "backbone=test_resnet",
    f"data.image_size={IMAGE_SIZE}",
    "data.batch_size=8",
    "data.mu=2",
    "data.num_workers=0",
    "data.steps_per_epoch=50",
    "trainer.max_steps=600",
    "trainer.log_every_n_steps=25",
    "trainer.progress_bar=false",
    "logger=csv",
    # Both methods train from scratch with the same optimizer and schedule, so that the unlabeled loss is the
    # only difference (the supervised defaults, lr 0.001 held constant, are the paper's for ImageNet weights).
    "method.lr=0.03",
    "method.schedule=cosine",
]


# One thread per process unless the user says otherwise: 32 px convolutions gain nothing from intra-op threads,
# and on busy cores the threads spin against each other (a 100-step fit took 50 s with 2 threads, 9 s with 1,
# on a loaded 2-core machine).
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=ENV)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The label-efficiency study on a small synthetic archive.")
    p.add_argument("--out", type=Path, default=REPO / "demo", help="working folder (default: demo/)")
    a = p.parse_args(argv)
    out = a.out.resolve()
    archive, cache, runs = out / "archive", out / "cache", out / "runs"
    split = archive / "2_fold_split.csv"
    timings: dict[str, float] = {}

    def phase(name: str, *commands: list[str]) -> None:
        print(f"\n=== {name}", flush=True)
        start = time.perf_counter()
        for cmd in commands:
            run(cmd)
        timings[name] = time.perf_counter() - start

    if split.exists():
        print(f"\n=== data\n{archive} exists: reused")
        timings["data"] = 0.0
    else:
        phase("data", [CLI, "synth", "--out", str(archive), *ARCHIVE])
    phase(
        "prepare",
        [
            CLI,
            "prepare",
            "--root",
            str(archive),
            "--cache",
            str(cache),
            "--size",
            str(IMAGE_SIZE),
            "--no-progress",
        ],
    )
    phase(
        "training",
        [
            sys.executable,
            "experiments/sweep.py",
            f"data.root={archive}",
            f"data.split_file={split}",
            f"data.cache={cache}",
            f"sweep_root={runs}",
            *TRAINING,
        ],
    )
    analysis = out / "analysis"
    phase(
        "report",
        [
            sys.executable,
            "experiments/demo_analysis.py",
            "--runs",
            str(runs),
            "--out",
            str(analysis),
            "--split-file",
            str(split),
        ],
    )
    best = json.loads((analysis / "best_run.json").read_text())
    data = [
        f"data.root={archive}",
        f"data.split_file={split}",
        f"data.cache={cache}",
        f"data.fold={best['fold']}",
    ]
    unlabeled = analysis / "unlabeled"
    phase(
        "analysis",
        # Embeddings, kNN, UMAP + HDBSCAN, the composition table and every pseudo-label of the best run ...
        [
            CLI,
            "analyze",
            f"checkpoint={best['checkpoint']}",
            *data,
            f"output_dir={unlabeled}",
            "data.num_workers=0",
            "umap.n_neighbors=10",
            "cluster.min_cluster_size=10",
        ],
        # ... and, from the same embeddings, the confident ones in the authors' format for clinicians to review.
        [
            CLI,
            "export-pseudo-labels",
            f"checkpoint={best['checkpoint']}",
            *data,
            f"output_dir={unlabeled}",
            "data.num_workers=0",
            "format=authors",
            "select.min_confidence=0.5",
            "cluster.enabled=false",
            f"output={analysis / 'pseudo_labels_authors.csv'}",
        ],
    )
    phase("curves", [CLI, "curves", str(runs), "--out", str(out / "curves")])

    print("\n=== results")
    print((out / "curves" / "label_efficiency.md").read_text())
    print("plots:")
    print(f"  {out / 'curves' / 'label_efficiency.png'}")
    for png in [*sorted((analysis / "table3").glob("*.png")), *sorted(unlabeled.rglob("*.png"))]:
        print(f"  {png}")
    print("tables:")
    print(f"  {out / 'curves' / 'label_efficiency.csv'}")
    print(f"  {out / 'curves' / 'label_efficiency.md'}")
    print(f"  {out / 'analysis' / 'table3' / 'table3.csv'}")
    print(f"  {out / 'analysis' / 'best_run.json'}")
    for csv in sorted(unlabeled.rglob("*.csv")):
        print(f"  {csv}")
    print("pseudo-labels:")
    print(f"  {unlabeled / 'pseudo_labels.csv'} (every unlabeled image)")
    print(f"  {analysis / 'pseudo_labels_authors.csv'} (confidence >= 0.5, the authors' format)")
    print("runs:")
    for results in sorted(runs.rglob(RunFolder.RESULTS)):
        print(f"  {results}")
    print("\ntime per phase:")
    for name, seconds in timings.items():
        print(f"  {name:<10}{seconds:8.1f} s")
    print(f"  {'total':<10}{sum(timings.values()):8.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
