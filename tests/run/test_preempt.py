"""Pre-emption under a faked SLURM job: the time-limit signal (USR2, as submitit's sbatch asks for) or SIGTERM
arrives mid-epoch; the fit writes its resume checkpoint at that step, calls ``scontrol requeue`` (a fake one on
PATH that records its arguments), leaves with ``Requeued``; the requeued fit resumes and ends with exactly the
weights and metrics of an uninterrupted fit, continuing the same W&B run, which was not marked failed.

And the pre-emption path without SLURM: a fit killed after its first checkpoint and started again with the same
command ends exactly where an uninterrupted fit ends.

This is what happens on a cluster when a job is pre-empted or times out and is requeued: the process dies with
SIGKILL at any moment, and the new job runs the same command, which resumes from ``checkpoints/last.ckpt``.
Exact equality holds because checkpoints are only written at epoch ends, the samplers are a function of
(seed, epoch), every sample's augmentation is seeded from (seed, epoch, position), and
``BaseMethod.on_train_epoch_start`` reseeds the generators that the training step draws from."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    ENV,
    TOTAL_STEPS,
    final_state,
    fit_command,
    kill_after_first_checkpoint,
    run_to_end,
    running_beside,
    straight_and_resumed,
    tiny,
)

from ssl_kvasir.config import compose
from ssl_kvasir.methods.fixmatch import FixMatch
from ssl_kvasir.run.guard import Requeued
from ssl_kvasir.run.train import fit

STEPS_PER_EPOCH = 4
SIGNAL_AT = 5  # the signal arrives during step 6 (global_step 5 before it): epoch 1, its second batch


def overrides(archive: Path, out: Path) -> list[str]:
    return [
        f"data.root={archive}",
        f"data.split_file={archive / '2_fold_split.csv'}",
        f"output_dir={out}",
        *tiny(
            "method=fixmatch",
            "data.batch_size=4",
            f"data.steps_per_epoch={STEPS_PER_EPOCH}",
            "trainer.max_steps=12",
            "data.val_fraction=0.34",
            "seed=3",
            "logger=wandb",
        ),
    ]


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-task SLURM job (environment variables) with fake ``scontrol`` and ``sbatch`` on PATH; returns the
    file where the fake scontrol writes its arguments."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    for tool in ("scontrol", "sbatch"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ssl-kvasir",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SUBMITIT_PREEMPT_SIGNAL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return calls


def signal_during_step(monkeypatch: pytest.MonkeyPatch, signum: int, at_step: int) -> None:
    """Make the process send itself ``signum`` inside the training step that starts at ``at_step``."""
    original = FixMatch.training_step

    def step(self, batch, batch_idx):
        if self.global_step == at_step:
            os.kill(os.getpid(), signum)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(FixMatch, "training_step", step)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def offline_run_ids(out: Path) -> list[str]:
    """The W&B run id of each offline segment in ``out`` (``offline-run-<time>-<id>``, with ``-1`` appended by
    W&B when two segments of a run start within the same second)."""
    return [re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+)(-\d+)?", run.name)[1] for run in offline_runs(out)]


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGUSR2", "SIGTERM"])
def test_preempted_fit_checkpoints_requeues_and_resumes_exactly(
    synth_archive: Path, tmp_path: Path, slurm: Path, monkeypatch: pytest.MonkeyPatch, signame: str
) -> None:
    reference = fit(compose("fit", overrides(synth_archive, tmp_path / "uninterrupted")))

    out = tmp_path / "preempted"
    cfg = compose("fit", overrides(synth_archive, out))
    handlers_before = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        signal_during_step(m, getattr(signal, signame), SIGNAL_AT)
        with pytest.raises(Requeued) as stopped:
            fit(cfg)
    # 1. A checkpoint at the step, not at an epoch end.
    last = out / "checkpoints" / "last.ckpt"
    step = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
    assert step == SIGNAL_AT + 1 == stopped.value.step
    assert step % STEPS_PER_EPOCH != 0
    assert not (out / "results.json").exists()
    # The handlers of before the fit are back (submitit's own, on a real job).
    assert (signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)) == handlers_before
    # 2. The job was requeued, once, by its id.
    assert slurm.read_text().splitlines() == ["scontrol requeue 4242"]
    # 3. The requeued job runs the same command and ends where the uninterrupted fit ends.
    resumed = fit(cfg)
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["val_metrics"] == reference["val_metrics"]
    a, b = (
        weights(out / "checkpoints" / "last.ckpt"),
        weights(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    progress = json.loads((out / "progress.json").read_text())
    assert progress["step"] == 12 and progress["checkpoint_time"] is not None
    # 4. One W&B run, continued: two offline segments with the same id.
    runs, ids = offline_runs(out), offline_run_ids(out)
    assert len(ids) == 2 and len(set(ids)) == 1
    # W&B's own log of the first segment: closed with exit code 0 (not failed), then resumed by id.
    assert "got exitcode: 0" in (runs[0] / "logs" / "debug.log").read_text()
    assert "got exitcode: 0" in (runs[1] / "logs" / "debug.log").read_text()
    assert slurm.read_text().splitlines() == ["scontrol requeue 4242"]  # the resumed fit did not requeue


def test_sampler_skip_serves_the_rest_of_the_epoch() -> None:
    """A resumed epoch's sampler serves exactly what the uninterrupted epoch had left, items and seeds alike."""
    import numpy as np

    from ssl_kvasir.data.datamodule import ClassBalancedSampler, EpochSampler

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    for make in (
        lambda skip: EpochSampler(10, 24, seed=5, epoch_fn=lambda: 3, skip_fn=skip),
        lambda skip: ClassBalancedSampler(labels, 24, seed=5, epoch_fn=lambda: 3, skip_fn=skip),
    ):
        whole = list(make(None))
        for skip in (0, 1, 8, 23, 24):
            assert list(make(lambda skip=skip: skip)) == whole[skip:]


