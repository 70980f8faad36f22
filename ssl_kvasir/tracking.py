"""Experiment tracking conventions: W&B groups and tags that make label-efficiency curves a group-by."""

from __future__ import annotations

import os
from pathlib import Path

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
