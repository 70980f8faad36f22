"""Analysis figures and confusion matrices are written as PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_kvasir.analysis.composition import composition_table
from ssl_kvasir.analysis.plots import (
    class_colors,
    plot_composition,
    plot_confusion_matrix,
    plot_knn_confusion,
    plot_umap,
)
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.metrics import confusion_matrix

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


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_writes_readable_png(tmp_path, normalize: bool) -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 200)
    cm = confusion_matrix(y_true, np.where(rng.random(200) < 0.8, y_true, 0), 5)
    path = tmp_path / "sub" / "cm.png"
    plot_confusion_matrix(cm, list("ABCDE"), path, title="five classes", normalize=normalize)
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 200
        # Not a blank canvas: the cells are shaded.
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    assert [p.name for p in path.parent.iterdir()] == ["cm.png"]  # no temporary file left behind


def test_plot_rejects_wrong_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="3 class names"):
        plot_confusion_matrix(np.eye(4, dtype=int), ["a", "b", "c"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
