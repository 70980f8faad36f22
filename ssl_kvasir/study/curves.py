"""Label-efficiency curves: each method's metrics against its label budget, read from a sweep's results files.

A *curve* is one method on one backbone; its points are label budgets, either a fraction of the labeled
training images (``label_fraction``) or a number of labeled images per class (``labels_per_class``). A point is
the mean, the sample standard deviation and the number of the runs at that budget, over folds and seeds alike.
The paper's supervised DenseNet-161 trained on every label (Borgli et al. 2020, Table 3) is drawn as a dashed
reference line when the runs are on HyperKvasir (not for another data set): the curves show what share of
the labels a method needs to reach it. With W&B, the curves are also native W&B line charts (:func:`line_charts`).

Every ``results.json`` below the given folders counts as one run; the per-round ``stage_results.json`` files of
self-training do not (the run's own ``results.json`` holds its last round).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.files import atomic_write, atomic_write_text
from ssl_kvasir.names import METRIC_LABELS, LabelBudget
from ssl_kvasir.run.folder import read_results
from ssl_kvasir.run.tracking import LineChart, active_wandb_run, log_curves
from ssl_kvasir.study.baselines import PAPER_TABLE3
from ssl_kvasir.study.results import find_results_files

CURVE_METRICS = ("mcc", "macro_f1", "micro_f1")
REFERENCE_ROW = "DenseNet-161"
REFERENCE_LABEL = "paper: DenseNet-161, 100 % labels"
FRACTION, PER_CLASS = "label_fraction", "labels_per_class"
"""The two kinds of label budget, named as the summary's columns name them."""

RUN_COLUMNS = [
    "path",
    "method",
    "backbone",
    "budget_kind",
    "budget",
    "fold",
    "seed",
    "data_seed",
    "protocol",
    "val_policy",
    "data_source",
]


def read_run(path: Path, metrics: Sequence[str] = CURVE_METRICS) -> dict:
    """The fields of one ``results.json`` that a curve needs, checked.

    Returns:
        ``{"path", "method", "backbone", "budget_kind", "budget", "fold", "seed", "data_seed", <metric>: float}``.

    Raises:
        DataError: naming the file and the field that is missing or malformed.
    """
    results = read_results(path)
    budget = LabelBudget.from_record(results["label_budget"])
    scores = results["metrics"]
    row = {
        "path": str(path),
        "method": results["method"].strip(),
        "backbone": results["backbone"].strip(),
        "budget_kind": FRACTION if budget.label_fraction is not None else PER_CLASS,
        "budget": float(budget.amount),
        "fold": results["fold"],
        "seed": results["seed"],
        "data_seed": results.get("data_seed"),
        # A record made outside a fit's protocol (a hand-made one) says so.
        "protocol": results.get("protocol") or "unrecorded",
        "val_policy": results.get("val_policy") or "unrecorded",
        # hyperkvasir or folder (another data set): the paper's reference line is HyperKvasir's only.
        "data_source": ((results.get("config") or {}).get("data") or {}).get("source"),
    }
    for key in metrics:
        if key not in scores:
            raise DataError(f"results file {path}: 'metrics' lacks {key!r}")
        row[key] = float(scores[key])
    return row


def load_runs(paths: Iterable[str | Path], metrics: Sequence[str] = CURVE_METRICS) -> pd.DataFrame:
    """One row per run found below ``paths`` (see :func:`read_run` for the columns).

    Raises:
        DataError: for a malformed file (named), or two files that are the same run (same method, backbone,
            budget, fold, seed and data seed), which would count it twice.
    """
    if not metrics:
        raise ConfigError("name at least one metric")
    rows = [read_run(path, metrics) for path in find_results_files(paths)]
    runs = pd.DataFrame(rows, columns=[*RUN_COLUMNS, *metrics])
    identity = ["method", "backbone", "budget_kind", "budget", "fold", "seed", "data_seed"]
    twice = runs[runs.duplicated(identity, keep=False)]
    if len(twice):
        first = twice.iloc[0]
        same = twice[(twice[identity].astype(str) == first[identity].astype(str)).all(axis=1)]
        raise DataError(
            f"{same.path.iloc[0]} and {same.path.iloc[1]} are the same run ({first.method}, {first.backbone}, "
            f"{first.budget_kind}={first.budget:g}, fold {first.fold}, seed {first.seed}); pass only one of them"
        )
    return runs


