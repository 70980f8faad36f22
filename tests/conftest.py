"""Shared fixtures: one small synthetic archive per test session.

The suite runs torch on one thread, in this process and in the commands it starts (they inherit the
environment): convolutions sum in another order on more threads, and the figures the tests assert (recall of
flipped labels, byte-identical files after a kill and a resume against an in-process run) were measured on one.
Tiny models gain nothing from more threads on a CI machine's few cores.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported by anything below
os.environ["MKL_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ssl_kvasir.data.synth import make_synthetic_archive  # noqa: E402

SYNTH_PER_CLASS = 6
SYNTH_UNLABELED = 60
SYNTH_SEED = 0


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic HyperKvasir archive: 6 labeled images in each of the 23 classes, 60 unlabeled images,
    sizes mixed from 720x576, 1280x1024 and 1920x1072, and ``2_fold_split.csv`` at its root. Read-only:
    tests that modify files copy them first."""
    root = tmp_path_factory.mktemp("synth") / "hyper-kvasir"
    return make_synthetic_archive(root, per_class=SYNTH_PER_CLASS, unlabeled=SYNTH_UNLABELED, seed=SYNTH_SEED)


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 labeled images per class (so labels_per_class=100 is clamped), 8 unlabeled images. Read-only."""
    root = tmp_path_factory.mktemp("tiny") / "hyper-kvasir"
    return make_synthetic_archive(root, per_class=3, unlabeled=8, seed=1)


@pytest.fixture(scope="session")
def imbalanced_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One class with 1,000 images among 22 with 2 (40 x 40 px), 20 unlabeled images: at 1 % the big class's
    budget is 5 (one of them validates), every other class keeps its single image for training."""
    root = tmp_path_factory.mktemp("imbalanced") / "hyper-kvasir"
    return make_synthetic_archive(root, per_class=[1000] + [2] * 22, unlabeled=20, seed=0, sizes=[(40, 40)])


@pytest.fixture(scope="session")
def one_percent_run(imbalanced_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The results record of a tiny supervised fit with 1 % of the labels of :func:`imbalanced_archive`,
    evaluated on fold 1; its checkpoint as an absolute path."""
    import json

    from helpers import tiny

    from ssl_kvasir.cli import main

    out = tmp_path_factory.mktemp("budget") / "run"
    data = [f"data.root={imbalanced_archive}", f"data.split_file={imbalanced_archive / '2_fold_split.csv'}"]
    args = ["fit", f"output_dir={out}", *data, *tiny("method=supervised", "data.batch_size=4")]
    assert main([*args, "data.label_fraction=0.01", "data.fold=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    # The record names its checkpoint relative to the run's folder.
    return {**results, "checkpoint": str(out / results["checkpoint"])}
