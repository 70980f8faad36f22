"""Our runs beside the paper's Table 3: reads ``results.json`` files, averages each system over its folds.

A *system* is what the paper calls a row: one method on one backbone, trained once per fold. Its name is
``results["system"]`` (``system=`` of the fit), else ``<method>-<backbone>`` (with the budget,
``-frac0.1`` or ``-lpc25``, appended when it did not use every label, so that a label-fraction sweep does not collapse into
one row). A system's metrics are the mean over its folds of the mean over its runs in that fold (several seeds
of one fold count once), as the paper reports "the average of the two folds".

Our systems meet the paper's rows by backbone name (:data:`PAPER_ROW_BY_BACKBONE`), whatever the method:
a FixMatch ResNet-50 is compared with the paper's supervised ResNet-50.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassInfo
from ssl_kvasir.errors import DataError
from ssl_kvasir.names import METRIC_LABELS, LabelBudget
from ssl_kvasir.run.folder import read_results
from ssl_kvasir.study.baselines import PAPER_TABLE3, BaselineResult

TABLE_METRICS = (
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "micro_precision",
    "micro_recall",
    "micro_f1",
    "mcc",
)
"""The columns of the paper's Table 3, in its order."""

METRIC_HEADERS = {
    "macro_precision": "macro P",
    "macro_recall": "macro R",
    "macro_f1": METRIC_LABELS["macro_f1"],
    "micro_precision": "micro P",
    "micro_recall": "micro R",
    "micro_f1": METRIC_LABELS["micro_f1"],
    "mcc": METRIC_LABELS["mcc"],
}

PAPER_ROW_BY_BACKBONE = {
    "resnet50": "ResNet-50",
    "resnet152": "ResNet-152",
    "densenet161": "DenseNet-161",
    "resnet152+densenet161": "ResNet-152 + DenseNet-161 averaged",
    "resnet152+densenet161+mlp": "ResNet-152 + DenseNet-161 + MLP",
}
"""Backbone name (without a timm pretrained tag such as ``.tv_in1k``) -> row of :data:`PAPER_TABLE3`."""


def paper_row_for_backbone(backbone: str) -> str | None:
    """The paper's row for a backbone name, or ``None``; timm's ``.tag`` suffixes are ignored."""
    base = "+".join(part.split(".")[0] for part in backbone.strip().lower().split("+"))
    return PAPER_ROW_BY_BACKBONE.get(base)


def paper_figures(paper_row: str | None) -> dict[str, float | None]:
    """The paper's figures for a row, over :data:`TABLE_METRICS` (``None`` where it has none).

    The paper prints micro F1 only; with one label per image micro precision = micro recall = micro F1
    (= accuracy), so the micro P and R columns carry the micro F1 figure.
    """
    row = PAPER_TABLE3.get(paper_row) if paper_row else None
    if row is None:
        return dict.fromkeys(TABLE_METRICS)
    figures = {key: row.get(key) for key in TABLE_METRICS}
    figures["micro_precision"] = figures["micro_recall"] = row["micro_f1"]
    return figures


@dataclass(frozen=True)
class RunResult:
    """One run's ``results.json``, checked.

    Attributes:
        path: the file.
        system: the system the run belongs to (see the module docstring).
        method: training method.
        backbone: backbone name.
        fold: the evaluation fold.
        metrics: the evaluation fold's metrics (at least :data:`TABLE_METRICS`).
        classes: class names in the confusion matrix's order.
        confusion: counts ``(C, C)``, rows = true class.
    """

    path: Path
    system: str
    method: str
    backbone: str
    fold: int
    metrics: dict[str, float]
    classes: tuple[str, ...]
    confusion: np.ndarray


def _default_system_name(method: str, backbone: str, results: dict) -> str:
    budget = LabelBudget.from_record(results["label_budget"])
    return f"{method}-{backbone}" + ("" if budget.is_every_label else f"-{budget.id}")


def load_result(path: str | Path) -> RunResult:
    """Read one results record (:func:`ssl_kvasir.run.folder.read_results`) and check what the table adds.

    Raises:
        DataError: naming the file and the field, when the record is not readable, or lacks a metric of the
            table, or its confusion matrix counts no image.
    """
    path = Path(path)
    results = read_results(path)

    def bad(what: str) -> DataError:
        return DataError(f"results file {path}: {what}")

    method, backbone, fold = results["method"], results["backbone"], results["fold"]
    classes, metrics, cm = results["classes"], results["metrics"], results["confusion_matrix"]
    for key in TABLE_METRICS:
        if key not in metrics:
            raise bad(f"'metrics' lacks {key!r}")
        if not -1 <= metrics[key] <= 1:
            raise bad(f"metrics.{key} must be a number in [-1, 1], got {metrics[key]!r}")
    n = len(classes)
    confusion = np.array(cm, dtype=np.int64).reshape(n, n)  # (C, C)
    if confusion.sum() == 0:
        raise bad("'confusion_matrix' counts no images")

    system = results.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise bad(f"'system' must be a non-empty string, got {system!r}")
    return RunResult(
        path=path,
        system=system.strip() if system else _default_system_name(method.strip(), backbone.strip(), results),
        method=method.strip(),
        backbone=backbone.strip(),
        fold=fold,
        metrics={key: float(metrics[key]) for key in TABLE_METRICS},
        classes=tuple(classes),
        confusion=confusion,
    )


