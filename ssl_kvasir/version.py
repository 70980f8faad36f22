"""The code version recorded with every result: package version + git commit (+ ``-dirty``)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__version__ = "0.1.0"


def _git(*args: str) -> str:
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5
    ).stdout.strip()


@functools.cache
def code_version() -> str:
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        if not sha:
            return __version__
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha}{'-dirty' if dirty else ''}"