def summarize(runs: pd.DataFrame, metrics: Sequence[str] = CURVE_METRICS) -> pd.DataFrame:
    """Mean, sample standard deviation (NaN for a single run) and count per method, backbone and budget.

    Returns:
        one row per curve point, sorted by method, backbone, budget kind and budget, with the columns
        ``method, backbone, label_fraction, labels_per_class, n, folds, seeds, <metric>_mean, <metric>_std``.
    """
    keys = ["method", "backbone", "budget_kind", "budget"]
    grouped = runs.groupby(keys, sort=True)
    stats = grouped[list(metrics)].agg(["mean", "std"])
    stats.columns = [f"{metric}_{stat}" for metric, stat in stats.columns]
    out = pd.DataFrame(
        {
            "n": grouped.size(),
            "folds": grouped["fold"].agg(lambda s: " ".join(map(str, sorted(set(s))))),
            "seeds": grouped["seed"].agg(lambda s: " ".join(map(str, sorted(set(s))))),
            # Which protocol and validation policy produced the point (two names: it mixes them).
            "protocol": grouped["protocol"].agg(lambda s: " ".join(sorted(set(s)))),
            "val_policy": grouped["val_policy"].agg(lambda s: " ".join(sorted(set(s)))),
        }
    ).join(stats)
    out = out.reset_index()
    is_fraction = out.budget_kind == FRACTION
    out.insert(2, FRACTION, out.budget.where(is_fraction))
    out.insert(3, PER_CLASS, out.budget.where(~is_fraction).astype("Int64"))
    return out.drop(columns=["budget_kind", "budget"])


def budget_kind_of(summary: pd.DataFrame) -> pd.Series:
    """Each summary row's kind of budget: :data:`FRACTION` or :data:`PER_CLASS`."""
    return pd.Series(np.where(summary[FRACTION].notna(), FRACTION, PER_CLASS), index=summary.index)


def budget_of(summary: pd.DataFrame) -> pd.Series:
    """Each summary row's budget as a float: the label fraction, or the number of labels per class."""
    return summary[FRACTION].fillna(summary[PER_CLASS].astype(float))


def format_budget(kind: str, budget: float) -> str:
    """``10 %`` or ``25/class``."""
    return f"{100 * budget:g} %" if kind == FRACTION else f"{int(budget)}/class"


def shows_reference(runs: pd.DataFrame) -> bool:
    """Whether the paper's HyperKvasir reference belongs beside these runs: none of them trained on another data
    set (``config.data.source`` other than ``hyperkvasir``; runs that do not record it count as HyperKvasir)."""
    sources = set(runs["data_source"].dropna()) if "data_source" in runs else set()
    return sources <= {"hyperkvasir"}


def reference_figures(metrics: Sequence[str], shown: bool = True) -> dict[str, float]:
    """The paper's DenseNet-161 figures (100 % labels) for those of ``metrics`` it reports (none when not
    ``shown``: the runs are not on HyperKvasir)."""
    if not shown:
        return {}
    row = PAPER_TABLE3[REFERENCE_ROW] or {}
    return {m: float(v) for m in metrics if (v := row.get(m)) is not None}


def render_markdown(
    summary: pd.DataFrame,
    metrics: Sequence[str] = CURVE_METRICS,
    n_runs: int | None = None,
    reference: bool = True,
) -> str:
    """One table per metric (and budget kind): a row per method and backbone, a column per budget, cells
    ``mean ± std (n)``; the paper's figures quoted when ``reference`` (:func:`shows_reference`)."""
    figures = reference_figures(metrics, reference)
    lines = ["# Label efficiency", ""]
    intro = "Mean ± sample standard deviation over folds and seeds (number of runs) on the evaluation folds"
    if n_runs is not None:
        intro = f"{n_runs} runs. " + intro
    lines.append(intro + ".")
    protocols = sorted({p for cell in summary.protocol for p in cell.split()})
    policies = sorted({p for cell in summary.val_policy for p in cell.split()})
    mixed = len(protocols) > 1 or len(policies) > 1
    lines.append(
        f"Protocol: {', '.join(protocols)}; validation: {', '.join(policies)}"
        + (
            " (mixed: the protocol and val_policy columns of the CSV say which runs are which)."
            if mixed
            else "."
        )
    )
    if figures:
        quoted = ", ".join(f"{METRIC_LABELS.get(m, m)} {v:.3f}" for m, v in figures.items())
        lines.append(
            f"Reference, the paper's supervised DenseNet-161 with 100 % of the labels (Table 3): {quoted}."
        )
    kinds = budget_kind_of(summary)
    budgets = budget_of(summary)
    for metric in metrics:
        for kind in (FRACTION, PER_CLASS):
            part = summary[kinds == kind]
            if part.empty:
                continue
            columns = sorted(set(budgets[kinds == kind]))
            title = METRIC_LABELS.get(metric, metric)
            by = "label fraction" if kind == FRACTION else "labeled images per class"
            lines += ["", f"## {title} by {by}", ""]
            lines.append(
                "| method | backbone | " + " | ".join(format_budget(kind, b) for b in columns) + " |"
            )
            lines.append("|---|---|" + "---:|" * len(columns))
            for (method, backbone), curve in part.groupby(["method", "backbone"], sort=True):
                cells = {
                    b: _cell(r[f"{metric}_mean"], r[f"{metric}_std"], r["n"])
                    for b, (_, r) in zip(budgets[curve.index], curve.iterrows(), strict=True)
                }
                row = " | ".join(cells.get(b, "–") for b in columns)
                lines.append(f"| {method} | {backbone} | {row} |")
    return "\n".join(lines) + "\n"


