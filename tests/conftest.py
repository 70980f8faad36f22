"""Shared fixtures: one small synthetic archive per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_kvasir.data.synth import make_synthetic_archive

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
