"""What a user reads: each message once, no advertisements, one line per epoch when output is not a terminal,
the metrics and paths at the end; the same for a sweep's points. Progress lines of a long phase without a
terminal: at least every 30 s and every 10 %, with the time left."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import tiny

from ssl_kvasir.console import Progress

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
# The console as a user sees it: the progress bar's setting left on (the output is not a terminal).
TINY = ("trainer.max_steps=6", "trainer.progress_bar=true")


def _repeated(text: str) -> list[str]:
    """Non-blank lines that occur more than once (timestamps stripped: a repeat is the same message)."""
    lines = [line.split("] - ", 1)[-1].split(" INFO ", 1)[-1].strip() for line in text.splitlines()]
    return [line for line, n in Counter(lines).items() if line and n > 1]


def _assert_quiet(text: str) -> None:
    assert "litlogger" not in text and "Tip:" not in text
    assert "DeprecationWarning" not in text and "is deprecated" not in text
    assert _repeated(text) == []


@pytest.mark.slow
def test_fit_prints_each_message_once_and_one_line_per_epoch(synth_archive: Path, tmp_path: Path) -> None:
    data = [f"data.root={synth_archive}", f"data.split_file={synth_archive / '2_fold_split.csv'}"]
    cmd = [
        str(Path(sys.executable).parent / "ssl-kvasir"),
        "fit",
        f"output_dir={tmp_path / 'run'}",
        *data,
        *tiny(*TINY, "logger=wandb"),
    ]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    _assert_quiet(output)
    epochs = [line for line in output.splitlines() if " epoch " in line and "step" in line]
    assert [line.split(" epoch ")[1].split(",")[0] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert f"-> {tmp_path / 'run' / 'results.json'}" in done.stdout and "MCC" in done.stdout


@pytest.mark.slow
def test_a_sweep_point_logs_each_message_once(synth_archive: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    args = tiny(*TINY, "method=supervised", "data.fold=1", "data.label_fraction=1.0")
    bin_dir = Path(sys.executable).parent
    make = ["make", "-s", f"BIN={bin_dir}", "-o", f"{bin_dir}/ssl-kvasir", "pretrain"]
    cmd = [*make, f"DATA={synth_archive}", f"OUT={root}", "ARGS=" + " ".join(args)]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (point_log,) = root.rglob("point.log")
    text = point_log.read_text()
    _assert_quiet(text)
    assert text.count("fitting ") == 1 and text.count("GPU available") == 1


DISTRIBUTED_EVALUATION = """
import sys
import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
if sys.argv[1] == "quiet":
    from ssl_kvasir.console import quiet_console

    quiet_console()


class Evaluated(pl.LightningModule):  # logs its metrics as methods.base does: sync_dist=False, every process
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log_dict({{"val/mcc": 0.5, "val/macro_f1": 0.25}}, sync_dist=False, rank_zero_only=False)


trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
trainer.validate(Evaluated(), DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2), verbose=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("console", "expected"), [("lightning", 2), ("quiet", 0)])
def test_the_sync_dist_advice_is_silenced_where_each_process_evaluates_everything(console, expected) -> None:
    """In a process group (DDP) Lightning advises sync_dist=True once per epoch-level metric (18 lines per
    point); every process evaluates the whole set, so the quiet console drops the advice."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = DISTRIBUTED_EVALUATION.format(port=port)
    done = subprocess.run(
        [sys.executable, "-c", script, console], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("sync_dist=True") == expected, done.stderr


class Clock:
    """time.monotonic under the test's control."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("ssl_kvasir.console.time.monotonic", clock)
    return clock


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ssl_kvasir"]


def test_a_line_every_ten_percent_with_the_time_left(clock, caplog) -> None:
    """1,000 images in batches of 25 at 100 images/s (without a terminal): a line at each 10 % reached."""
    with caplog.at_level(logging.INFO, logger="ssl_kvasir"), Progress("embedding", 1000) as bar:
        for _ in range(40):
            clock.now += 0.25
            bar.advance(25)
    lines = _lines(caplog)
    assert len(lines) == 9  # 10 % .. 90 %; the end is the caller's own line
    assert lines[0] == "embedding: 100 of 1,000 images (10 %), 100 images/s, about 9 s left"
    assert lines[-1] == "embedding: 900 of 1,000 images (90 %), 100 images/s, about 1 s left"


def test_a_line_every_30_seconds_of_a_slow_phase(clock, caplog) -> None:
    """110,079 images at 274 images/s, batches of 128 (the full archive's embedding, 6.7 minutes): a line at
    least every 30 s, though 10 % takes 40 s."""
    with caplog.at_level(logging.INFO, logger="ssl_kvasir"), Progress("embedding", 110_079) as bar:
        last, gaps = clock.now, []
        for done in range(0, 110_079, 128):
            clock.now += 128 / 274
            bar.advance(min(128, 110_079 - done))
            if len(_lines(caplog)) > len(gaps):
                gaps.append(clock.now - last)
                last = clock.now
    assert max(gaps) <= 30.5
    assert len(gaps) >= 13  # 402 s / 30 s
    assert _lines(caplog)[0].endswith("274 images/s, about 6 min 11 s left")


def test_disabled_reports_nothing_and_a_closing_line_on_request(clock, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="ssl_kvasir"):
        with Progress("checking", 100, enabled=False) as bar:
            clock.now += 60
            bar.advance(100)
        assert _lines(caplog) == []
        with Progress("evaluating", 100, closing_line=True) as bar:
            clock.now += 2
            bar.advance(100)
    assert _lines(caplog) == ["evaluating: 100 images in 2.0 s (50 images/s)"]
