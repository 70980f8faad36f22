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
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# FixMatch uses the most randomness of the methods (two augmented views, an unlabeled stream, an EMA).
FIT_ARGS = [
    "method=fixmatch",
    "trainer.max_steps=8",
    "data.steps_per_epoch=2",
    "data.image_size=32",
    "data.batch_size=4",
    "data.mu=2",
    "backbone.name=test_resnet",
    "logger=csv",
    "trainer.progress_bar=false",
    "seed=3",
    # One validation image per class of the small archive, so that checkpoints are chosen on val/mcc as in a real run.
    "data.val_fraction=0.34",
]
TOTAL_STEPS = 8
# One torch thread per process: tiny convolutions gain nothing from more, and on shared cores they spin.
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def fit_command(archive: Path, out: Path, workers: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ssl_kvasir.cli",
        "fit",
        f"data.root={archive}",
        f"data.split_file={archive / '2_fold_split.csv'}",
        f"output_dir={out}",
        f"data.num_workers={workers}",
        *FIT_ARGS,
    ]


def run_to_end(cmd: list[str], log: Path) -> None:
    with log.open("ab") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, timeout=300, env=ENV)


def kill_after_first_checkpoint(cmd: list[str], out: Path, log: Path) -> int:
    """Start ``cmd``, SIGKILL it as soon as ``checkpoints/last.ckpt`` appears; return the checkpoint's step."""
    last = out / "checkpoints" / "last.ckpt"
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
        try:
            deadline = time.monotonic() + 300
            while not last.exists():
                assert proc.poll() is None, f"the fit ended before its first checkpoint:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.01)
            # The whole session: with num_workers=0 it is one process, but a worker would die with it too.
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # Lightning writes the checkpoint to a temporary file and renames it, so what exists is complete.
    return int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])


def final_state(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


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
