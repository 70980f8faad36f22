"""Composing the Hydra configs under ``configs/`` for the command line and for sweeps."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ssl_kvasir.errors import ConfigError


def config_dir() -> Path:
    """The ``configs/`` folder (``SSL_KVASIR_CONFIGS`` overrides it)."""
    return Path(os.environ.get("SSL_KVASIR_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``key=value`` overrides, in struct mode.

    Raises:
        ConfigError: for an unknown key, an unknown group option (listing the valid ones) or a bad override.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"arguments must be key=value overrides, got {' '.join(bad)}")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e).strip()) from None
    OmegaConf.set_struct(cfg, True)
    return cfg


def require(cfg: DictConfig, *keys: str) -> None:
    """Fail with the key's name when a mandatory value (``???``) was not given."""
    missing = [k for k in keys if OmegaConf.select(cfg, k, throw_on_missing=False) is None]
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)} (pass {missing[0]}=...)")
