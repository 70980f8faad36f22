"""Analysis figures are written as PNGs; W&B logging happens only with an active run."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ssl_kvasir.analysis.composition import composition_table
from ssl_kvasir.analysis.plots import (
    class_colors,
    log_images_to_wandb,
    plot_composition,
    plot_knn_confusion,
    plot_umap,
)
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES

PNG = b"\x89PNG\r\n\x1a\n"


def test_figures_are_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(200, 2))
    predicted = rng.integers(0, 23, size=200)
    labeled = np.arange(200) < 30
    umap_png = plot_umap(coords, predicted, HYPERKVASIR_CLASSES, tmp_path / "umap.png", is_labeled=labeled)
    table = composition_table({"a": predicted, "b": rng.integers(0, 23, size=100)})
    bars_png = plot_composition(table, tmp_path / "figs" / "composition.png", log_scale=True)
    knn_png = plot_knn_confusion(
        predicted[:50], rng.integers(0, 23, size=50), HYPERKVASIR_CLASSES, tmp_path / "knn.png"
    )
    for png in (umap_png, bars_png, knn_png):
        assert png.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs", "knn.png", "umap.png"]  # no temporary files


def test_class_colors_are_distinct() -> None:
    for n in (3, 23, 40):
        assert len(set(class_colors(n))) == n


def test_wandb_logging_needs_an_active_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logged = []
    fake = types.SimpleNamespace(
        run=None, Image=lambda path: ("image", path), log=lambda data, step=None: logged.append((data, step))
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert log_images_to_wandb({"analysis/umap": tmp_path / "u.png"}) is False and logged == []
    fake.run = object()
    assert log_images_to_wandb({"analysis/umap": tmp_path / "u.png"}, step=3) is True
    assert logged == [({"analysis/umap": ("image", str(tmp_path / "u.png"))}, 3)]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert log_images_to_wandb({"analysis/umap": tmp_path / "u.png"}) is False
