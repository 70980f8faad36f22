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
import subprocess
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
