"""What the unlabeled pile is made of: predicted-class counts per source, and how two sources agree.

A "source" is one set of predictions on the unlabeled images: the authors' published file, our model's
export, a kNN vote. The composition table is the paper's Fig. 9 (count of unlabeled images per predicted
class) with one column per source; an agreement matrix cross-tabulates two sources over the images they
share, joined by file name.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ssl_kvasir.analysis.plots import plot_composition
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassTable
from ssl_kvasir.errors import DataError
from ssl_kvasir.files import atomic_write
from ssl_kvasir.pseudo_labels.table import read_pseudo_labels

__all__ = [
    "CompositionReport",
    "agreement_matrix",
    "composition_table",
    "plot_composition",
    "write_composition_report",
]


def composition_table(
    sources: Mapping[str, np.ndarray], classes: ClassTable = HYPERKVASIR_CLASSES
) -> pd.DataFrame:
    """Count images per predicted class, one column per source.

    Args:
        sources: source name -> ``(N_source,)`` predicted class indices.
        classes: the class table.

    Returns:
        one row per class in index order: ``class`` (archive folder name), ``letter`` (the paper's letter)
        and one integer count column per source.

    Raises:
        DataError: naming the source, for an index outside ``0..C-1``.
    """
    table = pd.DataFrame({"class": classes.names, "letter": classes.letters})
    for name, predicted in sources.items():
        predicted = np.asarray(predicted, dtype=np.int64)
        if predicted.size and (predicted.min() < 0 or predicted.max() >= len(classes)):
            raise DataError(f"source {name!r}: predicted class indices must lie in 0..{len(classes) - 1}")
        table[name] = np.bincount(predicted, minlength=len(classes))
    return table


def agreement_matrix(
    a: np.ndarray, b: np.ndarray, num_classes: int, names: Sequence[str] | None = None
) -> tuple[pd.DataFrame, float]:
    """Cross-tabulate two sources' predictions on the same images.

    Args:
        a: ``(N,)`` class indices of source a.
        b: ``(N,)`` class indices of source b, same images in the same order.
        num_classes: C.
        names: row and column labels (default 0..C-1).

    Returns:
        the ``(C, C)`` count matrix (rows = a's class, columns = b's class) and the agreement rate (the
        share of images on the diagonal; NaN for no images).
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise DataError(
            f"the two sources must be (N,) arrays of the same length, got {a.shape} and {b.shape}"
        )
    for arr in (a, b):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise DataError(f"class indices must lie in 0..{num_classes - 1}")
    counts = np.bincount(a * num_classes + b, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )
    labels = list(names) if names is not None else list(range(num_classes))
    rate = float(np.trace(counts) / len(a)) if len(a) else float("nan")
    return pd.DataFrame(counts, index=labels, columns=labels), rate


def _write_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        frame.to_csv(f, index=index, lineterminator="\n")


@dataclass
class CompositionReport:
    """What :func:`write_composition_report` wrote.

    Attributes:
        table: the composition table.
        files: every file written, by role (``composition.csv``, ``composition.png``, ``agreement``,
            ``agreement_<a>_vs_<b>``).
        agreement: one row per pair of sources: ``a``, ``b``, ``n_common`` (images in both, joined by file
            name), ``n_agree`` and ``rate``.
    """

    table: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)
    agreement: pd.DataFrame | None = None


def write_composition_report(
    prediction_files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    classes: ClassTable = HYPERKVASIR_CLASSES,
) -> CompositionReport:
    """Compare prediction files: composition counts, a bar chart and pairwise agreement.

    Each file may be in the authors' format or the ssl_kvasir pseudo-label format; each is named by its
    file stem. Writes ``composition.csv``, ``composition.png``, ``agreement.csv`` (one line per pair) and
    ``agreement_<a>_vs_<b>.csv`` (the class-by-class matrix, rows = a) for every pair.

    Raises:
        DataError: for a bad file (naming it), two files with the same stem, or a pair of files that share
            no file name.
    """
    out_dir = Path(out_dir)
    paths = [Path(p) for p in prediction_files]
    if not paths:
        raise DataError("no prediction files given")
    stems = [p.stem for p in paths]
    clash = next((s for s in stems if stems.count(s) > 1), None)
    if clash is not None:
        same = ", ".join(str(p) for p in paths if p.stem == clash)
        raise DataError(
            f"prediction files {same} have the same name {clash!r}; sources are named by file stem"
        )
    frames = {stem: read_pseudo_labels(p, classes) for stem, p in zip(stems, paths, strict=True)}
    table = composition_table({stem: f.paper_index.to_numpy() for stem, f in frames.items()}, classes)
    report = CompositionReport(table=table)
    report.files["composition.csv"] = out_dir / "composition.csv"
    _write_csv(table, report.files["composition.csv"])
    report.files["composition.png"] = out_dir / "composition.png"
    plot_composition(table, report.files["composition.png"])
    rows = []
    for (stem_a, path_a), (stem_b, path_b) in itertools.combinations(zip(stems, paths, strict=True), 2):
        # Join by file name: two files need not list the same images, nor in the same order.
        joined = frames[stem_a][["filename", "paper_index"]].merge(
            frames[stem_b][["filename", "paper_index"]], on="filename", suffixes=("_a", "_b")
        )
        if joined.empty:
            raise DataError(f"{path_a} and {path_b} share no file name; cannot compare their predictions")
        matrix, rate = agreement_matrix(
            joined.paper_index_a.to_numpy(), joined.paper_index_b.to_numpy(), len(classes), classes.names
        )
        matrix.index.name = f"{stem_a} \\ {stem_b}"
        key = f"agreement_{stem_a}_vs_{stem_b}"
        report.files[key] = out_dir / f"{key}.csv"
        _write_csv(matrix, report.files[key], index=True)
        rows.append(
            {
                "a": stem_a,
                "b": stem_b,
                "n_common": len(joined),
                "n_agree": int(np.trace(matrix.to_numpy())),
                "rate": rate,
            }
        )
    if rows:
        report.agreement = pd.DataFrame(rows)
        report.files["agreement"] = out_dir / "agreement.csv"
        _write_csv(report.agreement, report.files["agreement"])
    return report