def _cell(mean: float, std: float, n: int) -> str:
    return f"{mean:.3f} ({n})" if pd.isna(std) else f"{mean:.3f} ± {std:.3f} ({n})"


def plot_curves(summary: pd.DataFrame, metrics: Sequence[str], path: Path, reference: bool = True) -> Path:
    """``metric`` against label budget on a log axis: a panel per metric (a row per budget kind), a line per
    method and backbone with error bars and a ± std band, the paper's reference as a dashed line. Written
    atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    kinds = budget_kind_of(summary)
    budgets = budget_of(summary)
    rows = [k for k in (FRACTION, PER_CLASS) if (kinds == k).any()]
    figures = reference_figures(metrics, reference)
    fig = Figure(figsize=(4.2 * len(metrics), 3.6 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(metrics), squeeze=False)
    curves = list(summary.groupby(["method", "backbone"], sort=True).groups)
    colors = {curve: f"C{i % 10}" for i, curve in enumerate(curves)}
    for r, kind in enumerate(rows):
        part = summary[kinds == kind]
        ticks = sorted(set(budgets[kinds == kind]))
        for c, metric in enumerate(metrics):
            ax = axes[r, c]
            for (method, backbone), curve in part.groupby(["method", "backbone"], sort=True):
                x = budgets[curve.index].to_numpy()  # (P,) sorted budgets
                mean = curve[f"{metric}_mean"].to_numpy()  # (P,)
                std = curve[f"{metric}_std"].to_numpy()  # (P,) NaN where one run
                color = colors[(method, backbone)]
                label = f"{method} ({backbone})"
                ax.errorbar(
                    x, mean, yerr=np.nan_to_num(std), color=color, marker="o", ms=4, capsize=3, label=label
                )
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
            if metric in figures:
                ax.axhline(figures[metric], color="0.3", linestyle="--", linewidth=1, label=REFERENCE_LABEL)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([format_budget(kind, t) for t in ticks], rotation=45 if len(ticks) > 5 else 0)
            ax.set_xlabel("label fraction" if kind == FRACTION else "labeled images per class")
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.set_title(METRIC_LABELS.get(metric, metric))
            ax.grid(True, alpha=0.3)
        axes[r, 0].legend(fontsize="small", loc="best")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return path


def wandb_project(runs: pd.DataFrame, override: str | None = None) -> tuple[str, str | None]:
    """The W&B project (and entity) of the sweep: ``override``, else the one the runs logged to, else the
    default of ``configs/logger/wandb.yaml``.

    Raises:
        ConfigError: when the runs logged to several projects and no ``override`` was given.
    """
    if override:
        return override, None
    seen = set()
    for path in runs.path:
        logger = (json.loads(Path(path).read_bytes()).get("config") or {}).get("logger") or {}
        if logger.get("kind") == "wandb" and logger.get("project"):
            seen.add((logger["project"], logger.get("entity")))
    if len(seen) > 1:
        listed = ", ".join(sorted(p for p, _ in seen))
        raise ConfigError(
            f"the runs logged to several W&B projects ({listed}); choose one with --wandb-project"
        )
    if seen:
        return seen.pop()
    from ssl_kvasir.config import compose

    logger = compose("fit", ["logger=wandb"]).logger
    return logger.project, logger.entity


def curve_series(
    summary: pd.DataFrame, metric: str, kind: str
) -> tuple[list[list[float]], list[list[float]], list[str]]:
    """The lines of one native W&B chart: for each method and backbone, the mean of ``metric`` against the
    budget (in %, or labels per class) and, where several runs make a point, the mean - std and mean + std
    lines around it.

    Returns:
        ``(xs, ys, keys)`` for ``wandb.plot.line_series``: one x list, one y list and one name per line.
    """
    kinds = budget_kind_of(summary)
    part = summary[kinds == kind]
    budgets = budget_of(summary)[part.index]
    xs, ys, keys = [], [], []
    for (method, backbone), curve in part.groupby(["method", "backbone"], sort=True):
        x = budgets[curve.index].to_numpy() * (100.0 if kind == FRACTION else 1.0)  # (P,)
        mean = curve[f"{metric}_mean"].to_numpy()  # (P,)
        std = curve[f"{metric}_std"].to_numpy()  # (P,) NaN where one run
        name = f"{method} ({backbone})"
        xs.append(x.tolist())
        ys.append(mean.tolist())
        keys.append(name)
        spread = ~np.isnan(std)
        if spread.any():
            for sign, label in ((-1, "- std"), (1, "+ std")):
                xs.append(x[spread].tolist())
                ys.append((mean + sign * std)[spread].tolist())
                keys.append(f"{name} {label}")
    return xs, ys, keys


def line_charts(summary: pd.DataFrame, metrics: Sequence[str] = CURVE_METRICS) -> dict[str, LineChart]:
    """The native W&B line charts of the curves: one per metric and budget kind (``label_efficiency/<metric>``,
    or ``label_efficiency/<metric>_per_class`` for labels-per-class budgets), a line per method with its ± std
    lines (:func:`curve_series`)."""
    charts = {}
    kinds = set(budget_kind_of(summary))
    for kind in (FRACTION, PER_CLASS):
        if kind not in kinds:
            continue
        for metric in metrics:
            xs, ys, keys = curve_series(summary, metric, kind)
            label = METRIC_LABELS.get(metric, metric)
            by = "% of the labels" if kind == FRACTION else "labeled images per class"
            suffix = "" if kind == FRACTION else "_per_class"
            charts[f"label_efficiency/{metric}{suffix}"] = LineChart(
                xs=xs, ys=ys, keys=keys, title=f"{label} by {by}", xname=by
            )
    return charts


@dataclass
class CurvesReport:
    """What :func:`write_curves` made.

    Attributes:
        runs: one row per run read.
        summary: one row per curve point (see :func:`summarize`).
        markdown: the text of ``label_efficiency.md``.
        files: ``csv``, ``md`` and ``png`` paths.
        wandb_logged: whether the table and plot went to a W&B run.
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    markdown: str
    files: dict[str, Path]
    wandb_logged: bool


