"""Experiment tracking conventions: W&B names, groups, job types and tags that make label-efficiency curves a
group-by.

A sweep point's W&B run is named ``<method>-<backbone>-<budget>-fold<k>-seed<s>`` and belongs to the group
``<method>-<backbone>-<budget>`` (the runs that differ only by fold and seed). A method that trains in stages
(self-training's rounds) logs one run per stage, named with ``-round<r>``, with ``round`` in its config and a
``job_type``: ``teacher`` (round 0, labeled images only), ``student`` (a later round whose model teaches the
next), ``final`` (the last round, whose metrics are the point's). Only the final stage joins the point's group;
the others go to ``<group>-rounds``, so "group by Group" averages one run per point. A single-stage fit has
``job_type`` ``train``.

Every call into ``wandb`` is here: the fit's logger and its closing, an analysis's run, the curves' run.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from ssl_kvasir.names import LabelBudget, backbone_id
from ssl_kvasir.run import guard
from ssl_kvasir.run.folder import RunFolder, read_tracking_id


def wandb_mode() -> str:
    """``online`` when the user has configured W&B (an API key in the environment or ``~/.netrc``), else
    ``offline``: nothing is sent anywhere unless the user set W&B up."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def label_budget(cfg: DictConfig) -> LabelBudget:
    """The run's label budget (its ``id``, ``frac0.1`` or ``lpc25``, names groups and tags)."""
    return LabelBudget.from_settings(cfg.data.label_fraction, cfg.data.labels_per_class)


def run_group(cfg: DictConfig) -> str:
    """Runs that differ only by fold and seed share a group: ``<method>-<backbone>-<budget>``."""
    return f"{cfg.method.name}-{backbone_id(cfg.backbone.name, cfg.backbone.head)}-{label_budget(cfg).id}"


def run_tags(cfg: DictConfig) -> list[str]:
    return [
        cfg.method.name,
        backbone_id(cfg.backbone.name, cfg.backbone.head),
        label_budget(cfg).id,
        f"fold{cfg.data.fold}",
        f"seed{cfg.seed}",
    ]


def run_name(cfg: DictConfig) -> str:
    """``<method>-<backbone>-<budget>-fold<k>-seed<s>``, e.g. ``fixmatch-resnet50-frac0.1-fold0-seed0``."""
    return f"{run_group(cfg)}-fold{cfg.data.fold}-seed{cfg.seed}"


