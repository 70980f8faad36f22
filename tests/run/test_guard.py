"""What keeps a run folder honest: the fingerprint holds the content of every input file, so an input edited
between a kill and the resume is refused, naming the file; a folder of another run is refused, whatever says
where and how a run runs is left out of the fingerprint; an interrupted fit exits non-zero and the same command
resumes it; bad images and an empty evaluation fold are refused before training.

The end-to-end cases go through the real command line on a tiny synthetic archive (3 images per class,
32 px, a test-sized ResNet, one step per epoch)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ENV, cli_fit, error_lines, run_cli

from ssl_kvasir.config import compose
from ssl_kvasir.files import LOCK_FILE
from ssl_kvasir.run import guard
from ssl_kvasir.run.folder import RunFolder


def test_every_input_file_is_hashed_into_the_fingerprint(tmp_path: Path) -> None:
    split, review, weights = (tmp_path / name for name in ("split.csv", "review.csv", "w.pth"))
    for path in (split, review, weights):
        path.write_text(path.name)
    cfg = compose(
        "fit",
        [
            f"data.root={tmp_path}",
            f"output_dir={tmp_path / 'run'}",
            f"data.split_file={split}",
            "method=self_training",
            f"method.pseudo.file={review}",
            f"backbone.weights=[{weights},{weights}]",
        ],
    )
    found = guard.fingerprint(cfg)
    assert found["data.split_file#sha256"] == guard.file_hash(split)
    assert found["method.pseudo.file#sha256"] == guard.file_hash(review) != guard.file_hash(split)
    assert found["backbone.weights#sha256"] == [guard.file_hash(weights)] * 2
    assert found["data.split_file#sha256"].startswith("sha256:")


@pytest.mark.parametrize("key", ["method.pseudo.file", "data.split_file"])
def test_an_input_edited_since_the_run_started_is_refused_naming_it(tmp_path: Path, key: str) -> None:
    """The reviewed pseudo-label file of self-training (issue 19: a run killed in round 1 trained on a mix of the
    old and the new labels after the file was edited) and the split file."""
    edited = tmp_path / "input.csv"
    edited.write_text("path,label\na.jpg,polyp\n")
    cfg = compose(
        "fit",
        [
            f"data.root={tmp_path}",
            f"output_dir={tmp_path / 'run'}",
            "method=self_training",
            f"{key}={edited}",
        ],
    )
    folder = RunFolder(tmp_path / "run")
    guard.begin(folder, guard.fingerprint(cfg))
    guard.check_folder(folder, guard.fingerprint(cfg), folder.results)  # unchanged: the run resumes
    edited.write_text("path,label\na.jpg,polyp\nb.jpg,ileum\n")
    with pytest.raises(guard.RunMismatch) as refused:
        guard.check_folder(folder, guard.fingerprint(cfg), folder.results)
    message = str(refused.value)
    assert f"{key} {edited} changed since the run started" in message and "put the file back" in message
    assert "\n" not in message


@pytest.mark.slow
def test_a_folder_of_another_run_is_refused(tiny_archive: Path, tmp_path: Path) -> None:
    """The issue's case: a supervised run with every label was stopped after its checkpoint; FixMatch at
    50 % into the same folder is refused (exit 2) with the keys that differ, whether the folder still has
    its run.json or only the checkpoint; the original command is accepted and finishes."""
    out = tmp_path / "run"
    original = cli_fit(tiny_archive, out, "data.label_fraction=null", "data.labels_per_class=100")
    done = run_cli(original)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    # labels_per_class=100 on classes of 3 images (2 in the training fold): warned, and what was used recorded.
    assert results["label_budget"] == {"kind": "per_class", "amount": 100, "id": "lpc100"}
    assert set(results["labels_per_class_used"].values()) <= {1, 2}
    assert sum(results["labels_per_class_used"].values()) == results["n_labeled"] + results["n_val"]
    assert "data.labels_per_class=100: 23 classes have fewer training images" in done.stderr
    assert results["fingerprint"]["method.name"] == "supervised"
    assert "output_dir" not in results["fingerprint"] and "data.num_workers" not in results["fingerprint"]

    other = cli_fit(tiny_archive, out, "method=fixmatch", "data.label_fraction=0.5")
    refused = run_cli(other)
    assert refused.returncode == 2
    [line] = error_lines(refused)
    assert "results.json is of another run" in line
    assert 'method.name: "supervised" -> "fixmatch"' in line and "data.label_fraction: null -> 0.5" in line
    assert "use another output_dir, or delete" in line

    # As if killed after its last checkpoint: no results.json. run.json still says whose folder it is.
    (out / "results.json").unlink()
    [line] = error_lines(run_cli(other))
    assert "run.json is of another run" in line and "method.name" in line
    # And with no run.json either (a folder of an older version), the checkpoint's own fingerprint decides.
    (out / "run.json").unlink()
    refused = run_cli(other)
    assert refused.returncode == 2
    [line] = error_lines(refused)
    assert "checkpoints/last.ckpt is of another run" in line and "data.labels_per_class: 100 -> null" in line
    assert not (out / "results.json").exists()

    # A resumed run may change where and how it runs (workers, logging, devices), not what it computes.
    again = run_cli(
        [
            *original,
            "data.num_workers=1",
            "trainer.log_every_n_steps=7",
            "logger=wandb",
            "logger.mode=disabled",
        ]
    )
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "results.json").read_text())["metrics"] == results["metrics"]


def test_fingerprint_leaves_out_where_and_how_a_run_runs(tmp_path: Path, monkeypatch) -> None:
    from ssl_kvasir.config import compose
    from ssl_kvasir.run.guard import differences, fingerprint

    monkeypatch.chdir(tmp_path)
    base = ["data.root=archive", "data.split_file=archive/split.csv", "output_dir=a"]
    a = fingerprint(compose("fit", base))
    b = fingerprint(
        compose(
            "fit",
            [
                f"data.root={tmp_path / 'archive'}",  # the same folder spelt absolutely
                "data.split_file=archive/split.csv",
                "output_dir=elsewhere",
                "data.num_workers=9",
                "data.cache=/fast/cache",
                "trainer.devices=2",
                "trainer.progress_bar=false",
                "logger=csv",
            ],
        )
    )
    assert a == b
    assert a["data.root"] == str(tmp_path / "archive")
    c = fingerprint(compose("fit", [*base, "seed=1", "trainer.max_steps=5"]))
    assert differences(a, c) == ["data.seed: 0 -> 1", "seed: 0 -> 1", "trainer.max_steps: 10000 -> 5"]
    # A key that only one side has (a method's own, or one a newer version added) is not compared.
    assert differences({**a, "data.new_key": 1}, a) == []


@pytest.mark.slow
# To the fit's process (a scheduler's kill), and to its whole process group with DataLoader workers (a job step
# or container stopped), where the workers die first.
@pytest.mark.parametrize("group", [False, True])
def test_sigterm_exits_non_zero_and_the_same_command_resumes(
    tiny_archive: Path, tmp_path: Path, group
) -> None:
    out = tmp_path / "run"
    cmd = cli_fit(tiny_archive, out, steps=30)
    if group:
        cmd = [*cmd, "data.num_workers=2"]
    last = out / "checkpoints" / "last.ckpt"
    with (tmp_path / "log").open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=ENV, start_new_session=group
        )
        deadline = time.monotonic() + 300
        while not last.exists():
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    stderr = (tmp_path / "log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = stderr.splitlines()
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if group:
        # torch's SIGCHLD handler may fire inside a finaliser while the workers die; Python prints that as an
        # ignored exception. Nothing else may raise.
        assert all(lines[i - 1].startswith("Exception ignored in") for i in tracebacks), stderr
    else:
        assert not tracebacks, stderr
    assert (
        f"ssl-kvasir fit: interrupted by SIGTERM; the same command resumes from {last}" in stderr.splitlines()
    )
    assert not (out / "results.json").exists()
    assert not (out / LOCK_FILE).exists()  # released on the way out

    resumed = run_cli(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoints' / 'last.ckpt'}" in resumed.stderr
    assert json.loads((out / "results.json").read_text())["steps"] == 30


def test_interruptions_become_fit_interrupted(tmp_path: Path) -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ssl_kvasir.run.guard import FitInterrupted, interruptions

    class Trainer:
        interrupted = True

    last = tmp_path / "last.ckpt"
    with pytest.raises(FitInterrupted) as e, interruptions(Trainer(), last):
        raise SIGTERMException
    assert e.value.status == 143 and e.value.resume_from is None
    assert "starts it again (no checkpoint was written yet)" in str(e.value)
    last.write_bytes(b"x")
    with pytest.raises(FitInterrupted) as e, interruptions(Trainer(), last):
        raise SystemExit(1)  # what Lightning does after Ctrl-C
    assert e.value.status == 130 and e.value.resume_from == last
    Trainer.interrupted = False
    with pytest.raises(SystemExit), interruptions(Trainer(), last):
        raise SystemExit(3)  # not an interrupted fit: left alone
    with pytest.raises(ValueError), interruptions(Trainer(), last):
        raise ValueError("a bug")  # neither
    # A SIGTERM to the whole process group: the DataLoader workers die first, after Lightning recorded it.
    Trainer.received_sigterm = True
    with pytest.raises(FitInterrupted) as e, interruptions(Trainer(), last):
        raise RuntimeError("DataLoader worker (pid(s) 25250) exited unexpectedly")
    assert e.value.status == 143
    # The same with run.preempt owning the signals during training (outside SLURM): its record of Ctrl-C.
    Trainer.received_sigterm = False
    Trainer.callbacks = [type("Recorded", (), {"received": signal.SIGINT})()]
    with pytest.raises(FitInterrupted) as e, interruptions(Trainer(), last):
        raise RuntimeError("DataLoader worker (pid(s) 25250) exited unexpectedly")
    assert e.value.status == 130 and e.value.resume_from == last


def test_fit_without_cache_refuses_unusable_images_and_an_empty_fold(tiny_archive, tmp_path) -> None:
    root = tmp_path / "archive"
    shutil.copytree(tiny_archive, root)
    split = root / "2_fold_split.csv"
    lines = split.read_text().splitlines()
    lines[1] = lines[1].rsplit(";", 1)[0] + ";3"  # folds 0..3: fold 2 is empty
    split.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    proc = run_cli(cli_fit(root, out, "data.fold=2"))
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert "evaluation fold data.fold=2 holds no image" in line and str(split) in line
    assert not (out / "checkpoints").exists()

    empty = next((root / "unlabeled-images" / "images").iterdir())
    empty.write_bytes(b"")
    proc = run_cli(cli_fit(root, out))
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert f"unlabeled-images/images/{empty.name}: empty file (0 bytes)" in line
    assert "ssl-kvasir prepare" in line
    assert not (out / "checkpoints").exists()
