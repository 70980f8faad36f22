"""The preemption path without SLURM: a fit killed after its first checkpoint and started again with the same
command ends exactly where an uninterrupted fit ends.

This is what happens on a cluster when a job is pre-empted or times out and is requeued: the process dies with
SIGKILL at any moment, and the new job runs the same command, which resumes from ``checkpoints/last.ckpt``.
Exact equality holds because checkpoints are only written at epoch ends, the samplers are a function of
(seed, epoch), every sample's augmentation is seeded from (seed, epoch, position), and
``BaseMethod.on_train_epoch_start`` reseeds the generators that the training step draws from.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import ENV, TOTAL_STEPS, final_state, fit_command, kill_after_first_checkpoint, run_to_end


@pytest.mark.slow
# With worker processes too: augmentations are seeded per sample from (seed, epoch, position), not by whichever
# worker process happens to draw the sample.
@pytest.mark.parametrize("workers", [0, 2])
def test_killed_fit_resumes_to_the_same_results(synth_archive: Path, tmp_path: Path, workers: int) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted reference runs beside the kill-and-resume sequence (it only adds load, which makes
    # the kill land earlier, never later).
    with (tmp_path / "straight.log").open("wb") as f:
        reference = subprocess.Popen(
            fit_command(synth_archive, straight, workers), stdout=f, stderr=subprocess.STDOUT, env=ENV
        )

    log = tmp_path / "killed.log"
    step = kill_after_first_checkpoint(fit_command(synth_archive, killed, workers), killed, log)
    assert 0 < step < TOTAL_STEPS, f"the kill should land mid-training, the checkpoint is at step {step}"
    assert not (killed / "results.json").exists()
    run_to_end(fit_command(synth_archive, killed, workers), log)

    assert reference.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert b["steps"] == a["steps"] == TOTAL_STEPS
    # Exact equality, not closeness: the resumed run must repeat the uninterrupted one.
    assert b["metrics"] == a["metrics"]
    assert a["val_metrics"] is not None
    assert b["val_metrics"] == a["val_metrics"]
    assert b["confusion_matrix"] == a["confusion_matrix"]
    # Metrics of a tiny model can agree by chance (one predicted class); the weights cannot.
    sa, sb = final_state(straight), final_state(killed)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ after resuming: {different[:5]}"


@pytest.mark.slow
def test_a_copied_run_resumes_from_its_own_checkpoints(synth_archive: Path, tmp_path: Path) -> None:
    """Issue 19: a run folder killed after a checkpoint, copied elsewhere and resumed there, reads only its own
    files (the checkpoint callbacks' paths are stored relative to it): with the original folder's checkpoints
    damaged, the copy still ends exactly where an uninterrupted run ends, model selection included."""
    straight, killed, copy = tmp_path / "straight", tmp_path / "killed", tmp_path / "elsewhere" / "copy"
    run_to_end(fit_command(synth_archive, straight), tmp_path / "straight.log")
    log = tmp_path / "killed.log"
    step = kill_after_first_checkpoint(fit_command(synth_archive, killed), killed, log)
    assert 0 < step < TOTAL_STEPS
    shutil.copytree(killed, copy)
    for name in ("best.ckpt", "last.ckpt"):
        (killed / "checkpoints" / name).write_bytes(b"not the copy's checkpoint")
    run_to_end(fit_command(synth_archive, copy), log)

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
    run_to_end([*fit_command(synth_archive, straight), *one_epoch], tmp_path / "straight.log")

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
