"""The pieces of a label-efficiency sweep that run inside each job (``experiments/sweep.py``).

Importing this module registers the OmegaConf resolvers that ``configs/sweep.yaml`` uses to name a run's
folder. It lives in the library, not in the script, so that a job unpickled on a SLURM node (or by submitit's
local executor) imports it, and with it the resolvers, before its config is composed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ssl_kvasir.errors import ConfigError
from ssl_kvasir.names import backbone_id, budget_id
from ssl_kvasir.results import RESULTS_NAME

log = logging.getLogger("ssl_kvasir.sweep")


def register_resolvers() -> None:
    """``${label_budget:fraction,per_class}`` and ``${backbone_id:name,head}`` for config files."""
    OmegaConf.register_new_resolver("label_budget", budget_id, replace=True)
    OmegaConf.register_new_resolver("backbone_id", backbone_id, replace=True)


register_resolvers()


def match_launcher(cfg: DictConfig, launcher: DictConfig) -> None:
    """Under the SLURM launcher, make the trainer span the job's processes: one per task on each node.

    Lightning's SLURM environment checks that ``devices x num_nodes`` equals the job's task count, so the
    trainer must agree with ``hydra.launcher.tasks_per_node`` and ``hydra.launcher.nodes``.

    Raises:
        ConfigError: when ``trainer.devices`` or ``trainer.num_nodes`` was set to something else.
    """
    if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
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
    done = out / RESULTS_NAME
    if done.exists():
        log.info("skipping %s: %s exists (delete it to run this point again)", out, RESULTS_NAME)
        return {"output_dir": str(out), "skipped": True, "metrics": None}
    if launcher is not None:
        match_launcher(cfg, launcher)
    # Imported only for a run to fit: a skipped point costs no torch import.
    from ssl_kvasir.run.train import fit

    log.info("fitting %s", out)
    # Each fit closes its own W&B run (run.train.one_tracking_run), so the points of a local sweep, which share
    # this process, log into runs of their own.
    results = fit(cfg)
    return {"output_dir": str(out), "skipped": False, "metrics": results["metrics"]}
