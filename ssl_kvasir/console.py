"""One quiet console for every entry point (``ssl-kvasir``, the sweep's points): each message once, in the
entry point's format, without the lines that say nothing about the run. ``ssl-kvasir`` logs through
:func:`setup_logging`'s one handler; a sweep's points through Hydra's."""

from __future__ import annotations

import logging
import os
import sys
import warnings

NOISE = (
    "💡 Tip",
    "litlogger",
    "TPU available",
    "HPU available",
    "Restoring states from",
    "Loaded model weights",
)
"""Substrings of third-party log lines that are dropped: advertisements, hardware we do not use, and the
checkpoint reloads that model selection does on every fit."""


class QuietThirdParty(logging.Filter):
    """Drops the log records whose message holds one of :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in NOISE)


def quiet_console() -> None:
    """Route Lightning's log lines through the root handlers (once, in their format), filter :data:`NOISE` on
    those handlers, and silence the deprecation notices of the libraries underneath (they are for those
    libraries' users' developers, not for ours).

    Call it after Lightning is imported: Lightning gives its loggers handlers of their own at import (the
    package logger always, the subpackages' when the root logger has none yet), which print every line again.
    """
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    # Under DDP, Lightning advises sync_dist=True for every metric logged at the end of an evaluation epoch.
    # Each process evaluates the whole set (no distributed sampler: methods.base), so there is nothing to
    # reduce, and the advice, once per metric and process, only misleads.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True")
    os.environ.setdefault("WANDB_QUIET", "true")  # W&B's run summary tables; its warnings still show
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, QuietThirdParty) for f in handler.filters):
            handler.addFilter(QuietThirdParty())
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lightning_logger = logging.getLogger(name)
        lightning_logger.handlers.clear()
        lightning_logger.propagate = True


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (tests and callers replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """Rich log lines on a terminal; plain, unwrapped lines (whole paths, greppable) in files and pipes.

    Every message, Lightning's included, goes through this one handler: once, in one format."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every CPU variant it tries
    quiet_console()
