"""Hydra launchers of the label-efficiency sweep (``hydra/launcher=local`` and ``hydra/launcher=slurm``).

Hydra takes launchers only from the ``hydra_plugins`` namespace package; this folder adds to it when the sweep
runs as ``python experiments/sweep.py`` (the script's folder is on ``sys.path``). The launchers decide only what
to start and how; what a point is, what is done or live, and how a point runs alone are
``ssl_kvasir.study.sweeps``'s and ``ssl_kvasir.study.status``'s.

- :class:`PointLauncher` (local): every point not done and not live, one after another, each as its own process
  (``ssl_kvasir.study.sweeps.run_local``), so a multi-GPU point is one DDP job whose ranks re-run that point only.
- :class:`SlurmPointLauncher`: the same points as one SLURM array through submitit (the job script is
  hydra-submitit-launcher's), a ``job.json`` marker with the job id in each point's folder; with
  ``hydra.launcher.wait=false`` it returns once the array is submitted (``make pretrain WAIT=0``), otherwise it waits for the array to end.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, OmegaConf

from ssl_kvasir.study.status import write_marker
from ssl_kvasir.study.sweeps import Point, plan, run_local

log = logging.getLogger(__name__)


def _points(launcher, job_overrides: Sequence[Sequence[str]]) -> list[Point]:
    points = []
    for overrides in job_overrides:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        points.append(Point(tuple(overrides), Path(str(cfg.output_dir)).resolve()))
    return points


def _failed(message: str) -> JobReturn:
    ret = JobReturn()
    ret.status = JobStatus.FAILED
    ret._return_value = RuntimeError(message)
    return ret


class PointLauncher(Launcher):
    """Each point of the multirun as its own local process, one after another."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        root = Path(str(self.config.hydra.sweep.dir))
        root.mkdir(parents=True, exist_ok=True)
        points = _points(self, job_overrides)
        todo = plan(points, root)
        log.info("Launching %d of %d points locally, each in its own process", len(todo), len(points))
        failed = [(p, code) for p, code in run_local(todo, sys.argv[0]) if code != 0]
        if failed:
            listed = "; ".join(f"{p.output_dir} (exit status {code})" for p, code in failed)
            return [_failed(f"{len(failed)} of {len(todo)} points failed: {listed}")]
        return []


class SlurmPointLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher that submits only the points to do, marks them with their job
    ids, and waits for them only when ``hydra.launcher.wait`` is true (``ssl_kvasir.study.sweeps.SweepSlurmConf``)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        root = Path(str(self.config.hydra.sweep.dir))
        root.mkdir(parents=True, exist_ok=True)
        points = _points(self, job_overrides)
        todo = plan(points, root)
        if not todo:
            log.info("nothing to submit: all %d points are done, queued or running", len(points))
            return []
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]},
        )
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                (k if k in common else f"{self._EXECUTOR}_{k}"): v
                for k, v in self.params.items()
                if k not in ("submitit_folder", "max_num_timeout", "wait")
            }
        )
        # The callable that runs on the nodes is the stock launcher (installed there), not this class (which is
        # importable only where experiments/ is on the path).
        worker = SlurmLauncher(**self.params)
        worker.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        arguments = []
        for i, point in enumerate(todo):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(point.overrides)))
            arguments.append(
                (list(point.overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", _singletons())
            )
        jobs = executor.map_array(worker, *zip(*arguments, strict=True))
        for point, job in zip(todo, jobs, strict=True):
            point.output_dir.mkdir(parents=True, exist_ok=True)
            write_marker(
                point.output_dir, launcher="slurm", job_id=job.job_id, state="queued", log=job.paths.stderr
            )
        log.info(
            "submitted %d of %d points as SLURM jobs %s; `make status OUT=%s` tells where they stand",
            len(todo),
            len(points),
            ", ".join(j.job_id for j in jobs),
            root,
        )
        if not self.params["wait"]:
            return []
        return [job.results()[0] for job in jobs]


def _singletons():
    from hydra.core.singleton import Singleton

    return Singleton.get_state()