def test_a_requeued_point_exits_as_submitit_expects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a sweep job, a requeued fit ends the process with SystemExit(-1), as submitit's own handler does: not
    an Exception, so submitit writes no (failed) result for a job that is not over."""
    import ssl_kvasir.run.train as train
    from ssl_kvasir.study.sweeps import run_point

    def preempted(cfg):
        raise Requeued("SIGUSR2", 6, "4242")

    monkeypatch.setattr(train, "fit", preempted)
    cfg = compose("fit", [f"data.root={tmp_path}", f"output_dir={tmp_path / 'point'}"])
    with pytest.raises(SystemExit) as stopped:
        run_point(cfg)
    assert stopped.value.code == -1 and not isinstance(stopped.value, Exception)


def test_a_requeued_fit_exits_143_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Issue 19: `ssl-kvasir fit` under SLURM, checkpointed and requeued, used to exit 1 with an 18-frame
    ``Requeued`` traceback; it exits 143 with one line saying what happened and where the job resumes."""
    import ssl_kvasir.run.train as train
    from ssl_kvasir.cli import main

    last = tmp_path / "point" / "checkpoints" / "last.ckpt"

    def preempted(cfg):
        raise Requeued("SIGUSR2", 6, "4242", last)

    monkeypatch.setattr(train, "fit", preempted)
    args = [f"data.root={tmp_path}", "data.generate_folds=2", f"output_dir={tmp_path / 'point'}"]
    assert main(["fit", *args]) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("ssl-kvasir fit:")]
    assert line == (
        f"ssl-kvasir fit: SIGUSR2 at step 6: checkpointed and requeued job 4242; the requeued job resumes from {last}"
    )


@pytest.mark.slow
# With worker processes too: augmentations are seeded per sample from (seed, epoch, position), not by whichever
# worker process happens to draw the sample.
@pytest.mark.parametrize("workers", [0, 2])
def test_killed_fit_resumes_to_the_same_results(synth_archive: Path, tmp_path: Path, workers: int) -> None:
    # Besides the final state (weights, EMA, optimiser), checked by the helper:
    a, b, _ = straight_and_resumed(lambda out: fit_command(synth_archive, out, workers), tmp_path)
    assert b["steps"] == a["steps"] == TOTAL_STEPS
    # Exact equality, not closeness: the resumed run must repeat the uninterrupted one.
    assert b["metrics"] == a["metrics"]
    assert a["val_metrics"] is not None
    assert b["val_metrics"] == a["val_metrics"]
    assert b["confusion_matrix"] == a["confusion_matrix"]


