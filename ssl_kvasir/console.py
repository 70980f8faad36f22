"""What a user reads: one quiet console for every entry point (``ssl-kvasir``, the sweep's points) and the
progress of long phases.

Each message is printed once, in the entry point's format, without the lines that say nothing about the run.
``ssl-kvasir`` logs through :func:`setup_logging`'s one handler; a sweep's points through Hydra's.

:class:`Progress` reports a long phase (embedding, caching, checking images) on a terminal and in a log file
alike. On a terminal a rich bar shows the count, the rate and the time left. Without one (a batch job's output
going to a file) a bar shows nothing until the end, so a log line is written instead at least every
:data:`EVERY_S` seconds and every :data:`EVERY_FRACTION` of the work, with the rate and an estimate of the
time left: embedding the 110,079 images of the archive, 6.7 minutes on one GPU, used to print nothing at all.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from types import TracebackType
from typing import Any

log = logging.getLogger("ssl_kvasir")

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


EVERY_S = 30.0
EVERY_FRACTION = 0.1


def _duration(seconds: float) -> str:
    """``1 h 05 min``, ``6 min 10 s``, ``42 s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s // 60 % 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class Progress:
    """Report the progress of ``total`` items, advanced a batch at a time.

    Use it as a context manager; :meth:`advance` after each batch. Rate and time left come from the average
    since the start, not a sliding window: work arrives in batches or whole shards, a few large steps.

    Args:
        what: the phase, in words (``embedding``, ``caching at 256 px``).
        total: how many items there are.
        unit: what an item is, for the lines (``images``).
        enabled: False reports nothing (``--no-progress``).
        closing_line: log one line with the count, time and rate when the phase ends.
    """

    def __init__(
        self, what: str, total: int, *, unit: str = "images", enabled: bool = True, closing_line: bool = False
    ):
        self.what, self.total, self.unit = what, int(total), unit
        self.enabled, self.closing_line = enabled, closing_line
        self.done = 0
        self._bar: Any = None  # a rich progress bar, on a terminal

    def __enter__(self) -> Progress:
        self.start = self._last_line = time.monotonic()
        self._next_fraction = EVERY_FRACTION
        if self.enabled and sys.stderr.isatty():
            self._bar = _rich_bar(self.what)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.what, total=self.total)
        return self

    def advance(self, n: int) -> None:
        """``n`` more items are done."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.advance(self._task, n)
            return
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 1.0
        if now - self._last_line >= EVERY_S or fraction >= self._next_fraction:
            self._last_line = now
            while self._next_fraction <= fraction:
                self._next_fraction += EVERY_FRACTION
            if self.done < self.total:
                log.info("%s", self.line(now - self.start))

    def line(self, elapsed: float) -> str:
        """``embedding: 12,288 of 110,079 images (11 %), 274 images/s, about 6 min 33 s left``."""
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f", about {_duration((self.total - self.done) / rate)} left" if rate > 0 else ""
        share = 100 * self.done / self.total if self.total else 100
        return f"{self.what}: {self.done:,} of {self.total:,} {self.unit} ({share:.0f} %), {rate:,.0f} {self.unit}/s{left}"

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, error, trace)
        if kind is None and self.enabled and self.closing_line:
            elapsed = time.monotonic() - self.start
            log.info(
                "%s: %d %s in %.1f s (%.0f %s/s)",
                self.what,
                self.done,
                self.unit,
                elapsed,
                self.done / max(elapsed, 1e-9),
                self.unit,
            )


def _rich_bar(what: str):
    """A transient rich bar on stderr: description, bar, count, average rate, elapsed time, time left."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class AverageRate(ProgressColumn):
        def render(self, task) -> Text:
            rate = task.completed / task.elapsed if task.elapsed and task.completed else None
            return Text(f"{rate:,.0f}/s" if rate else "-/s")

    class TimeLeft(ProgressColumn):
        def render(self, task) -> Text:
            if not (task.elapsed and task.completed and task.total):
                return Text("eta -:--:--")
            left = int(task.elapsed * (task.total - task.completed) / task.completed)
            return Text(f"eta {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")

    return RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        AverageRate(),
        TimeElapsedColumn(),
        TimeLeft(),
        console=Console(stderr=True),
        transient=True,
    )