def in_paper_order(run: RunResult) -> tuple[np.ndarray, list[ClassInfo] | None]:
    """The run's confusion matrix in the paper's class order A..W when its classes are HyperKvasir's."""
    if len(run.classes) != len(HYPERKVASIR_CLASSES) or not all(c in HYPERKVASIR_CLASSES for c in run.classes):
        return run.confusion, None
    perm = np.array([HYPERKVASIR_CLASSES.index(c) for c in run.classes])  # (C,) our index -> paper index
    if len(set(perm.tolist())) != len(perm):
        return run.confusion, None
    reordered = np.zeros_like(run.confusion)
    reordered[np.ix_(perm, perm)] = run.confusion  # (C, C)
    return reordered, list(HYPERKVASIR_CLASSES)


@dataclass
class SystemSummary:
    """One system's runs, averaged over folds.

    Attributes:
        name: the system's name.
        method: training method of its runs.
        backbone: backbone of its runs.
        paper_row: the row of :data:`PAPER_TABLE3` it is compared with, or ``None``.
        runs: its runs.
        metrics: mean over folds of the per-fold mean over runs, for :data:`TABLE_METRICS`.
        fold_metrics: the per-fold means, by fold.
        missing_folds: expected folds without a run.
        confusion: the runs' confusion matrices summed, ``(C, C)``, in the paper's class order for HyperKvasir.
        classes: class names in the order of ``confusion``.
    """

    name: str
    method: str
    backbone: str
    paper_row: str | None
    runs: list[RunResult]
    metrics: dict[str, float]
    fold_metrics: dict[int, dict[str, float]]
    missing_folds: list[int]
    confusion: np.ndarray
    classes: list[str]

    @property
    def note(self) -> str:
        parts = []
        if self.missing_folds:
            have = ", ".join(map(str, sorted(self.fold_metrics)))
            lack = ", ".join(map(str, self.missing_folds))
            parts.append(f"WARNING: no run for fold {lack}; average of fold {have} only")
        for fold in sorted(self.fold_metrics):
            n = sum(r.fold == fold for r in self.runs)
            if n > 1:
                parts.append(f"fold {fold}: mean of {n} runs")
        return "; ".join(parts)


def summarize_systems(
    runs: Sequence[RunResult], expected_folds: Iterable[int] | None = None
) -> list[SystemSummary]:
    """Group runs into systems and average each over its folds.

    Args:
        runs: the runs.
        expected_folds: the folds every system should have; by default folds 0..max seen (at least 0 and 1,
            the paper's two folds).

    Returns:
        one summary per system, in the order of the paper's rows (systems compared with the same row, and
        those without one, by name).

    Raises:
        DataError: naming two files, when one system mixes methods, backbones or class lists.
    """
    if expected_folds is None:
        expected = set(range(max(2, max((r.fold for r in runs), default=0) + 1)))
    else:
        expected = set(expected_folds) | {r.fold for r in runs}
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.system, []).append(run)
    summaries = []
    for name, members in groups.items():
        first = members[0]
        for run in members[1:]:
            for what in ("method", "backbone"):
                if getattr(run, what) != getattr(first, what):
                    raise DataError(
                        f"system {name!r} mixes {what}s: {getattr(first, what)!r} in {first.path} and "
                        f"{getattr(run, what)!r} in {run.path}; name the systems apart with 'system' in results.json"
                    )
        reordered = [in_paper_order(run) for run in members]
        table = reordered[0][1]
        classes = [c.folder for c in table] if table else list(first.classes)
        for run, (_, run_table) in zip(members, reordered, strict=True):
            run_classes = [c.folder for c in run_table] if run_table else list(run.classes)
            if run_classes != classes:
                raise DataError(
                    f"system {name!r}: {run.path} has classes {run.classes} but {first.path} has {first.classes}"
                )
        fold_metrics = {}
        for fold in sorted({r.fold for r in members}):
            in_fold = [r.metrics for r in members if r.fold == fold]
            fold_metrics[fold] = {key: float(np.mean([m[key] for m in in_fold])) for key in TABLE_METRICS}
        summaries.append(
            SystemSummary(
                name=name,
                method=first.method,
                backbone=first.backbone,
                paper_row=paper_row_for_backbone(first.backbone),
                runs=list(members),
                metrics={
                    key: float(np.mean([m[key] for m in fold_metrics.values()])) for key in TABLE_METRICS
                },
                fold_metrics=fold_metrics,
                missing_folds=sorted(expected - set(fold_metrics)),
                confusion=np.sum([cm for cm, _ in reordered], axis=0),  # (C, C)
                classes=classes,
            )
        )
    paper_order: dict[str | None, int] = {row: i for i, row in enumerate(PAPER_TABLE3)}
    return sorted(summaries, key=lambda s: (paper_order.get(s.paper_row, len(paper_order)), s.name))


