"""Figures of the unlabeled-data analysis and of a run's confusion matrix, as PNGs written atomically.

Figures are drawn on a ``matplotlib.figure.Figure`` rendered by the Agg canvas: no pyplot, no global state,
nothing that needs a display. matplotlib is imported inside the functions.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ssl_kvasir.data.classes import ClassTable
from ssl_kvasir.errors import DataError


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    from ssl_kvasir.files import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def class_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinguishable colours: tab20, then Dark2, then evenly spaced hues."""
    from matplotlib import colormaps

    # Both are ListedColormaps, whose `colors` matplotlib types loosely (any array-like).
    listed: Any = colormaps
    colors = [tuple(c[:3]) for c in listed["tab20"].colors] + [tuple(c[:3]) for c in listed["Dark2"].colors]
    if n > len(colors):
        hsv = colormaps["hsv"]
        colors += [tuple(hsv(i / (n - len(colors)))[:3]) for i in range(n - len(colors))]
    return colors[:n]


def plot_umap(
    coords: np.ndarray,
    predicted: np.ndarray,
    classes: ClassTable,
    path: str | os.PathLike,
    is_labeled: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Scatter UMAP coordinates coloured by predicted class; labeled images drawn as black-edged triangles.

    Args:
        coords: ``(N, 2)`` UMAP coordinates.
        predicted: ``(N,)`` predicted class per image (the colour).
        classes: the class table (legend: letter and folder name).
        path: the PNG to write.
        is_labeled: ``(N,)`` bool; labeled images get a different marker, drawn on top.
        title: the figure title.

    Returns:
        ``path``.
    """
    coords = np.asarray(coords)
    predicted = np.asarray(predicted, dtype=np.int64)
    n = len(coords)
    if coords.shape != (n, 2) or predicted.shape != (n,):
        raise DataError(
            f"UMAP plot needs (N, 2) coordinates and (N,) classes, got {coords.shape} and {predicted.shape}"
        )
    labeled = np.zeros(n, bool) if is_labeled is None else np.asarray(is_labeled, dtype=bool)
    colors = np.asarray(class_colors(len(classes)))  # (C, 3)
    fig = _figure(11, 8)
    ax = fig.add_subplot()
    # Thousands of points: small, translucent and rasterised so the PNG stays readable and small.
    size = float(np.clip(4000 / max(n, 1), 0.5, 12))
    for marked, marker, edge in ((False, "o", "none"), (True, "^", "black")):
        rows = labeled == marked
        if rows.any():
            ax.scatter(
                coords[rows, 0],
                coords[rows, 1],
                c=colors[predicted[rows]],
                s=size * (4 if marked else 1),
                marker=marker,
                edgecolors=edge,
                linewidths=0.3,
                alpha=0.9 if marked else 0.6,
                rasterized=True,
            )
    from matplotlib.lines import Line2D

    present = np.unique(predicted)
    handles = [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            color=colors[c],
            label=f"{classes[int(c)].letter} {classes[int(c)].folder}",
        )
        for c in present
    ]
    if labeled.any():
        handles.append(
            Line2D(
                [],
                [],
                marker="^",
                linestyle="",
                color="white",
                markeredgecolor="black",
                label="labeled image",
            )
        )
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"UMAP of {n} images, coloured by predicted class")
    fig.tight_layout()
    return _save_png(fig, path)


def plot_composition(
    table: pd.DataFrame,
    path: str | os.PathLike,
    log_scale: bool = False,
    title: str = "",
    ylabel: str = "images (predicted class)",
) -> Path:
    """Grouped bar chart of a composition table: per class, one bar per source.

    Args:
        table: from :func:`ssl_kvasir.analysis.composition.composition_table` (columns ``class``,
            ``letter`` and one count column per source).
        path: the PNG to write.
        log_scale: a logarithmic count axis (class sizes span three orders of magnitude).
        title: the figure title.
        ylabel: what the bars count.

    Returns:
        ``path``.
    """
    sources = [c for c in table.columns if c not in ("class", "letter")]
    if not sources:
        raise DataError("the composition table has no source column to plot")
    n_classes = len(table)
    fig = _figure(max(8.0, 0.55 * n_classes + 2), 5.5)
    ax = fig.add_subplot()
    width = 0.8 / len(sources)
    x = np.arange(n_classes)
    from matplotlib import colormaps

    tab10 = colormaps["tab10"]  # strongly different hues: sources are few, unlike classes
    for i, source in enumerate(sources):
        ax.bar(
            x - 0.4 + (i + 0.5) * width, table[source].to_numpy(), width, label=source, color=tab10(i % 10)
        )
    ax.set_xticks(
        x,
        labels=[f"{letter} {name}" for letter, name in zip(table.letter, table["class"], strict=True)],
        rotation=90,
    )
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title or "Predicted class composition of the unlabeled images")
    fig.tight_layout()
    return _save_png(fig, path)


def plot_confusion_matrix(
    cm: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
    normalize: bool = False,
) -> Path:
    """Draw a confusion matrix as a PNG, written atomically to ``path``.

    Each non-zero cell shows its count (zeros are left blank so that the few errors stand out).

    Args:
        cm: counts of shape ``(C, C)``, rows = true class, columns = predicted class.
        class_names: axis labels, one per class (full names, or the paper's letters A..W).
        path: the PNG to write.
        title: the figure title.
        normalize: colour each cell by its share of the true class's images (row-normalised, so that the
            recall of a 6-image class is as visible as that of a 1,148-image one) instead of by its count.
            The cells still show counts.

    Returns:
        ``path``.

    Raises:
        ValueError: when ``class_names`` does not match ``cm``.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix must be square (C, C), got shape {cm.shape}")
    n_classes = cm.shape[0]
    if len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for a {n_classes}x{n_classes} confusion matrix")
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)  # (C, 1)
        shade = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)  # (C, C)
        vmax, bar_label = 1.0, "share of the true class"
    else:
        shade = cm.astype(np.float64)
        vmax, bar_label = max(float(shade.max()), 1.0), "images"

    side = max(4.0, 0.42 * n_classes + 2.5)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(shade, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=bar_label)
    ticks = np.arange(n_classes)
    longest = max((len(str(name)) for name in class_names), default=1)
    ax.set_xticks(ticks, labels=[str(n) for n in class_names], rotation=90 if longest > 2 else 0)
    ax.set_yticks(ticks, labels=[str(n) for n in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    fontsize = 8 if n_classes <= 12 else 6
    for i, j in zip(*np.nonzero(cm), strict=True):
        # Dark text on light cells, light text on dark ones.
        color = "white" if shade[i, j] > 0.5 * vmax else "black"
        ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=fontsize, color=color)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_knn_confusion(
    y_true: np.ndarray, y_knn: np.ndarray, classes: ClassTable, path: str | os.PathLike, title: str = ""
) -> Path:
    """The confusion matrix of a kNN classifier (rows = true class), row-normalised colours, counts in cells.

    Drawn by :func:`plot_confusion_matrix`, with the paper's letters as axis labels.
    """
    from ssl_kvasir.metrics import confusion_matrix

    cm = confusion_matrix(np.asarray(y_true), np.asarray(y_knn), len(classes))  # (C, C)
    plot_confusion_matrix(cm, classes.letters, path, title=title or "kNN classifier", normalize=True)
    return Path(path)
