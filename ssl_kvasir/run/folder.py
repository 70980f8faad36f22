"""A run's folder: the name of every file a run keeps, and the two records it writes (results and identity).

::

    <run>/
        results.json            the finished run's results record (format ``ssl_kvasir.results/1``)
        run.json                what the run is: its fingerprint (format ``ssl_kvasir.run/1``), written when
                                the fit starts, and its tracking id (its W&B runs' ids derive from it)
        progress.json           step, epoch and time while the fit trains (``ssl-kvasir status``)
        checkpoints/last.ckpt   the resume point
        checkpoints/best.ckpt   the model selection's choice, which the final test scores
        confusion_matrix.png    the evaluation fold's confusion matrix
        evaluation.json         ``ssl-kvasir evaluate``'s record (the results format)
        .lock                   held by the fit that writes the folder
        <stage>/                a stage of a method that trains in several (self-training's ``round_<r>``): a
                                run folder of its own whose record is ``stage_results.json``, so that sweeps
                                and curves count the whole run once

A run refers to its own files by paths relative to its folder (``"checkpoint": "checkpoints/best.ckpt"``), so a
run folder can be moved or copied and resumed where it lands.

A results record is written by :func:`write_results` and read by :func:`read_results`, nowhere else: the
reader checks the format and every field that a reader of results relies on, so that a damaged or old file is
one line naming it, never a ``KeyError`` later. The record is open: fields it does not know are kept.

This module imports neither torch nor Lightning: the study reads results through it.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.files import LOCK_FILE, atomic_write_json
from ssl_kvasir.names import LabelBudget

RESULTS_FORMAT = "ssl_kvasir.results/1"
"""The format of results records this version writes and reads."""
RUN_FORMAT = "ssl_kvasir.run/1"
"""The format of the ``run.json`` identity record this version writes and reads."""


@dataclass(frozen=True)
class RunFolder:
    """The files of one run (or of one stage of a run), by name.

    Attributes:
        root: the run's folder.
    """

    root: Path

    RESULTS = "results.json"
    STAGE_RESULTS = "stage_results.json"
    RUN_RECORD = "run.json"
    PROGRESS = "progress.json"
    EVALUATION = "evaluation.json"
    CONFUSION_MATRIX = "confusion_matrix.png"
    CHECKPOINTS = "checkpoints"
    LAST = "last"
    BEST = "best"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def results(self) -> Path:
        """The finished run's results record."""
        return self.root / self.RESULTS

    @property
    def stage_results(self) -> Path:
        """A finished stage's results record (a stage is not a run of its own for sweeps and curves)."""
        return self.root / self.STAGE_RESULTS

    @property
    def run_record(self) -> Path:
        """``run.json``: the run's fingerprint, from the moment its fit starts."""
        return self.root / self.RUN_RECORD

    @property
    def progress(self) -> Path:
        return self.root / self.PROGRESS

    @property
    def evaluation(self) -> Path:
        return self.root / self.EVALUATION

    @property
    def confusion_matrix(self) -> Path:
        return self.root / self.CONFUSION_MATRIX

    @property
    def checkpoints(self) -> Path:
        """The checkpoints' folder."""
        return self.root / self.CHECKPOINTS

    @property
    def last(self) -> Path:
        """The resume point, ``checkpoints/last.ckpt``."""
        return self.checkpoints / f"{self.LAST}.ckpt"

    @property
    def best(self) -> Path:
        """The model selection's choice, ``checkpoints/best.ckpt``."""
        return self.checkpoints / f"{self.BEST}.ckpt"

    @property
    def lock(self) -> Path:
        """The lock file of the fit that writes the folder (``ssl_kvasir.files.hold_lock``)."""
        return self.root / LOCK_FILE

    def stage(self, name: str) -> RunFolder:
        """The folder of one stage of the run (``round_0``)."""
        return RunFolder(self.root / name)

    def relative(self, path: str | Path) -> str:
        """``path``, a file of this folder, as the folder refers to it: relative, with forward slashes."""
        return Path(path).relative_to(self.root).as_posix()

    def resolve(self, reference: str | Path) -> Path:
        """The file that a reference stored in this folder's records names (relative to the folder)."""
        return self.root / reference


# ---- the results record -------------------------------------------------------------------------------------
def is_number(value: object) -> bool:
    """A finite int or float (JSON booleans are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_results(path: Path, record: Mapping[str, Any]) -> None:
    """Write a results record (``format`` first), atomically.

    Raises:
        OSError: naming ``path`` when it cannot be written.
    """
    atomic_write_json(path, {"format": RESULTS_FORMAT, **{k: v for k, v in record.items() if k != "format"}})


def read_results(path: Path) -> dict:
    """A results record, checked: its format, and every field that readers rely on.

    Checked: ``method``, ``backbone`` (non-empty strings), ``fold`` (integer >= 0), ``seed`` (integer),
    ``data_seed`` (integer or null), ``label_budget`` (a :class:`~ssl_kvasir.names.LabelBudget` record),
    ``n_labeled`` (integer), ``classes`` (distinct names), ``metrics`` (finite numbers by name),
    ``confusion_matrix`` (C x C non-negative counts), ``checkpoint`` (a path or null). Other fields are kept
    as they are.

    Raises:
        DataError: one line naming the file, and what is wrong: not JSON, not of this format (an older
            unversioned file says so), or the field that is missing or malformed.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_bytes())
    except OSError as e:
        raise DataError(f"cannot read results file {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"results file {path} is not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise _bad(path, f"expected a JSON object, got {type(record).__name__}")
    found = record.get("format")
    if found != RESULTS_FORMAT:
        which = (
            "an unversioned results file (written before ssl_kvasir.results/1)"
            if found is None
            else f"of format {found!r}"
        )
        raise DataError(
            f"results file {path} is {which}; this version reads {RESULTS_FORMAT}: run it again "
            "(delete the file) with this version"
        )
    _check_results(path, record)
    return record


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"results file {path}: {what}")


