"""What keeps a run folder honest: one fit at a time, no resuming someone else's run, no silent interruption.

A run folder belongs to one run. Its identity is a *fingerprint*: the settings that decide what the run
computes (data, split, budget, method, backbone, seed, schedule), and not those that only decide where it
writes, how it logs or on what hardware it runs, plus the content (a SHA-256) of every input file the run reads
besides the archive: the split file, the reviewed pseudo-label file, the backbone's weight files. The
fingerprint is written to ``run.json`` when a fit starts, carried by every checkpoint
(``checkpoint["run_fingerprint"]``) and recorded in the results; a fit that finds a folder of another run, or
an input file changed since the run started, refuses, naming the settings or the file.

A fit stopped by a signal (SIGTERM from a scheduler, Ctrl-C) ends with :class:`FitInterrupted`, which the
command line turns into exit status 128 + the signal number and one line saying that the same command resumes
from the run's ``last.ckpt``; under SLURM a fit that checkpointed and requeued its job ends with
:class:`Requeued` (exit status 143). The checkpoint at the current step is ``run.preempt``'s.

This module imports neither torch nor Lightning at import time: the command line maps its errors before any
heavy import.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from ssl_kvasir.errors import DataError, SslKvasirError
from ssl_kvasir.files import file_sha256, hold_lock
from ssl_kvasir.run.folder import RunFolder, read_results, read_run_record, write_run_record

FINGERPRINT_KEY = "run_fingerprint"

# Keys (or whole sections) that do not change what a run computes: where it writes, how it logs and on what
# hardware and with how many workers it runs. A run may be resumed with any of these changed.
NOT_DEFINING = (
    "output_dir",
    "checkpoint",
    "system",
    "logger",
    "data.cache",
    "data.num_workers",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.channels_last",
    "trainer.log_every_n_steps",
    "trainer.progress_bar",
)
# Input paths: compared as absolute paths, so that a relative spelling of the same file is the same run.
PATH_KEYS = ("data.root", "data.split_file", "data.unlabeled_root", "backbone.weights", "method.pseudo.file")
# Input files whose content is part of the fingerprint (``<key>#sha256``): editing one between a kill and the
# resume would train the rest of the run on other data.
INPUT_FILES = ("data.split_file", "method.pseudo.file", "backbone.weights")
CONTENT = "#sha256"
CHANGED = " changed since the run started (its content differs)"


class RunMismatch(SslKvasirError):
    """The output folder holds another run (its checkpoint, run.json or results.json)."""


class Requeued(BaseException):
    """Raised in every process of a fit that stopped on a pre-emption or time-limit signal under SLURM after
    writing its resume checkpoint (and, on rank 0, requeueing the job).

    Not an ``Exception``: nothing on the way may take it for a failure (submitit writes no result for the job,
    which is not over; the W&B run is not marked failed). ``ssl_kvasir.study.sweeps`` turns it into the exit that
    submitit's own handler makes, ``sys.exit(-1)``; ``ssl-kvasir fit`` into one line and exit status 143. Not a
    ``SystemExit`` either, which the run layer reads as an interruption by the user.

    Attributes:
        status: the exit status of ``ssl-kvasir fit`` (143: ended by the scheduler's signal).
    """

    status = 128 + int(signal.SIGTERM)

    def __init__(self, signame: str, step: int, job_id: str | None, resume_from: Path | None = None):
        super().__init__(signame, step, job_id, resume_from)
        self.signame, self.step, self.job_id, self.resume_from = signame, step, job_id, resume_from

    def __str__(self) -> str:
        where = f"; the requeued job resumes from {self.resume_from}" if self.resume_from else ""
        return f"{self.signame} at step {self.step}: checkpointed and requeued job {self.job_id}{where}"


class FitInterrupted(Exception):
    """A fit stopped by a signal before it finished; the same command resumes it.

    Attributes:
        signal_name: ``SIGTERM`` or ``SIGINT``.
        status: the exit status the command line ends with, 128 + the signal number (143, 130).
        resume_from: the checkpoint the same command resumes from (None: it starts again).
    """

    def __init__(self, signal_name: str, resume_from: Path | None):
        self.signal_name = signal_name
        self.status = 128 + int(getattr(signal, signal_name))
        self.resume_from = resume_from
        where = (
            f"resumes from {resume_from}"
            if resume_from
            else "starts it again (no checkpoint was written yet)"
        )
        super().__init__(f"interrupted by {signal_name}; the same command {where}")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _absolute(value: Any) -> Any:
    if isinstance(value, str) and value:
        return str(Path(value).expanduser().absolute())
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    return value


_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | Path) -> str | None:
    """``sha256:<hex>`` of a file's content (``None`` when there is no such file: loading it will say so),
    computed once per process for a given size and modification time (a fit asks for its fingerprint often)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def fingerprint(config: Any) -> dict[str, Any]:
    """The settings that define a run, as a flat ``{"data.fold": 0, ...}`` dict of plain values, and the content
    of its input files (``"data.split_file#sha256": "<hex>"``).

    Args:
        config: a composed run config (a ``DictConfig``) or its resolved container.
    """
    from omegaconf import DictConfig, OmegaConf

    tree = (
        cast("dict[str, Any]", OmegaConf.to_container(config, resolve=True))
        if isinstance(config, DictConfig)
        else config
    )
    flat = _flatten(tree)
    kept = {
        k: (_absolute(v) if k in PATH_KEYS else v)
        for k, v in flat.items()
        if not any(k == skip or k.startswith(f"{skip}.") for skip in NOT_DEFINING)
    }
    for key in INPUT_FILES:
        value = flat.get(key)
        if value:
            paths = value if isinstance(value, list) else [value]
            kept[key + CONTENT] = (
                [file_hash(p) for p in paths] if isinstance(value, list) else file_hash(value)
            )
    return dict(sorted(kept.items()))


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: recorded -> current`` for every key both sides have whose value differs; for an input file whose
    content changed, ``<key> <path> changed since the run started``.

    A key only one side has is not compared: a method's own keys differ with the method, whose name is
    compared, and a key that a newer version of ssl_kvasir added (with the former behaviour as its default)
    must not strand the runs started before it.
    """
    found = []
    for key in sorted(set(recorded) & set(current)):
        if recorded[key] == current[key]:
            continue
        if key.endswith(CONTENT):
            name = key.removesuffix(CONTENT)
            found.append(f"{name} {current.get(name)}{CHANGED}")
        else:
            found.append(f"{key}: {json.dumps(recorded[key])} -> {json.dumps(current[key])}")
    return found


def _refuse(out: Path, what: str, diff: list[str]) -> RunMismatch:
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    if all(line.endswith(CHANGED) for line in diff):
        # Same settings, an input file edited since the run started: resuming would mix the two versions.
        return RunMismatch(
            f"{what}: {shown}; put the file back as it was to resume, or start afresh with another "
            f"output_dir (or delete {out})"
        )
    return RunMismatch(
        f"{what} is of another run ({shown}); to start afresh use another output_dir, or delete {out}"
    )


def unreadable_checkpoint(error: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line.

    Not torch's own text for a refused object: it goes on for lines and suggests ``weights_only=False``,
    which would run whatever code the file holds.
    """
    import pickle

    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return (
            "it holds objects other than tensors and plain data, which are not loaded (that would run code)"
        )
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"it is damaged or not a checkpoint ({type(error).__name__}: {first})"


def checkpoint_fingerprint(path: Path) -> dict[str, Any] | None:
    """The fingerprint a checkpoint carries (None when it was written without one).

    Raises:
        DataError: naming the file, when it cannot be read as a checkpoint (corrupt, truncated, or holding
            objects that loading as data refuses).
    """
    import torch

    try:
        # mmap: only the small dict is read, not the tensors; weights_only: a checkpoint is data, never code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds; each is the same one-line answer
        raise DataError(
            f"cannot read checkpoint {path}: {unreadable_checkpoint(e)}; delete it to start the run afresh"
        ) from None
    if not isinstance(ckpt, dict):
        raise DataError(f"{path} is not an ssl_kvasir checkpoint; delete it to start the run afresh")
    found = ckpt.get(FINGERPRINT_KEY)
    return dict(found) if isinstance(found, Mapping) else None


def check_checkpoint(path: Path, current: Mapping[str, Any], out: Path) -> None:
    """Refuse to resume from ``path`` unless it carries ``current``'s fingerprint.

    Raises:
        RunMismatch: when its fingerprint differs or is absent.
        DataError: when it cannot be read.
    """
    recorded = checkpoint_fingerprint(path)
    if recorded is None:
        raise RunMismatch(
            f"checkpoint {path} carries no run fingerprint, so it may be another run's; "
            f"to start afresh use another output_dir, or delete {out}"
        )
    diff = differences(recorded, current)
    if diff:
        raise _refuse(out, f"checkpoint {path}", diff)


def check_folder(folder: RunFolder, current: Mapping[str, Any], results: Path) -> None:
    """Refuse a run folder that holds another run: its results record ``results``, ``run.json`` or
    ``last.ckpt`` (the checkpoints of a method's later stages are checked by each stage).

    Raises:
        RunMismatch: naming the file and the keys that differ.
        DataError: when one of them cannot be read, or is of an older format.
    """
    out = folder.root
    if results.exists():
        recorded = read_results(results).get("fingerprint")
        if isinstance(recorded, Mapping) and (diff := differences(recorded, current)):
            raise _refuse(out, str(results), diff)
    if folder.run_record.exists() and (diff := differences(read_run_record(folder), current)):
        raise _refuse(out, str(folder.run_record), diff)
    if folder.last.exists():
        check_checkpoint(folder.last, current, out)


def _rank_zero() -> bool:
    """Whether this process is the first of a distributed fit (or the only one)."""
    return all(
        int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    )


@contextlib.contextmanager
def run_folder(folder: RunFolder, current: Mapping[str, Any]) -> Iterator[None]:
    """Own ``folder`` for one fit: check that it holds no other run, lock it (first process of a distributed
    fit only) and release the lock when the fit ends. :func:`begin` records the run once it is sure to start.

    Raises:
        RunMismatch, DataError: from :func:`check_folder`.
        FolderLocked: when another fit holds the folder.
    """
    check_folder(folder, current, folder.results)
    if not _rank_zero():
        yield
        return
    with hold_lock(folder.root, f"ssl-kvasir fit into {folder.root}"):
        # Again: a fit that held the lock may have just written.
        check_folder(folder, current, folder.results)
        yield


def begin(folder: RunFolder, current: Mapping[str, Any]) -> None:
    """Record the fingerprint in ``run.json`` (first process only), once the run's data have passed
    :func:`check_experiment`: a run refused before training leaves no record that would refuse its
    corrected command."""
    if _rank_zero() and not folder.run_record.exists():
        write_run_record(folder, current)


def check_experiment(exp, cfg) -> None:
    """Refuse, before any training, a run that could only fail or mislead later.

    - An empty evaluation fold (a split file whose fold ``data.fold`` has no row): the run would train to
      the end and then have nothing to test on.
    - Without a cache, an image that cannot be used: each image the run reads is checked structurally
      (:func:`ssl_kvasir.data.archive.inspect_image` without decoding: empty, not an image, oversized, cut
      short), in ``data.num_workers`` processes, and the run is refused with the files named. Refusing is the
      cheaper honest choice: leaving files out (as ``prepare`` does) would change the split behind the
      config's back, and ``prepare`` already offers that, with every file listed. Damage inside a complete
      file is found only by decoding it all (``ssl-kvasir check``); training then stops at that file, naming
      it.

    Args:
        exp: the run's :class:`~ssl_kvasir.run.experiment.Experiment`.
        cfg: the run config.

    Raises:
        DataError: naming the fold or the files.
    """
    import numpy as np

    from ssl_kvasir.data.archive import inspect_images
    from ssl_kvasir.data.splits import unlabeled_pool

    d = cfg.data
    if len(exp.split.test) == 0:
        where = f"split file {d.split_file}" if d.split_file else "the folds"
        raise DataError(
            f"evaluation fold data.fold={d.fold} holds no image in {where}; choose another data.fold "
            "(`ssl-kvasir check` lists the folds)"
        )
    if d.cache:
        return  # the cache records what prepare could not decode; load_experiment left those out
    split = exp.split
    pool = unlabeled_pool(split, d.use_archive_unlabeled, d.unlabeled_rest)
    rows = np.unique(np.concatenate([split.labeled, split.val, split.test, pool]))
    paths = list(exp.catalog.images.path.to_numpy()[rows])
    bad = inspect_images(exp.catalog.root, paths, decode=False, workers=d.num_workers)
    if bad:
        shown = "; ".join(list(bad.values())[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DataError(
            f"{len(bad)} images of {exp.catalog.root} cannot be used ({shown}); remove them, or build a cache "
            "with `ssl-kvasir prepare` (which leaves them out, each listed) and pass data.cache=DIR"
        )


def fingerprint_callback(current: Mapping[str, Any]):
    """A Lightning callback that writes ``current`` into every checkpoint under ``run_fingerprint``."""
    from lightning.pytorch.callbacks import Callback

    class RunFingerprint(Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
            checkpoint[FINGERPRINT_KEY] = dict(current)

    return RunFingerprint()


@contextlib.contextmanager
def interruptions(trainer, last: Path) -> Iterator[None]:
    """Turn a fit that Lightning stopped on a signal into :class:`FitInterrupted`.

    Lightning catches both signals itself: on SIGTERM its signal connector raises ``SIGTERMException`` (a
    ``SystemExit`` whose status is 0) at the next batch; on Ctrl-C it shuts down and calls ``sys.exit(1)``.
    Neither tells the user that the run can be resumed, and the first reports success. A SIGTERM sent to the
    whole process group (``kill -TERM -PGID``, a container or job step being stopped) also ends the DataLoader
    workers, and the fit fails with "DataLoader worker exited unexpectedly" before Lightning's check: an error
    after Lightning has recorded a SIGTERM is that signal too.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stopped(signal_name: str) -> FitInterrupted:
        _expect_worker_exits()
        return FitInterrupted(signal_name, last if last.exists() else None)

    try:
        yield
    except FitInterrupted:
        # run.preempt's checkpoint at the step, written on the signal.
        _expect_worker_exits()
        raise
    except SIGTERMException:
        raise stopped("SIGTERM") from None
    except SystemExit:
        if trainer.interrupted:
            raise stopped("SIGINT") from None
        raise
    except Exception:
        if getattr(trainer, "received_sigterm", False):
            raise stopped("SIGTERM") from None
        # A signal that run.preempt recorded (it owns SIGTERM and SIGINT while training) but that ended the
        # DataLoader workers before the next step could be checkpointed.
        callbacks = getattr(trainer, "callbacks", [])
        received = [cb.received for cb in callbacks if getattr(cb, "received", None) is not None]
        if received:
            raise stopped(received[0].name) from None
        raise


def _expect_worker_exits() -> None:
    """The fit is over, and the signal that ended it may have ended its DataLoader workers too: their exits
    are expected. torch's SIGCHLD handler would otherwise raise "DataLoader worker is killed by signal" from
    the loader's ``__del__`` when the loader is collected, which Python prints as an ignored exception with a
    traceback. The default action (ignore) is restored; a later loader in this process still notices a dead
    worker, by polling."""
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
