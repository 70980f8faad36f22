"""Lazy imports of optional heavy dependencies, with an error that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from ssl_kvasir.errors import ConfigError


def import_optional(module: str, install: str) -> ModuleType:
    """Import ``module`` or fail with a one-line ConfigError naming the package to install.

    Args:
        module: the module to import (``faiss``, ``umap``, ...).
        install: what the user should run, e.g. ``pip install faiss-cpu``.

    Raises:
        ConfigError: when the module cannot be imported; the CLI prints it as one line.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"the optional dependency {module!r} cannot be imported ({e}); install it: {install}"
        ) from e