def run_identity(cfg: DictConfig, stage: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The W&B name, group, job type and extra config of one fit (see the module's docstring).

    Args:
        cfg: the run's config.
        stage: the stage's record when the method trains in stages (``{"round": r, ...}``), else ``None``.

    Returns:
        ``{"name", "group", "job_type", "config"}``; ``config`` holds ``round`` for a stage.
    """
    group = cfg.logger.get("group") or run_group(cfg)
    r = None if stage is None else stage.get("round")
    if r is None:
        return {"name": run_name(cfg), "group": group, "job_type": "train", "config": {}}
    rounds = cfg.method.get("rounds")
    job_type = "final" if rounds is not None and r == rounds else "teacher" if r == 0 else "student"
    return {
        "name": f"{run_name(cfg)}-round{r}",
        "group": group if job_type == "final" else f"{group}-rounds",
        "job_type": job_type,
        "config": {"round": r},
    }


def checkpoint_results(checkpoint: str | Path) -> dict | None:
    """The results record of the run that wrote ``checkpoint`` (``<run>/checkpoints/<name>.ckpt``), or
    ``None`` when there is none (yet) or it cannot be read."""
    from ssl_kvasir.errors import DataError
    from ssl_kvasir.run.folder import RunFolder, read_results

    path = RunFolder(Path(checkpoint).resolve().parent.parent).results
    try:
        return read_results(path)
    except DataError:
        return None


def pseudo_label_summary(table) -> Any:
    """Per predicted class of a pseudo-label table (``pseudo_labels.csv``): how many images, their mean
    confidence, and the share the kNN vote agrees with (where the table has a kNN vote)."""
    import pandas as pd

    grouped = table.groupby("predicted_class", sort=True)
    summary = pd.DataFrame({"images": grouped.size(), "mean_confidence": grouped["confidence"].mean()})
    if "knn_agrees" in table and table["knn_agrees"].notna().any():
        summary["knn_agreement"] = grouped["knn_agrees"].apply(lambda s: s.dropna().astype(float).mean())
    return summary.reset_index().sort_values("images", ascending=False, ignore_index=True)


def log_analysis(
    checkpoint: str | Path, out: Path, outputs: Mapping[str, Path], metrics: Mapping
) -> str | None:
    """Log an analysis to W&B: its plots (every PNG of ``outputs``), its composition tables (the CSVs of the
    ``composition`` outputs), the pseudo-label summary (:func:`pseudo_label_summary` of the ``pseudo-labels``
    output) and ``metrics`` (the kNN check) in the run's summary.

    The run is the process's active W&B run if there is one; otherwise, when the checkpoint's own run logged
    to W&B, a run of its own in that project and group, named ``<checkpoint's run>-analysis`` with job type
    ``analysis`` (offline unless W&B is configured, :func:`wandb_mode`), finished here.

    Returns:
        the name of the W&B run logged to, or ``None`` when W&B was not used.
    """
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        return None
    import pandas as pd
    import wandb

    run, opened = wandb.run, False
    if run is None:
        results = checkpoint_results(checkpoint) or {}
        logger = (results.get("config") or {}).get("logger") or {}
        if logger.get("kind") != "wandb":
            return None
        mode: Any = logger.get("mode") or wandb_mode()  # a string W&B checks
        run = wandb.init(
            project=logger.get("project"),
            entity=logger.get("entity"),
            group=results.get("group"),
            job_type="analysis",
            name=f"{run_name_from_results(results)}-analysis",
            dir=str(out),
            mode=mode,
            config={"checkpoint": str(checkpoint), "analysis_dir": str(out)},
        )
        opened = True
    try:
        logged: dict[str, Any] = {}
        for key, path in outputs.items():
            path = Path(path)
            slug = "analysis/" + key.replace(" ", "_").replace("(", "").replace(")", "")
            if path.suffix == ".png":
                logged[slug] = wandb.Image(str(path))
            elif key.startswith("composition") and path.suffix == ".csv":
                logged[slug] = wandb.Table(dataframe=pd.read_csv(path))
        if "pseudo-labels" in outputs and Path(outputs["pseudo-labels"]).suffix == ".csv":
            summary = pseudo_label_summary(pd.read_csv(outputs["pseudo-labels"]))
            logged["analysis/pseudo_label_summary"] = wandb.Table(dataframe=summary)
        run.log(logged)
        for key, value in metrics.items():
            run.summary[f"analysis/{key}"] = value
        name = run.name
    finally:
        if opened:
            run.finish()
    return name


def release_tracking() -> None:
    """At the end of a command: wait until W&B has written every run the command finished, so that their files
    are whole when it returns (``finish`` only tells W&B's service that a run is over; the service writes an
    offline run's record, ``run-<id>.wandb``, as it closes the run, after ``finish`` has returned); nothing
    when W&B was not imported."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()


def run_name_from_results(results: Mapping[str, Any]) -> str:
    """:func:`run_name` of the run a results record describes."""
    r = results
    return f"{r['method']}-{r['backbone']}-{r['label_budget']['id']}-fold{r['fold']}-seed{r['seed']}"


def wandb_logger(cfg: DictConfig, out: Path, stage: Mapping[str, Any] | None = None):
    """The fit's Lightning ``WandbLogger``, named, grouped and typed by :func:`run_identity` (``stage``: a
    method stage's record, e.g. self-training's ``{"round": r}``); a resumed or requeued fit continues the
    run of its folder."""
    from lightning.pytorch.loggers import WandbLogger

    identity = run_identity(cfg, stage)
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=identity["group"],
        job_type=identity["job_type"],
        tags=run_tags(cfg),
        name=identity["name"],
        save_dir=str(out),
        mode=cfg.logger.mode or wandb_mode(),
        config={**cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True)), **identity["config"]},
        id=wandb_run_id(cfg, out),
        resume="allow",
    )


