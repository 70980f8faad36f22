"""Atomic writes, the folder lock and the streamed file hash (ssl_kvasir/files.py)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_kvasir.files import LOCK_FILE, FolderLocked, file_sha256, hold_lock

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