def _check_results(path: Path, r: dict) -> None:
    required = (
        "method",
        "backbone",
        "fold",
        "seed",
        "label_budget",
        "n_labeled",
        "classes",
        "metrics",
        "confusion_matrix",
    )
    for key in required:
        if key not in r:
            raise _bad(path, f"missing field {key!r}")
    for key in ("method", "backbone"):
        if not isinstance(r[key], str) or not r[key].strip():
            raise _bad(path, f"{key!r} must be a non-empty string, got {r[key]!r}")
    if not is_integer(r["fold"]) or r["fold"] < 0:
        raise _bad(path, f"'fold' must be a non-negative integer, got {r['fold']!r}")
    if not is_integer(r["seed"]):
        raise _bad(path, f"'seed' must be an integer, got {r['seed']!r}")
    if r.get("data_seed") is not None and not is_integer(r["data_seed"]):
        raise _bad(path, f"'data_seed' must be an integer or null, got {r['data_seed']!r}")
    try:
        LabelBudget.from_record(r["label_budget"])
    except ConfigError as e:
        raise _bad(path, f"'label_budget': {e}") from None
    if not is_integer(r["n_labeled"]) or r["n_labeled"] < 0:
        raise _bad(path, f"'n_labeled' must be a non-negative integer, got {r['n_labeled']!r}")
    classes = r["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise _bad(path, "'classes' must be a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise _bad(path, "'classes' names a class twice")
    metrics = r["metrics"]
    if not isinstance(metrics, dict):
        raise _bad(path, f"'metrics' must be an object, got {type(metrics).__name__}")
    for key, value in metrics.items():
        if not is_number(value):
            raise _bad(path, f"metrics.{key} must be a finite number, got {value!r}")
    n = len(classes)
    try:
        # One array, not a Python check per cell: a sweep's curves read thousands of 23 x 23 matrices.
        cm = np.asarray(r["confusion_matrix"])
    except ValueError:  # ragged rows
        cm = None
    if cm is None or cm.shape != (n, n) or cm.dtype.kind != "i" or (cm < 0).any():
        raise _bad(
            path,
            f"'confusion_matrix' must be {n}x{n} non-negative integer counts (one row and column per class)",
        )
    if r.get("checkpoint") is not None and not isinstance(r["checkpoint"], str):
        raise _bad(path, f"'checkpoint' must be a path or null, got {r['checkpoint']!r}")


# ---- the identity record -------------------------------------------------------------------------------------
def write_run_record(folder: RunFolder, fingerprint: Mapping[str, Any]) -> None:
    """Write ``run.json``: the run's fingerprint, and a tracking id drawn at random once, when the run starts.

    The tracking id names the run's W&B runs (:func:`ssl_kvasir.run.tracking.wandb_logger`), so it travels with
    the folder: a run moved or copied elsewhere and resumed continues its W&B run, and two folders of the same
    settings (a repeat) are two W&B runs.
    """
    record = {"format": RUN_FORMAT, "fingerprint": dict(fingerprint), "tracking_id": secrets.token_hex(8)}
    atomic_write_json(folder.run_record, record)


def read_run_record(folder: RunFolder) -> dict[str, Any]:
    """The fingerprint that ``run.json`` records.

    Raises:
        DataError: naming the file when it cannot be read, is of another format, or holds no fingerprint.
    """
    return dict(_run_record(folder)["fingerprint"])


def read_tracking_id(folder: RunFolder) -> str | None:
    """The tracking id that ``run.json`` records; ``None`` when the folder has no ``run.json`` yet (or one
    written before run records carried it).

    Raises:
        DataError: as :func:`read_run_record`.
    """
    if not folder.run_record.exists():
        return None
    tracking_id = _run_record(folder).get("tracking_id")
    return tracking_id if isinstance(tracking_id, str) and tracking_id else None


def _run_record(folder: RunFolder) -> dict[str, Any]:
    path = folder.run_record
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; delete it to start the run afresh") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a run record; delete it to start the run afresh")
    if data.get("format") != RUN_FORMAT:
        which = "an unversioned run record" if data.get("format") is None else f"of format {data['format']!r}"
        raise DataError(
            f"{path} is {which}; this version reads {RUN_FORMAT}: delete the run folder's files to start afresh"
        )
    if not isinstance(data.get("fingerprint"), Mapping):
        raise DataError(f"{path} holds no fingerprint; delete it to start the run afresh")
    return data
