"""The one benchmark harness: timing, synthetic FixMatch batches, the ``--quick`` parser and the closing line.

Every script in ``bench/`` measures a baseline and our code side by side on this (shared) machine and ends
with one line of the form::

    <benchmark>: <what> = <value> (target <op> <target>: met)

or ``... : NOT met)``, so that a reader, and ``make bench``, which collects these lines from every script,
sees at once whether each target holds. A benchmark that decides a comparison over seeds prints one such line
per system compared, with the paired gain's standard error (:func:`gain_line`):
``<benchmark>: <what> = +0.019 ± 0.016 (target >= +0.02 and >= 2 se: NOT met)``. A target that cannot be measured here (no GPU) says so in the same
place: ``(target >= 1.3: not measured, no CUDA device)``.

Timing on a shared machine: the best of a few runs (:func:`best_of`) is the run that was least disturbed;
when two callables are compared, running them alternately and taking the median of the per-round ratios
(:func:`paired_medians`) cancels the load that both saw in the same round.

The scripts run as ``python bench/bench_x.py``, which puts ``bench/`` on the import path: they import this
module as ``harness``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda value, target: value >= target,
    ">": lambda value, target: value > target,
    "<=": lambda value, target: value <= target,
    "<": lambda value, target: value < target,
}


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Run ``fn`` ``repeat`` times; the shortest wall time (seconds) and the last result.

    The shortest run is the one another process disturbed least; the work itself does not get faster.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    best, out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


@dataclass(frozen=True)
class Paired:
    """Two contenders timed in alternation.

    Attributes:
        ratio: the median over rounds of ``time_a / time_b``: how many times faster ``b`` ran than ``a``
            (above 1: ``b`` is faster).
        median_a: the median time of ``a`` (seconds).
        median_b: the median time of ``b`` (seconds).
        rounds: the number of rounds the medians are over.
    """

    ratio: float
    median_a: float
    median_b: float
    rounds: int


def paired_summary(times_a: Sequence[float], times_b: Sequence[float]) -> Paired:
    """:class:`Paired` from two equally long lists of times measured round by round, ``a`` then ``b``."""
    if len(times_a) != len(times_b) or not times_a:
        raise ValueError(f"need two equally long non-empty lists, got {len(times_a)} and {len(times_b)}")
    return Paired(
        ratio=statistics.median(a / b for a, b in zip(times_a, times_b, strict=True)),
        median_a=statistics.median(times_a),
        median_b=statistics.median(times_b),
        rounds=len(times_a),
    )


def paired_medians(fa: Callable[[], Any], fb: Callable[[], Any], rounds: int = 5) -> Paired:
    """Time ``fa`` and ``fb`` alternately, ``rounds`` times each (``a`` first: put the baseline there).

    Each round runs both under nearly the same load of the machine, so the median of the per-round ratios is
    steadier than the ratio of two independently measured times.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    times_a, times_b = [], []
    for _ in range(rounds):
        for fn, times in ((fa, times_a), (fb, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return paired_summary(times_a, times_b)


def fixmatch_batches(
    n: int,
    batch_size: int,
    mu: int,
    image_size: int,
    num_classes: int = 23,
    num_unlabeled: int = 10_000,
    num_labeled: int = 1_000,
    known_fraction: float = 0.5,
    seed: int = 0,
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """``n`` FixMatch training batches shaped like the DataModule's, filled with seeded noise.

    The content does not change the work of a step. Keys as the DataModule serves them: ``lb`` with ``weak``,
    ``label``, ``pos``, ``index``; ``ulb`` with ``weak``, ``strong``, ``label`` (-1 where the image's class is
    unknown), ``index`` and ``pos`` (the position in the unlabeled pool, which class-adaptive masking uses).

    Args:
        n: number of batches.
        batch_size: labeled images per batch (B).
        mu: unlabeled images per labeled image.
        image_size: side of the square images.
        num_classes: C.
        num_unlabeled: size of the unlabeled pool that ``pos`` indexes.
        num_labeled: size of the labeled set.
        known_fraction: share of unlabeled images with a known class (the training fold's unselected labeled
            images in a real run; about half).
        seed: seed of the noise.
    """
    import torch  # here, not at the top: the benchmarks without a network do not pay for importing torch

    g = torch.Generator().manual_seed(seed)
    shape = (3, image_size, image_size)
    n_ulb = mu * batch_size
    batches = []
    for _ in range(n):
        pos_lb = torch.randint(0, num_labeled, (batch_size,), generator=g)  # (B,)
        pos = torch.randint(0, num_unlabeled, (n_ulb,), generator=g)  # (mu B,)
        known = torch.rand(n_ulb, generator=g) < known_fraction  # (mu B,)
        batches.append(
            {
                "lb": {
                    "weak": torch.randn(batch_size, *shape, generator=g),  # (B, 3, H, W)
                    "label": torch.randint(0, num_classes, (batch_size,), generator=g),  # (B,)
                    "pos": pos_lb,
                    "index": pos_lb,  # (B,) catalog rows: the labeled images come first
                },
                "ulb": {
                    "weak": torch.randn(n_ulb, *shape, generator=g),  # (mu B, 3, H, W)
                    "strong": torch.randn(n_ulb, *shape, generator=g),  # (mu B, 3, H, W)
                    "label": torch.where(
                        known, torch.randint(0, num_classes, (n_ulb,), generator=g), torch.full((n_ulb,), -1)
                    ),  # (mu B,)
                    "pos": pos,
                    "index": num_labeled + pos,  # (mu B,) catalog rows: the pool follows the labeled images
                },
            }
        )
    return batches


def bare_trainer(steps: int, callbacks: Sequence[Any] = ()):
    """A one-process CPU Trainer that only trains ``steps`` steps: no logger, checkpoint, progress bar, model
    summary or validation (the comparisons evaluate the module themselves)."""
    import lightning as L

    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )


class Replay:
    """Pre-built batches as a loader (Lightning takes any iterable with a length; a plain list would read as
    a list of loaders)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self) -> Iterator[dict]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def parser(doc: str | None, quick: str) -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: its description, and ``--quick`` (the short form
    ``make bench`` runs), whose help says what it shortens."""
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--quick", action="store_true", help=quick)
    return p


def closing_line(
    benchmark: str,
    what: str,
    value: float | None,
    op: str,
    target: float,
    digits: int = 2,
    unmeasured: str = "",
    signed: bool = False,
) -> str:
    """Print and return the benchmark's one closing line.

    ``<benchmark>: <what> = <value> (target <op> <target>: met)`` or ``...: NOT met)``; with ``value`` None
    (nothing could be measured here), ``<value>`` is ``n/a`` and the verdict is ``not measured, <unmeasured>``.

    Args:
        benchmark: the benchmark's short name (``prepare``, ``umap``...).
        what: the quantity (``1280x1024 speed-up over naive``).
        value: the measured value, or None when it could not be measured here.
        op: ``>=``, ``>``, ``<=`` or ``<``.
        target: the value it must reach.
        digits: decimals of the printed value.
        unmeasured: why there is no value (required with ``value=None``).
        signed: print value and target with their sign (a gain: ``+0.035``, target ``+0.03``).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if value is None:
        if not unmeasured:
            raise ValueError("a closing line without a value needs the reason (unmeasured=...)")
        line = f"{benchmark}: {what} = n/a (target {op} {target:{'+' if signed else ''}g}: not measured, {unmeasured})"
    else:
        verdict = "met" if math.isfinite(value) and OPS[op](value, target) else "NOT met"
        sign = "+" if signed else ""
        line = f"{benchmark}: {what} = {value:{sign}.{digits}f} (target {op} {target:{sign}g}: {verdict})"
    print(line, flush=True)
    return line


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for one value: no spread to estimate)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), se


def gain_line(
    benchmark: str, what: str, gains: Sequence[float], op: str, target: float, min_se: float | None = None
) -> str:
    """Print and return the closing line of a paired comparison over seeds.

    ``<benchmark>: <what> = <mean> ± <se> (target <op> <target>[ and >= <min_se> se]: met|NOT met)``: the mean
    of the per-seed ``gains`` must satisfy ``op target`` and, with ``min_se``, also be at least ``min_se``
    standard errors above zero (one seed has no standard error, so such a target cannot be met by one seed).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    mean, se = mean_se(gains)
    met = math.isfinite(mean) and OPS[op](mean, target)
    wanted = f"{target:+g}" if target else "0"
    if min_se is not None:
        met = met and se is not None and mean >= min_se * se
        wanted += f" and >= {min_se:g} se"
    spread = f"{se:.3f}" if se is not None else "n/a"
    line = (
        f"{benchmark}: {what} = {mean:+.3f} ± {spread} (target {op} {wanted}: {'met' if met else 'NOT met'})"
    )
    print(line, flush=True)
    return line