@dataclass
class TableRow:
    """One row of the side-by-side table.

    Attributes:
        system: our system's name (or the baseline's).
        paper_row: the paper's row it is compared with, or ``None``.
        ours: our figures over :data:`TABLE_METRICS`.
        paper: the paper's figures over :data:`TABLE_METRICS` (``None`` where it has none).
        method: training method (empty for a baseline).
        backbone: backbone (empty for a baseline).
        folds: the folds averaged.
        n_runs: runs averaged (repeats for random guessing).
        note: warnings and remarks.
    """

    system: str
    paper_row: str | None
    ours: dict[str, float]
    paper: dict[str, float | None]
    method: str = ""
    backbone: str = ""
    folds: tuple[int, ...] = ()
    n_runs: int = 0
    note: str = ""
    diff: dict[str, float | None] = field(init=False)

    def __post_init__(self) -> None:
        self.diff = {
            k: None if (paper := self.paper[k]) is None else self.ours[k] - paper for k in TABLE_METRICS
        }


def system_rows(systems: Iterable[SystemSummary]) -> list[TableRow]:
    """Table rows for our systems."""
    return [
        TableRow(
            system=s.name,
            paper_row=s.paper_row,
            ours=dict(s.metrics),
            paper=paper_figures(s.paper_row),
            method=s.method,
            backbone=s.backbone,
            folds=tuple(sorted(s.fold_metrics)),
            n_runs=len(s.runs),
            note=s.note,
        )
        for s in systems
    ]


def baseline_rows(baselines: Iterable[BaselineResult]) -> list[TableRow]:
    """Table rows for the split-file baselines of :func:`ssl_kvasir.study.baselines.split_file_baselines`."""
    rows = []
    for b in baselines:
        note = "computed from the split file"
        if b.n_repeats > 1:
            note += f"; mean of {b.n_repeats} seeded repeats"
            if b.std is not None:
                note += "; std of one repeat: " + ", ".join(
                    f"{METRIC_HEADERS[k]} {b.std[k]:.4f}"
                    for k in ("macro_precision", "macro_recall", "macro_f1", "micro_f1", "mcc")
                )
        rows.append(
            TableRow(
                system=b.name,
                paper_row=b.name,
                ours={k: b.metrics[k] for k in TABLE_METRICS},
                paper=paper_figures(b.name),
                folds=b.folds,
                n_runs=b.n_repeats,
                note=note,
            )
        )
    return rows


def format_figure(value: float | None, digits: int, signed: bool = False) -> str:
    """``value`` with ``digits`` decimals (a sign with ``signed``; never ``-0.000``), empty for ``None``."""
    if value is None:
        return ""
    if round(value, digits) == 0:
        value = 0.0  # no "-0.000"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def render_csv(rows: Iterable[TableRow]) -> str:
    """The table as CSV: per metric our figure, the paper's and ours minus the paper's (4 decimals)."""
    columns = ["system", "paper_row", "method", "backbone", "folds", "runs"]
    for key in TABLE_METRICS:
        columns += [key, f"{key}_paper", f"{key}_diff"]
    columns.append("note")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        line = [r.system, r.paper_row or "", r.method, r.backbone, " ".join(map(str, r.folds)), r.n_runs]
        for key in TABLE_METRICS:
            line += [
                format_figure(r.ours[key], 4),
                format_figure(r.paper[key], 3),
                format_figure(r.diff[key], 4),
            ]
        line.append(r.note)
        writer.writerow(line)
    return out.getvalue()


def md_escape(text: str) -> str:
    """``text`` for a Markdown table cell."""
    return text.replace("|", "\\|")


def render_markdown(rows: Iterable[TableRow], title: str = "Table 3: ours beside the paper") -> str:
    """The table as Markdown, in the paper's layout; each cell reads ``ours / paper (ours - paper)``."""
    rows = list(rows)
    header = ["system", "paper row", "folds", *(METRIC_HEADERS[k] for k in TABLE_METRICS), "note"]
    lines = [
        f"## {title}",
        "",
        "Each metric cell: ours / the paper's (ours minus the paper's). Averages over the evaluation folds. "
        "The paper prints micro F1 only; with one label per image micro P = micro R = micro F1.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * len(TABLE_METRICS) + ["---"]) + "|",
    ]
    for r in rows:
        cells = [md_escape(r.system), md_escape(r.paper_row or "-"), ", ".join(map(str, r.folds)) or "-"]
        for key in TABLE_METRICS:
            cell = format_figure(r.ours[key], 3)
            if r.paper[key] is not None:
                cell += f" / {format_figure(r.paper[key], 3)} ({format_figure(r.diff[key], 3, signed=True)})"
            elif r.paper_row in PAPER_TABLE3:
                cell += " / n/a"
            cells.append(cell)
        cells.append(md_escape(r.note))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def file_slug(name: str) -> str:
    """A file-name-safe form of a system's name."""
    return re.sub(r"[^A-Za-z0-9._+@-]+", "_", name.replace("%", "pct")).strip("._") or "system"
