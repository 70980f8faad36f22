"""Atomic writes, the folder lock and the streamed file hash (ssl_kvasir/files.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli_fit, dead_pid, error_lines, run_cli, write_lock

from ssl_kvasir.files import LOCK_FILE, FolderLocked, file_sha256, hold_lock, process_start

CONTENDERS = 4
TRIALS = 20


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _contend(folder: str, barrier, results) -> None:
    """One contender: ask for the lock at the barrier; while holding it, claim an exclusive marker file (a
    second holder at the same time finds it taken) and hold it a little."""
    barrier.wait()
    marker = Path(folder) / "inside"
    try:
        with hold_lock(folder, f"contender {os.getpid()}"):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                results.put("overlap")
                return
            time.sleep(0.05)
            os.close(fd)
            os.unlink(marker)
            results.put("held")
    except FolderLocked:
        results.put("refused")


@pytest.mark.parametrize("trial", range(TRIALS))
def test_contenders_on_a_stale_lock_never_hold_it_two_at_a_time(tmp_path: Path, trial: int) -> None:
    """A stale lock (its holder is gone) taken over by 4 processes at once: one of them holds it, the others
    are refused while it does, and never are two inside together."""
    folder = tmp_path / "f"
    folder.mkdir()
    stale = {"what": "a killed fit", "host": socket.gethostname(), "pid": _dead_pid(), "started": None}
    (folder / LOCK_FILE).write_text(json.dumps(stale))
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(CONTENDERS), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(folder), barrier, results)) for _ in range(CONTENDERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert "overlap" not in outcomes
    assert outcomes.count("held") >= 1
    assert not (folder / LOCK_FILE).exists()  # the last holder released it
    assert [p.name for p in folder.iterdir()] == []  # no claim left behind


def test_an_abandoned_takeover_is_refused_with_what_to_delete(tmp_path: Path) -> None:
    """A process killed in the middle of taking over a stale lock leaves its claim: an old claim is not broken
    (that could let two in), the lock is refused naming both files."""
    folder = tmp_path / "f"
    folder.mkdir()
    stale = json.dumps({"what": "a killed fit", "host": socket.gethostname(), "pid": _dead_pid()})
    (folder / LOCK_FILE).write_text(stale)
    claim = folder / f"{LOCK_FILE}.{hashlib.sha256(stale.encode()).hexdigest()[:16]}.takeover"
    claim.write_text("")
    old = time.time() - 3600
    os.utime(claim, (old, old))
    with (
        pytest.raises(FolderLocked, match=f"delete {folder / LOCK_FILE} and {claim}"),
        hold_lock(folder, "x"),
    ):
        pass


def test_file_sha256_streams_the_whole_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read block, not a multiple of it
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    assert file_sha256(path) == "sha256:" + hashlib.sha256(data).hexdigest()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit changed, same size and path
    assert file_sha256(path) != "sha256:" + hashlib.sha256(data).hexdigest()


WRITE_PAST_LIMIT = """
import resource, signal
from ssl_kvasir.files import atomic_write_json, atomic_write_text
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
for write in (lambda: atomic_write_text({path!r}, "x" * 100_000), lambda: atomic_write_json({path!r}, [0] * 50_000)):
    try:
        write()
    except OSError as e:
        print(e.errno, e)
"""


def test_a_write_that_hits_a_full_disk_names_the_file(tmp_path: Path) -> None:
    """A disk error in the middle of an atomic write (here a file-size limit: EFBIG, as ENOSPC would be) is one
    error naming the file, and the old file stays."""
    path = tmp_path / "results.json"
    path.write_text("old")
    proc = subprocess.run(
        [sys.executable, "-c", WRITE_PAST_LIMIT.format(path=str(path))], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    line = f"27 [Errno 27] cannot write {path}: File too large"
    assert proc.stdout.splitlines() == [line, line]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


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
    write_lock(folder, host=socket.gethostname(), pid=dead_pid(), started=None)
    with caplog.at_level(logging.WARNING, logger="ssl_kvasir"), hold_lock(folder, "third"):
        assert json.loads((folder / LOCK_FILE).read_text())["what"] == "third"
    assert "taking over the stale lock" in caplog.text
    # Stale: its pid now belongs to another process (this one) that started at another time.
    write_lock(
        folder, host=socket.gethostname(), pid=os.getpid(), started=(process_start(os.getpid()) or 0) + 1
    )
    with hold_lock(folder, "fourth"):
        pass

    # On another host it cannot be checked: refused, with how to remove it.
    write_lock(folder, host="node-17", pid=4242, started=1)
    with (
        pytest.raises(
            FolderLocked, match="pid 4242 on node-17.*if that process is gone, delete the lock file"
        ),
        hold_lock(folder, "fifth"),
    ):
        pass
    # ... unless it is this SLURM job's own, left by its run before a requeue.
    write_lock(folder, host="node-17", pid=4242, started=1, slurm_job="991")
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    with hold_lock(folder, "requeued"):
        assert json.loads((folder / LOCK_FILE).read_text())["slurm_job"] == "991"


@pytest.fixture
def live_holder():
    """A process that stays alive while a test needs its pid as a lock holder."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield {"host": socket.gethostname(), "pid": proc.pid, "started": process_start(proc.pid)}
    finally:
        proc.kill()
        proc.wait()


def test_two_fits_or_two_prepares_in_one_folder_are_refused(tiny_archive, tmp_path, live_holder) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    write_lock(out, **live_holder)
    proc = run_cli(cli_fit(tiny_archive, out))
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert f"{out} is in use by a test (pid {live_holder['pid']}" in line

    write_lock(cache, **live_holder)
    proc = run_cli(
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
