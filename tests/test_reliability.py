"""Nothing silently wrong: a run folder holds one run, two processes never share a folder, an interrupted fit
says so and resumes, bad images and empty folds are refused before training, full disks are named.

The end-to-end cases go through the real command line on a tiny synthetic archive (3 images per class,
32 px, a test-sized ResNet, one step per epoch).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny

from ssl_kvasir.data.synth import make_synthetic_archive
from ssl_kvasir.files import LOCK_FILE, FolderLocked, _process_start, hold_lock

ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 labeled images per class (so labels_per_class=100 is clamped), 8 unlabeled images."""
    root = tmp_path_factory.mktemp("tiny") / "hyper-kvasir"
    return make_synthetic_archive(root, per_class=3, unlabeled=8, seed=1)


def fit_args(archive: Path, out: Path, *extra: str, steps: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ssl_kvasir.cli",
        "fit",
        f"data.root={archive}",
        f"data.split_file={archive / '2_fold_split.csv'}",
        f"output_dir={out}",
        *tiny(
            f"trainer.max_steps={steps}", "data.steps_per_epoch=1", "data.batch_size=4", "data.mu=1", *extra
        ),
    ]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("ssl-kvasir fit:")]


# ---- a run knows what it is ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_folder_of_another_run_is_refused(tiny_archive: Path, tmp_path: Path) -> None:
    """The issue's case: a supervised run with every label was stopped after its checkpoint; FixMatch at
    50 % into the same folder is refused (exit 2) with the keys that differ, whether the folder still has
    its run.json or only the checkpoint; the original command is accepted and finishes."""
    out = tmp_path / "run"
    original = fit_args(tiny_archive, out, "data.label_fraction=null", "data.labels_per_class=100")
    done = run(original)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    # labels_per_class=100 on classes of 3 images (2 in the training fold): warned, and what was used recorded.
    assert results["label_budget"] == {"kind": "per_class", "amount": 100, "id": "lpc100"}
    assert set(results["labels_per_class_used"].values()) <= {1, 2}
    assert sum(results["labels_per_class_used"].values()) == results["n_labeled"] + results["n_val"]
    assert "data.labels_per_class=100: 23 classes have fewer training images" in done.stderr
    assert results["fingerprint"]["method.name"] == "supervised"
    assert "output_dir" not in results["fingerprint"] and "data.num_workers" not in results["fingerprint"]

    other = fit_args(tiny_archive, out, "method=fixmatch", "data.label_fraction=0.5")
    refused = run(other)
    assert refused.returncode == 2
    [line] = error_lines(refused)
    assert "results.json is of another run" in line
    assert 'method.name: "supervised" -> "fixmatch"' in line and "data.label_fraction: null -> 0.5" in line
    assert "use another output_dir, or delete" in line

    # As if killed after its last checkpoint: no results.json. run.json still says whose folder it is.
    (out / "results.json").unlink()
    [line] = error_lines(run(other))
    assert "run.json is of another run" in line and "method.name" in line
    # And with no run.json either (a folder of an older version), the checkpoint's own fingerprint decides.
    (out / "run.json").unlink()
    refused = run(other)
    assert refused.returncode == 2
    [line] = error_lines(refused)
    assert "checkpoints/last.ckpt is of another run" in line and "data.labels_per_class: 100 -> null" in line
    assert not (out / "results.json").exists()

    # A resumed run may change where and how it runs (workers, logging, devices), not what it computes.
    again = run(
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


# ---- one process per folder ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock(folder: Path, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"what": "a test", "since": "now", **holder}))


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path, caplog, monkeypatch) -> None:
    folder = tmp_path / "f"
    with hold_lock(folder, "first") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with (
            pytest.raises(
                FolderLocked, match=rf"in use by first \(pid {os.getpid()} on {socket.gethostname()}"
            ),
            hold_lock(folder, "second"),
        ):
            pass
    assert not (folder / LOCK_FILE).exists()  # released

    # Stale: its process is gone on this host.
    _lock(folder, host=socket.gethostname(), pid=_dead_pid(), started=None)
    with caplog.at_level(logging.WARNING, logger="ssl_kvasir"), hold_lock(folder, "third"):
        assert json.loads((folder / LOCK_FILE).read_text())["what"] == "third"
    assert "taking over the stale lock" in caplog.text
    # Stale: its pid now belongs to another process (this one) that started at another time.
    _lock(folder, host=socket.gethostname(), pid=os.getpid(), started=(_process_start(os.getpid()) or 0) + 1)
    with hold_lock(folder, "fourth"):
        pass

    # On another host it cannot be checked: refused, with how to remove it.
    _lock(folder, host="node-17", pid=4242, started=1)
    with (
        pytest.raises(
            FolderLocked, match="pid 4242 on node-17.*if that process is gone, delete the lock file"
        ),
        hold_lock(folder, "fifth"),
    ):
        pass
    # ... unless it is this SLURM job's own, left by its run before a requeue.
    _lock(folder, host="node-17", pid=4242, started=1, slurm_job="991")
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    with hold_lock(folder, "requeued"):
        assert json.loads((folder / LOCK_FILE).read_text())["slurm_job"] == "991"


