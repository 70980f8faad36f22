"""Experiment tracking conventions: W&B names, groups, job types and tags that make label-efficiency curves a
group-by.

A sweep point's W&B run is named ``<method>-<backbone>-<budget>-fold<k>-seed<s>`` and belongs to the group
``<method>-<backbone>-<budget>`` (the runs that differ only by fold and seed). A method that trains in stages
(self-training's rounds) logs one run per stage, named with ``-round<r>``, with ``round`` in its config and a
``job_type``: ``teacher`` (round 0, labeled images only), ``student`` (a later round whose model teaches the
next), ``final`` (the last round, whose metrics are the point's). Only the final stage joins the point's group;
the others go to ``<group>-rounds``, so "group by Group" averages one run per point. A single-stage fit has
``job_type`` ``train``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ssl_kvasir.names import backbone_id, budget_id


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


def label_budget(cfg: DictConfig) -> str:
    return budget_id(cfg.data.label_fraction, cfg.data.labels_per_class)


def run_group(cfg: DictConfig) -> str:
    """Runs that differ only by fold and seed share a group: ``<method>-<backbone>-<budget>``."""
    return f"{cfg.method.name}-{backbone_id(cfg.backbone.name, cfg.backbone.head)}-{label_budget(cfg)}"


def run_tags(cfg: DictConfig) -> list[str]:
    return [
        cfg.method.name,
        backbone_id(cfg.backbone.name, cfg.backbone.head),
        label_budget(cfg),
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