def write_curves(
    paths: Iterable[str | Path], out: str | Path, metrics: Sequence[str] = CURVE_METRICS, wandb_run=None
) -> CurvesReport:
    """Read the runs below ``paths``; write ``label_efficiency.csv``, ``.md`` and ``.png`` into ``out``.

    Args:
        paths: sweep folders, run folders or results files.
        out: the output folder (created).
        metrics: the metrics to summarize and plot.
        wandb_run: a W&B run to log the table and plot to; by default the process's active run, if any.

    Raises:
        DataError: naming a malformed results file, or a path without any.
    """
    out = Path(out)
    runs = load_runs(paths, metrics)
    summary = summarize(runs, metrics)
    reference = shows_reference(runs)
    markdown = render_markdown(summary, metrics, n_runs=len(runs), reference=reference)
    files = {
        "csv": out / "label_efficiency.csv",
        "md": out / "label_efficiency.md",
        "png": out / "label_efficiency.png",
    }
    buffer = io.StringIO()
    summary.to_csv(buffer, index=False, float_format="%.6g")
    atomic_write_text(files["csv"], buffer.getvalue())
    atomic_write_text(files["md"], markdown)
    plot_curves(summary, metrics, files["png"], reference=reference)
    run = wandb_run if wandb_run is not None else active_wandb_run()
    if run is not None:
        log_curves(run, summary, files["png"], line_charts(summary, metrics))
    return CurvesReport(runs, summary, markdown, files, wandb_logged=run is not None)
