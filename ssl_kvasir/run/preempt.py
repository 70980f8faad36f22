"""Pre-emption, time limits and interruptions: one owner for each signal, a checkpoint at the current step, a
requeue under SLURM, and an exact resume.

A SLURM job learns that it must stop in two ways:

- before its time limit, from the signal named in ``sbatch --signal``: submitit writes ``--signal=USR2@120``
  (``SUBMITIT_PREEMPT_SIGNAL`` changes it), so USR2 arrives two minutes before the end;
- on pre-emption, from SIGTERM, followed by SIGKILL after the partition's grace time.

While a Lightning fit runs, :class:`PreemptionCheckpoint` owns both signals (it replaces the handlers that
submitit and Lightning installed, and puts them back when the fit ends). The handler only records the signal;
before the next training step every process agrees to stop (a max over ranks, so a signal that reached
one rank stops all of them at the same step), the resume point ``last.ckpt`` is written at that step, global
rank 0 runs ``scontrol requeue <job>``, and every process leaves with :class:`~ssl_kvasir.run.guard.Requeued`:
submitit then writes no result for the job (it is not over), and the requeued job runs the same point again,
which resumes from the checkpoint (``run.train.fit``) and continues the same W&B run (its id is a function of the
run folder). Outside a fit (between self-training rounds, during the final test) submitit's own handler is the
owner, and requeues the job the same way.

Outside SLURM the same callback owns SIGTERM and SIGINT (Ctrl-C) during a fit: the checkpoint is written at the
step, even in the first epoch, and the fit ends with :class:`~ssl_kvasir.run.guard.FitInterrupted` (exit status
143 or 130), which the same command resumes from.

The resumed run repeats the uninterrupted one exactly: Lightning restores its loop counters at the step, the
training samplers skip the batches of the epoch already trained (``data.datamodule.EpochSampler``,
``skip_fn``), and the random generators are restored to their state at the step.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from lightning.pytorch import Callback

from ssl_kvasir.files import atomic_write_json
from ssl_kvasir.run.guard import FitInterrupted, Requeued

log = logging.getLogger("ssl_kvasir")
# Our samplers resume mid-epoch without Lightning's stateful-loader interface (they skip what was done).
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")


def slurm_job_id() -> str | None:
    """The id that ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else the job id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (``SUBMITIT_PREEMPT_SIGNAL``, USR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def requeue(job_id: str) -> bool:
    """``scontrol requeue job_id``; ``False`` (logged) when it fails: the checkpoint is written all the same,
    and the point can be started again by hand or by the next ``make pretrain``."""
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not requeue SLURM job %s: %s", job_id, e)
        return False
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job_id, done.returncode, done.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


class PreemptionCheckpoint(Callback):
    """Owns the stopping signals during a fit: checkpoint at the step, requeue (under SLURM), exit.

    Args:
        checkpoint_path: the run's resume point (``last.ckpt``).
        signals: the signals to own; by default submitit's time-limit signal and SIGTERM.
        job_id: the SLURM job to requeue; by default this job (:func:`slurm_job_id`).
        requeue: requeue the job and leave with ``Requeued`` (SLURM); else leave with ``FitInterrupted``.
    """

    def __init__(
        self,
        checkpoint_path: Path,
        signals: tuple[signal.Signals, ...] | None = None,
        job_id: str | None = None,
        requeue: bool = True,
    ):
        self.checkpoint_path = Path(checkpoint_path)
        self.signals = signals if signals is not None else (requeue_signal(), signal.SIGTERM)
        self.requeue = requeue
        self.job_id = (job_id or slurm_job_id()) if requeue else None
        self.received: signal.Signals | None = None
        self._previous: dict[
            signal.Signals, Any
        ] = {}  # the handlers replaced, as signal.getsignal gives them
        self._rng_pending: dict | None = None
        self._saving = False

    # ---- signals --------------------------------------------------------------------------------------------
    def _record(self, signum: int, frame) -> None:
        # Only remember it: a handler runs between two bytecodes, possibly inside a collective or a save.
        if self.received is None:
            self.received = signal.Signals(signum)

    def _install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._record)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning registered its own handlers (at the start of the run), so that ours replace them.
        self.received = None
        self._install()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        if self.received is not None and not self.requeue:
            # A signal after the last step (during the final validation): the epoch-end checkpoint is the
            # resume point, and the user asked to stop.
            raise FitInterrupted(self.received.name, self.checkpoint_path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    # ---- the stop ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        """Before each step: stop here when a signal came (on any rank) since the last step.

        The checkpoint holds the state after the previous step and all its hooks (the EMA update among them),
        and Lightning's loop counters say that the batch about to run was not started, so the resumed run
        trains it next; the samplers skip the ``completed`` batches of the epoch (``data.datamodule``).
        """
        if self._rng_pending is not None:
            # The first step after a mid-epoch resume draws from where the interrupted run stopped.
            set_rng_state(self._rng_pending)
            self._rng_pending = None
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        signame = self.received.name if self.received is not None else "SIGTERM"  # on another rank
        step = trainer.global_step
        self._saving = True
        try:
            trainer.save_checkpoint(self.checkpoint_path)
        finally:
            self._saving = False
        log.warning("%s: wrote %s at step %d", signame, self.checkpoint_path, step)
        if not self.requeue:
            trainer.strategy.barrier("interrupted")
            raise FitInterrupted(signame, self.checkpoint_path)
        if trainer.is_global_zero and self.job_id:
            requeue(self.job_id)
        trainer.strategy.barrier("preempted")
        raise Requeued(signame, step, self.job_id, self.checkpoint_path)

    # ---- the random state at the step -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rng": rng_state()} if self._saving else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng_pending = state_dict.get("rng")


def rng_state() -> dict:
    """This process's random generators (torch CPU and CUDA, numpy, Python) as tensors and plain lists, which a
    checkpoint loaded with ``weights_only`` may hold."""
    kind, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state())  # the legacy tuple form
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ProgressFile(Callback):
    """Writes a run's ``progress.json`` (step, epoch, time, time of the last checkpoint) on global rank 0 every
    ``every_n_steps`` steps and after every checkpoint, for ``ssl-kvasir status``.

    Args:
        path: the file (``RunFolder.progress``).
        every_n_steps: steps between writes.
    """

    def __init__(self, path: Path, every_n_steps: int = 50):
        self.path = Path(path)
        self.every_n_steps = max(1, every_n_steps)
        self.checkpoint_time: float | None = None

    def _write(self, trainer) -> None:
        if trainer.is_global_zero:
            progress = {
                "step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch),
                "time": time.time(),
                "checkpoint_time": self.checkpoint_time,
            }
            atomic_write_json(self.path, progress)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._write(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.checkpoint_time = time.time()
        self._write(trainer)
