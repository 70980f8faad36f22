"""The pieces of a label-efficiency sweep (``experiments/sweep.py``): what each job runs, and how the launchers
(``experiments/hydra_plugins/ssl_kvasir_launchers.py``) start the points.

Importing this module registers the OmegaConf resolvers that ``configs/sweep.yaml`` uses to name a run's
folder. It lives in the library, not in the script, so that a job unpickled on a SLURM node (or by submitit's
local executor) imports it, and with it the resolvers, before its config is composed.

Launching. Before anything is started, every point of the grid is looked up (:func:`plan`): a point whose
``results.json`` exists is skipped, and so is one that a live job already holds (its ``job.json`` marker,
``ssl_kvasir.study.status``), so running ``make pretrain`` again while a sweep is queued or running submits only
what is missing or failed. The local launcher starts each point as its own process group,
``python experiments/sweep.py <the point's overrides> hydra.mode=RUN`` (:func:`run_local`): when that fit
spreads over several GPUs, Lightning's DDP launcher starts the other ranks by re-running that command, i.e.
this one point, never the whole multirun.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from omegaconf import DictConfig, OmegaConf

from ssl_kvasir.config import validate
from ssl_kvasir.console import quiet_console
from ssl_kvasir.errors import ConfigError, SslKvasirError
from ssl_kvasir.names import LabelBudget, backbone_id
from ssl_kvasir.run.folder import RunFolder, read_results
from ssl_kvasir.study.status import (
    POINT_LOG,
    add_to_manifest,
    clear_marker,
    point_status,
    write_marker,
)

log = logging.getLogger("ssl_kvasir.sweep")


def hub_weights(weights: str | list | None) -> bool:
    """Whether a backbone takes timm's ImageNet weights from the hub: when no local weight file is given."""
    return not weights


def register_resolvers() -> None:
    """``${label_budget:fraction,per_class}``, ``${backbone_id:name,head}`` and ``${hub_weights:weights}`` for
    config files."""
    OmegaConf.register_new_resolver(
        "label_budget",
        lambda fraction, per_class: LabelBudget.from_settings(fraction, per_class).id,
        replace=True,
    )
    OmegaConf.register_new_resolver("backbone_id", backbone_id, replace=True)
    OmegaConf.register_new_resolver("hub_weights", hub_weights, replace=True)


register_resolvers()


@dataclass
class SweepSlurmConf(SlurmQueueConf):
    """``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM settings, launched by
    ``SlurmPointLauncher`` (``experiments/hydra_plugins``), plus ``wait``: whether ``make pretrain`` waits for the
    array to end (``WAIT=0``: it returns once the jobs are submitted)."""

    _target_: str = "hydra_plugins.ssl_kvasir_launchers.SlurmPointLauncher"
    wait: bool = True


ConfigStore.instance().store(
    group="hydra/launcher", name="ssl_kvasir_slurm", node=SweepSlurmConf, provider="ssl_kvasir"
)


def match_launcher(cfg: DictConfig, launcher: DictConfig) -> None:
    """Under the SLURM launcher, make the trainer span the job's processes: one per task on each node.

    Lightning's SLURM environment checks that ``devices x num_nodes`` equals the job's task count, so the
    trainer must agree with ``hydra.launcher.tasks_per_node`` and ``hydra.launcher.nodes``.

    Raises:
        ConfigError: when ``trainer.devices`` or ``trainer.num_nodes`` was set to something else.
    """
    if not str(launcher.get("_target_", "")).endswith(("SlurmLauncher", "SlurmPointLauncher")):
        return
    tasks, nodes = int(launcher.tasks_per_node), int(launcher.nodes)
    t = cfg.trainer
    if t.devices not in ("auto", tasks) or t.num_nodes not in (1, nodes):
        raise ConfigError(
            f"trainer.devices={t.devices} trainer.num_nodes={t.num_nodes} disagree with the SLURM launcher's "
            f"{tasks} tasks per node on {nodes} nodes: set GPUS/NODES (hydra.launcher.tasks_per_node, "
            "hydra.launcher.nodes) and leave the trainer's at their defaults"
        )
    t.devices, t.num_nodes = tasks, nodes


