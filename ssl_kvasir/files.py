"""Atomic writes (an interrupted run leaves the old file or the new one, never half of one) and folder locks
(one process at a time writes a run folder or a cache)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ssl_kvasir.errors import SslKvasirError

log = logging.getLogger("ssl_kvasir")

LOCK_FILE = ".lock"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temporary file is removed and ``path`` is left as it was.

    Raises:
        OSError: naming ``path`` when its folder cannot be created or written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class FolderLocked(SslKvasirError):
    """Another live process holds the folder's lock."""


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None where
    there is no ``/proc``. Tells a live holder from a new process that was given a dead holder's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _holder_alive(holder: dict) -> bool | None:
    """Whether the lock's holder still runs: True or False on this host, None when it ran on another one."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists and belongs to another user
    started = holder.get("started")
    return started is None or _process_start(pid) in (None, started)


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"{holder.get('what', 'a process')} (pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')})"


@contextlib.contextmanager
def hold_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``folder/.lock`` while the body runs: a second process that asks for it is refused.

    The lock file names its holder (host, pid, the pid's start time, SLURM job, ``what``, since when). It is
    created complete in one step (written to a temporary file, then hard-linked into place, which fails when
    a lock exists). A lock whose holder is gone is stale: one left on this host by a process that no longer
    runs, or one left by an earlier run of this SLURM job (a requeued job keeps its job id and may land on
    another node). A stale lock is taken over with a warning; a lock held from another host by another job
    cannot be checked and is refused, with how to remove it.

    Args:
        folder: the folder to lock (created when missing).
        what: who holds it, in words (``fit of runs/x``), shown to the process that is refused.

    Raises:
        FolderLocked: naming the holder, when a live process (or one on another host) holds the lock.
        OSError: naming the lock file, when it cannot be written.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    me = {
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _process_start(os.getpid()),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{LOCK_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
    except OSError as e:
        raise OSError(e.errno, f"cannot write the lock file {path}: {e.strerror}") from None
    try:
        while True:
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                pass
            holder = _read_holder(path)
            if holder is None:
                continue  # released between our link and our read: try again
            alive = _holder_alive(holder)
            same_job = me["slurm_job"] is not None and holder.get("slurm_job") == me["slurm_job"]
            if alive or (alive is None and not same_job):
                where = "" if alive else "; if that process is gone, delete the lock file"
                raise FolderLocked(f"{folder} is in use by {_describe(holder)}: lock file {path}{where}")
            log.warning("taking over the stale lock %s of %s, which no longer runs", path, _describe(holder))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    try:
        yield path
    finally:
        # Released only if it is still ours (nobody deleted it and took over in between).
        if _read_holder(path) == me:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
