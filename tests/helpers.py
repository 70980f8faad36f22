"""Helpers that several test modules share: the overrides of a tiny run, a run killed and resumed through the real
CLI, and the records of an offline W&B run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# A run small enough for a test: a test-sized ResNet at 32 px, a few steps on the CPU, a CSV log instead of W&B.
TINY = {
    "backbone": "test_resnet",
    "data.image_size": "32",
    "data.batch_size": "8",
    "data.mu": "2",
    "data.num_workers": "0",
    "data.steps_per_epoch": "2",
    "trainer.max_steps": "4",
    "trainer.accelerator": "cpu",
    "trainer.progress_bar": "false",
    "logger": "csv",
}


def tiny(*overrides: str) -> list[str]:
    """The tiny run's overrides (``key=value``), each of ``overrides`` replacing the key it names or adding it.

    Example: ``tiny("method=fixmatch", "trainer.max_steps=8")``.
    """
    merged = dict(TINY)
    for override in overrides:
        key, sep, value = override.partition("=")
        assert sep, f"not a key=value override: {override!r}"
        merged[key] = value
    return [f"{key}={value}" for key, value in merged.items()]


# FixMatch uses the most randomness of the methods (two augmented views, an unlabeled stream, an EMA).
FIT_ARGS = tiny(
    "method=fixmatch",
    "trainer.max_steps=8",
    "data.batch_size=4",
    "seed=3",
    # One validation image per class of the small archive, so that checkpoints are chosen on val/mcc as in a real run.
    "data.val_fraction=0.34",
)
TOTAL_STEPS = 8
# One torch thread per process: tiny convolutions gain nothing from more, and on shared cores they spin.
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def fit_command(archive: Path, out: Path, workers: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    """The tiny FixMatch fit as a command (``extra``: overrides replacing or adding keys, as :func:`tiny`)."""
    return [
        sys.executable,
        "-m",
        "ssl_kvasir.cli",
        "fit",
        f"data.root={archive}",
        f"data.split_file={archive / '2_fold_split.csv'}",
        f"output_dir={out}",
        *tiny(*FIT_ARGS, f"data.num_workers={workers}", *extra),
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


@contextlib.contextmanager
def running_beside(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """``cmd`` running in the background while the block runs; it must end with status 0 once the block is done
    (killed if the block fails). Each process of a test is on one thread, so two use the two cores."""
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
        try:
            yield proc
        except BaseException:
            proc.kill()
            raise
        finally:
            status = proc.wait(timeout=300)
    assert status == 0, log.read_text()


def straight_and_resumed(command: Callable[[Path], list[str]], tmp_path: Path) -> tuple[dict, dict, dict]:
    """The kill-and-resume comparison: ``command(out)`` run to its end into ``tmp_path/straight`` and, beside it,
    into ``tmp_path/killed`` killed after its first checkpoint (mid-training), then run again to its end.

    Checks that both end with exactly the same weights and state (``last.ckpt``), and returns the uninterrupted
    and the resumed results records, and the final state (for checks of a method's own state)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted run only adds load beside the kill, which makes the kill land earlier, never later.
    with running_beside(command(straight), tmp_path / "straight.log"):
        step = kill_after_first_checkpoint(command(killed), killed, tmp_path / "killed.log")
        assert 0 < step < TOTAL_STEPS, f"the kill should land mid-training, the checkpoint is at step {step}"
        assert not (killed / "results.json").exists()
        run_to_end(command(killed), tmp_path / "killed.log")
    sa, sb = final_state(straight), final_state(killed)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights or state differ after resuming: {different[:5]}"
    results = [json.loads((out / "results.json").read_text()) for out in (straight, killed)]
    return results[0], results[1], sa


def wandb_records(run: Path) -> list:
    """The records of an offline W&B run (``offline-run-*/run-*.wandb``: a LevelDB-style log of protobuf
    records in 32 KiB blocks after a 7-byte header), read without W&B's service."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = next(run.glob("run-*.wandb")).read_bytes()
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = data if kind in (1, 2) else pending + data  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def results_record(**fields) -> dict:
    """A results record of this version (``ssl_kvasir.run.folder.read_results`` accepts it), of two classes;
    ``fields`` replace or add to its own."""
    from ssl_kvasir.run.folder import RESULTS_FORMAT

    return {
        "format": RESULTS_FORMAT,
        "method": "fixmatch",
        "backbone": "test_resnet",
        "fold": 0,
        "seed": 0,
        "data_seed": 0,
        "label_budget": {"kind": "fraction", "amount": 0.1, "id": "frac0.1"},
        "n_labeled": 2,
        "classes": ["a", "b"],
        "metrics": {"mcc": 0.5, "macro_f1": 0.5, "micro_f1": 0.5},
        "confusion_matrix": [[1, 0], [0, 1]],
        "config": {"logger": {"kind": "csv"}},
        **fields,
    }


def on_a_small_disk(disk: Path, size: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` with a tmpfs of ``size`` (``256k``) mounted at the folder ``disk``, in a user and mount
    namespace of its own (no root needed, nothing changes outside); the test is skipped where the system
    cannot do that."""
    import shlex

    import pytest

    disk.mkdir(parents=True, exist_ok=True)
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))} || exit 77; exec {shlex.join(argv)}"
    )
    try:
        proc = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=300,
            env=ENV,
        )
    except FileNotFoundError:
        pytest.skip("no unshare(1) to mount a small disk")
    if proc.returncode == 77 or proc.stderr.startswith("unshare: "):
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()}")
    return proc