def run_point(cfg: DictConfig, launcher: DictConfig | None = None) -> dict:
    """One point of the sweep: skipped when its ``results.json`` exists, else one ``fit``.

    Args:
        cfg: the job's composed config (``configs/sweep.yaml`` with the point's overrides).
        launcher: ``hydra.launcher`` of the job, to match the trainer to a SLURM allocation.

    Returns:
        ``{"output_dir", "skipped", "metrics"}`` (metrics of the evaluation fold; ``None`` when skipped).
    """
    out = Path(cfg.output_dir)
    done = RunFolder(out).results
    if done.exists():
        try:
            read_results(done)
        except SslKvasirError as e:
            # One line, as `ssl-kvasir fit` gives it: an old or damaged record is not a result.
            log.error("%s: error: %s", out, e)
            raise SystemExit(2) from None
        log.info("skipping %s: %s exists (delete it to run this point again)", out, done.name)
        return {"output_dir": str(out), "skipped": True, "metrics": None}
    if launcher is not None:
        match_launcher(cfg, launcher)
    validate(cfg)  # a bad value fails this point in a second, as `ssl-kvasir fit` does
    # Imported only for a run to fit: a skipped point costs no torch import.
    from ssl_kvasir.run.guard import Requeued
    from ssl_kvasir.run.train import fit

    quiet_console()  # after Lightning's import: its lines once, through Hydra's handlers

    log.info("fitting %s", out)
    try:
        results = fit(cfg)
    except SslKvasirError as e:
        # Bad input or config: one line, as `ssl-kvasir fit` gives it, and its exit status.
        log.error("%s: error: %s", out, e)
        raise SystemExit(2) from None
    except Requeued as e:
        # As submitit's own handler leaves a requeued job: no result (the job is not over), exit status -1.
        log.warning("%s: %s", out, e)
        raise SystemExit(-1) from None
    return {"output_dir": str(out), "skipped": False, "metrics": results["metrics"]}


@dataclass(frozen=True)
class Point:
    """One point of a multirun: its overrides (as Hydra's sweeper wrote them) and its folder."""

    overrides: tuple[str, ...]
    output_dir: Path


def plan(points: Sequence[Point], root: Path) -> list[Point]:
    """The points to launch: all but those done or held by a live job (each logged, and the skip written to the
    point's ``sweep.log``). Every point joins the sweep's manifest, for ``ssl-kvasir status``."""
    add_to_manifest(root, [p.output_dir for p in points])
    todo = []
    for point in points:
        status = point_status(point.output_dir)
        if status.state == "done":
            message = (
                f"skipping {point.output_dir}: {RunFolder.RESULTS} exists (delete it to run this point again)"
            )
        elif status.live:
            message = f"skipping {point.output_dir}: {status.state} ({status.detail}); not launched again"
        else:
            todo.append(point)
            continue
        log.info(message)
        with open(point.output_dir / "sweep.log", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('[%Y-%m-%d %H:%M:%S]')} {message}\n")
    return todo


def point_command(script: str, point: Point) -> list[str]:
    """The command that runs one point alone: the sweep script in Hydra's single-run mode."""
    return [sys.executable, os.path.abspath(script), *point.overrides, "hydra.mode=RUN"]


def run_local(points: Sequence[Point], script: str) -> list[tuple[Point, int]]:
    """Run ``points`` one after another, each as its own process group (:func:`point_command`), its output in
    ``<point>/point.log``; returns each point's exit status.

    Each waiting point is marked ``queued`` by this process, each running one by its own process, so that a
    second launch leaves them alone while they are live (and starts them again once they are not).
    """
    for point in points:
        point.output_dir.mkdir(parents=True, exist_ok=True)
        write_marker(point.output_dir, launcher="local", job_id=str(os.getpid()), state="queued")
    statuses = []
    for i, point in enumerate(points, 1):
        logfile = point.output_dir / POINT_LOG
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                point_command(script, point), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            write_marker(
                point.output_dir, launcher="local", job_id=str(proc.pid), state="running", log=logfile
            )
            log.info("point %d/%d: %s (pid %d, log %s)", i, len(points), point.output_dir, proc.pid, logfile)
            try:
                code = proc.wait()
            except BaseException:
                # Interrupted (Ctrl-C): the point's process group goes with this one; its marker goes stale.
                os.killpg(proc.pid, signal.SIGTERM)
                raise
        if code == 0:
            clear_marker(point.output_dir)
            log.info("point %d/%d: %s done", i, len(points), point.output_dir)
        else:
            log.error(
                "point %d/%d: %s failed (exit status %d), see %s",
                i,
                len(points),
                point.output_dir,
                code,
                logfile,
            )
        statuses.append((point, code))
    return statuses