@pytest.fixture
def live_holder():
    """A process that stays alive while a test needs its pid as a lock holder."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield {"host": socket.gethostname(), "pid": proc.pid, "started": _process_start(proc.pid)}
    finally:
        proc.kill()
        proc.wait()


def test_two_fits_or_two_prepares_in_one_folder_are_refused(tiny_archive, tmp_path, live_holder) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    _lock(out, **live_holder)
    proc = run(fit_args(tiny_archive, out))
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert f"{out} is in use by a test (pid {live_holder['pid']}" in line

    _lock(cache, **live_holder)
    proc = run(
        [
            sys.executable,
            "-m",
            "ssl_kvasir.cli",
            "prepare",
            "--root",
            str(tiny_archive),
            "--cache",
            str(cache),
        ]
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"ssl-kvasir prepare: error: {cache} is in use by a test" in proc.stderr
    assert not (cache / "manifest.json").exists()


def test_prepare_rerun_removes_stale_temporary_files(tiny_archive, tmp_path) -> None:
    from ssl_kvasir.data.archive import scan_hyperkvasir
    from ssl_kvasir.data.cache import prepare_cache

    images, _ = scan_hyperkvasir(tiny_archive)
    cache = tmp_path / "cache"
    prepare_cache(tiny_archive, list(images.path), cache, size=32, workers=0, shard_size=40, progress=False)
    # What a prepare killed while writing leaves behind (atomic_write's temporary names), and its lock.
    stale = [cache / ".shard-00001.bin.k2j3h4.tmp", cache / ".shard-00002.idx.json.x8y7.tmp"]
    for path in stale:
        path.write_bytes(b"half a shard")
    _lock(cache, host=socket.gethostname(), pid=_dead_pid(), started=None)
    report = prepare_cache(
        tiny_archive, list(images.path), cache, size=32, workers=0, shard_size=40, progress=False
    )
    assert report.shards_reused == report.shards_built + report.shards_reused  # nothing rebuilt
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # lock released too


# ---- exit codes that tell the truth -------------------------------------------------------------------------


@pytest.mark.slow
# To the fit's process (a scheduler's kill), and to its whole process group with DataLoader workers (a job step
# or container stopped), where the workers die first.
@pytest.mark.parametrize("group", [False, True])
def test_sigterm_exits_non_zero_and_the_same_command_resumes(
    tiny_archive: Path, tmp_path: Path, group
) -> None:
    out = tmp_path / "run"
    cmd = fit_args(tiny_archive, out, steps=30)
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

    resumed = run(cmd)
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


# ---- refused before training --------------------------------------------------------------------------------


def test_fit_without_cache_refuses_unusable_images_and_an_empty_fold(tiny_archive, tmp_path) -> None:
    root = tmp_path / "archive"
    shutil.copytree(tiny_archive, root)
    split = root / "2_fold_split.csv"
    lines = split.read_text().splitlines()
    lines[1] = lines[1].rsplit(";", 1)[0] + ";3"  # folds 0..3: fold 2 is empty
    split.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    proc = run(fit_args(root, out, "data.fold=2"))
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert "evaluation fold data.fold=2 holds no image" in line and str(split) in line
    assert not (out / "checkpoints").exists()

    empty = next((root / "unlabeled-images" / "images").iterdir())
    empty.write_bytes(b"")
    proc = run(fit_args(root, out))
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert f"unlabeled-images/images/{empty.name}: empty file (0 bytes)" in line
    assert "ssl-kvasir prepare" in line
    assert not (out / "checkpoints").exists()


# ---- one line for a full disk; readable rates ---------------------------------------------------------------


def test_disk_full_while_saving_a_checkpoint_names_the_file(tmp_path: Path, monkeypatch) -> None:
    """torch's zip writer turns ENOSPC into 'RuntimeError: ... unexpected pos'; the writer names file and
    cause, and the checkpoint already there is left as it was."""
    import contextlib
    import io

    import torch

    from ssl_kvasir.run import checkpoint as ckpt_module

    class FullDisk(io.RawIOBase):
        def __init__(self) -> None:
            self.n = 0

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(b)

    @contextlib.contextmanager
    def full_disk(path, mode):
        yield FullDisk()

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(ckpt_module, "atomic_write", full_disk)
    with pytest.raises(OSError) as e:
        ckpt_module.AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10_000)}, target)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == f"[Errno 28] cannot write checkpoint {target}: No space left on device"
    assert target.read_bytes() == b"the previous checkpoint"


def test_a_refused_checkpoint_is_one_line_without_torch_advice(tmp_path: Path) -> None:
    import torch

    from ssl_kvasir.errors import DataError
    from ssl_kvasir.run.checkpoint import load_method
    from ssl_kvasir.run.guard import checkpoint_fingerprint

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": socket.socket}, path)  # an object loading as data refuses
    for load in (load_method, checkpoint_fingerprint):
        with pytest.raises(DataError) as e:
            load(path)
        message = str(e.value)
        assert "\n" not in message and str(path) in message
        assert "objects other than tensors" in message and "weights_only" not in message


def test_progress_rates_are_formatted(monkeypatch, caplog) -> None:
    from ssl_kvasir.run import predict

    with caplog.at_level(logging.INFO, logger="ssl_kvasir"), predict._progress("embedding", 100) as advance:
        advance(100)
    [record] = [r for r in caplog.records if r.getMessage().startswith("embedding")]
    assert __import__("re").fullmatch(
        r"embedding: 100 images in \d+\.\d s \(\d+ img/s\)", record.getMessage()
    )

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = predict._progress("embedding", 100)
    advance = bar.__enter__()
    advance(37)
    rate = bar.bar.tasks[0].fields["rate"]
    bar.__exit__(None, None, None)
    assert __import__("re").fullmatch(r"[\d,]+ img/s", rate), rate