def cli_fit(archive: Path, out: Path, *extra: str, steps: int = 2) -> list[str]:
    """The command of a tiny fit in its own process: one step per epoch, ``steps`` steps, ``extra`` overrides."""
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


def run_cli(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The ``ssl-kvasir fit:`` lines of a process's stderr (which holds no traceback)."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("ssl-kvasir fit:")]


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder: Path, **holder) -> None:
    """A lock file in ``folder`` as ``ssl_kvasir.files.hold_lock`` writes it, held by ``holder``."""
    from ssl_kvasir.files import LOCK_FILE

    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"what": "a test", "since": "now", **holder}))


def training_counts(archive: Path, eval_fold: int):
    """Training-fold images per class of a synthetic HyperKvasir archive, read from its split file."""
    import numpy as np
    import pandas as pd

    from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES

    split = pd.read_csv(archive / "2_fold_split.csv", sep=";")
    index = {c.split_name: i for i, c in enumerate(HYPERKVASIR_CLASSES)}
    train = split[split["split-index"] != eval_fold]
    return np.bincount(train["class-name"].map(index), minlength=23)


# ---- the methods' toy problems (tests/methods/conftest.py serves them as fixtures) -----------------------
C = 5
"""Classes of the methods' toy problems."""
LONG_TAIL = (8, 4, 2, 1, 1)
"""Labeled images per class of the long-tailed toy problem."""


def build_method(name: str, counts=(1,) * C, num_unlabeled: int = 8, **settings):
    """``METHODS[name]`` from its YAML's settings, ``settings`` replacing some, and the facts a DataModule gives
    (labeled class counts, the unlabeled pool's size), on a small random network; EMA made, in training mode."""
    from types import SimpleNamespace

    import numpy as np

    from ssl_kvasir.methods import METHODS
    from ssl_kvasir.models import build_network

    datamodule = SimpleNamespace(
        streams={
            "lb": SimpleNamespace(labels=np.repeat(np.arange(C), counts)),
            "ulb": SimpleNamespace(rows=np.arange(num_unlabeled)),
        },
        num_classes=C,
        training_prior=np.array(counts) / sum(counts),  # a uniform sampler: the labeled set's shares
    )
    cls = METHODS[name]
    torch.manual_seed(0)
    module = cls.from_config(
        build_network("test_resnet", C),
        class_names=list("abcde"),
        max_steps=10,
        **{**cls.data_kwargs(datamodule), **settings},
    )
    module.configure_model()
    return module.train()


def fixed_batch(seed: int = 0, n_lb: int = 4, n_ulb: int = 8, labels: tuple[int, ...] | None = None) -> dict:
    """Labeled images (weak view; classes ``labels``, by default ``0, 1, ...`` modulo C) and unlabeled ones
    (weak and strong views, positions, unknown labels)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "lb": {
            "weak": torch.randn(n_lb, 3, 32, 32, generator=g),
            "label": torch.arange(n_lb) % C if labels is None else torch.tensor(labels),
        },
        "ulb": {
            "weak": torch.randn(n_ulb, 3, 32, 32, generator=g),
            "strong": torch.randn(n_ulb, 3, 32, 32, generator=g),
            "pos": torch.arange(n_ulb),
            "label": torch.full((n_ulb,), -1),
        },
    }


def naive_ce(logits: list[float], target: list[float]) -> float:
    """-sum_c target_c log softmax(logits)_c, in plain Python."""
    log_norm = math.log(sum(math.exp(v) for v in logits))
    return sum(t * (log_norm - v) for t, v in zip(target, logits, strict=True))


def naive_softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    return [v / sum(e) for v in e]


def one_hot(k: int, n: int) -> list[float]:
    return [float(c == k) for c in range(n)]


def long_tailed_method(name: str, num_unlabeled: int = 40, **settings):
    """:func:`build_method` on the long-tailed toy problem (:data:`LONG_TAIL`, a pool of 40 by default)."""
    return build_method(name, LONG_TAIL, num_unlabeled, **settings)


def long_tailed_batch(seed: int = 0) -> dict:
    """:func:`fixed_batch` with labeled images of classes 0, 1, 3 and 4 (class 2 unseen in the batch)."""
    return fixed_batch(seed, labels=(0, 1, 3, 4))