@pytest.mark.slow
def test_a_copied_run_resumes_from_its_own_checkpoints(synth_archive: Path, tmp_path: Path) -> None:
    """Issue 19: a run folder killed after a checkpoint, copied elsewhere and resumed there, reads only its own
    files (the checkpoint callbacks' paths are stored relative to it): with the original folder's checkpoints
    damaged, the copy still ends exactly where an uninterrupted run ends, model selection included, and
    continues the W&B run that the killed fit began (its id travels in run.json, not in the folder's path)."""
    straight, killed, copy = tmp_path / "straight", tmp_path / "killed", tmp_path / "elsewhere" / "copy"
    wandb = ("logger=wandb",)
    with running_beside(fit_command(synth_archive, straight, extra=wandb), tmp_path / "straight.log"):
        log = tmp_path / "killed.log"
        step = kill_after_first_checkpoint(fit_command(synth_archive, killed, extra=wandb), killed, log)
        assert 0 < step < TOTAL_STEPS
        shutil.copytree(killed, copy)
        for name in ("best.ckpt", "last.ckpt"):
            (killed / "checkpoints" / name).write_bytes(b"not the copy's checkpoint")
        run_to_end(fit_command(synth_archive, copy, extra=wandb), log)

    # Two segments in the copy (the killed fit's, copied, and the resumed one), one W&B run; the uninterrupted
    # run of the same settings in another folder is another W&B run.
    [original] = offline_run_ids(killed)
    assert offline_run_ids(copy) == [original, original]
    assert offline_run_ids(straight) != [original]

    a = json.loads((straight / "results.json").read_text())
    b = json.loads((copy / "results.json").read_text())
    assert b["checkpoint"] == a["checkpoint"] == "checkpoints/best.ckpt"
    assert b["selection"]["step"] == a["selection"]["step"]
    assert b["metrics"] == a["metrics"] and b["val_metrics"] == a["val_metrics"]
    state = torch.load(copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stored = [s for s in state["callbacks"].values() if isinstance(s, dict) and "best_model_path" in s]
    assert stored and all(s["dirpath"] == "checkpoints" for s in stored)


@pytest.mark.slow
@pytest.mark.parametrize(("signame", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_in_the_first_epoch_checkpoints_at_the_step(
    synth_archive: Path, tmp_path: Path, signame: str, status: int
) -> None:
    """Issue 19: outside SLURM, SIGTERM or Ctrl-C during the first epoch (one epoch of 8 steps here) writes the
    resume point at the current step, exits 128 + the signal with one line, and the same command then ends
    exactly where an uninterrupted fit ends."""
    one_epoch = ["data.steps_per_epoch=8", "trainer.log_every_n_steps=1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    with running_beside([*fit_command(synth_archive, straight), *one_epoch], tmp_path / "straight.log"):
        cmd = [*fit_command(synth_archive, stopped), *one_epoch]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        progress = stopped / "progress.json"
        deadline = time.monotonic() + 300
        while not (progress.exists() and json.loads(progress.read_text())["step"] >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == status, err
        assert "Traceback" not in out + err
        [line] = [x for x in err.splitlines() if x.startswith("ssl-kvasir fit:")]
        assert (
            f"interrupted by {signame}; the same command resumes from {stopped / 'checkpoints' / 'last.ckpt'}"
            in line
        )
        step = int(torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=False)["global_step"])
        assert 2 <= step < 8, "the checkpoint is at the step the signal stopped, inside the first epoch"
        assert not (stopped / "results.json").exists()

        run_to_end(cmd, tmp_path / "resumed.log")
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((stopped / "results.json").read_text())
    assert b["metrics"] == a["metrics"] and b["val_metrics"] == a["val_metrics"]
    sa, sb = final_state(straight), final_state(stopped)
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