def wandb_run_id(cfg: DictConfig, out: Path) -> str:
    """The W&B run id of the fit in ``out`` (the run's folder ``cfg.output_dir``, or a stage's folder in it):
    one W&B run per folder, so that a resumed or requeued job continues its run.

    It derives from the run's tracking id (``run.json``, :func:`~ssl_kvasir.run.folder.write_run_record`) and
    the stage's place in the run, which travel with the folder: a run moved or copied elsewhere and resumed
    continues its W&B run. A folder whose ``run.json`` has no tracking id (an older run) keeps the id of
    before, from its absolute path.
    """
    import hashlib

    root = RunFolder(Path(cfg.output_dir))
    tracking_id = read_tracking_id(root)
    try:
        key = f"{tracking_id}/{root.relative(out)}" if tracking_id else None
    except ValueError:  # not a folder of this run
        key = None
    return hashlib.sha1((key or str(out.resolve())).encode()).hexdigest()[:16]


@contextlib.contextmanager
def one_tracking_run(logger) -> Iterator[None]:
    """One W&B run per Lightning fit, closed when the fit ends (a failed one marked so): the next fit in the
    same process (a local sweep's next point, self-training's next round) must not log into this run."""
    try:
        yield
    except (guard.Requeued, guard.FitInterrupted):
        # Checkpointed (and requeued): the resumed job continues this run (same id), so it is not a failure.
        _finish_wandb(logger, exit_code=0, preempting=True)
        raise
    except BaseException:
        _finish_wandb(logger, exit_code=1)
        raise
    _finish_wandb(logger, exit_code=0)


def _finish_wandb(logger, exit_code: int, preempting: bool = False) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            if preempting:
                wandb.run.mark_preempting()
            wandb.finish(exit_code=exit_code)


def active_wandb_run():
    """The W&B run of this process, or ``None`` (without importing wandb when nothing has)."""
    wandb = sys.modules.get("wandb")
    return None if wandb is None else wandb.run


def open_curves_run(project: str, entity: str | None, out: Path):
    """A W&B run for the label-efficiency curves (job type ``label_efficiency``), online or offline as
    :func:`wandb_mode` decides; its files go below ``out``."""
    from ssl_kvasir.analysis._optional import import_optional

    wandb = import_optional("wandb", "pip install wandb")
    out.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project,
        entity=entity,
        job_type="label_efficiency",
        name="label-efficiency",
        dir=str(out),
        mode=wandb_mode(),
    )


@dataclass(frozen=True)
class LineChart:
    """One native W&B line chart: ``xs[i]`` and ``ys[i]`` are the points of the line named ``keys[i]``."""

    xs: list[list[float]]
    ys: list[list[float]]
    keys: list[str]
    title: str
    xname: str


def log_curves(run, table, png: Path, charts: Mapping[str, LineChart]) -> None:
    """Into ``run``: ``table`` (a data frame; NaN is logged as an empty cell) as
    ``label_efficiency/table``, the figure ``png`` as ``label_efficiency/curves`` and each of ``charts`` under
    its key."""
    import wandb

    logged: dict[str, Any] = {
        "label_efficiency/table": wandb.Table(dataframe=table.astype(object).where(table.notna(), None)),
        "label_efficiency/curves": wandb.Image(str(png)),
    }
    for key, chart in charts.items():
        logged[key] = wandb.plot.line_series(
            xs=chart.xs, ys=chart.ys, keys=chart.keys, title=chart.title, xname=chart.xname
        )
    run.log(logged)
