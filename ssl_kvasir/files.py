"""Atomic writes (an interrupted run leaves the old file or the new one, never half of one) and folder locks
(one process at a time writes a run folder or a cache)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
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

# Errors of a full or failing disk. A write in the caller's body raises them as much as the final flush does,
# and the OS's message ("No space left on device") names no file.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temporary file is removed and ``path`` is left as it was.

    Raises:
        OSError: naming ``path`` when its folder cannot be created or written, or when the disk is full (or
            fails) while it is written, by the caller's writes or the final flush.
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
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if (
            isinstance(e, OSError)
            and e.errno in DISK_ERRNOS
            and not str(e.strerror).startswith("cannot write")
        ):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
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


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None where
    there is no ``/proc``. Tells a live process from a new one that was given a dead one's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(host: str | None, pid: Any, started: int | None) -> bool | None:
    """Whether process ``pid``, started at ``started`` (:func:`process_start`; None: not recorded), still runs
    on ``host``: True or False on this host, None on another one, which cannot be checked from here.

    Used by the folder locks here and by a sweep's markers (:mod:`ssl_kvasir.study.status`).
    """
    if host != socket.gethostname():
        return None
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists and belongs to another user
    return started is None or process_start(pid) in (None, started)


def _holder_alive(holder: dict) -> bool | None:
    """Whether the lock's holder still runs: True or False on this host, None when it ran on another one."""
    return process_alive(holder.get("host"), holder.get("pid"), holder.get("started"))


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _parse_holder(raw: bytes) -> dict:
    """The holder a lock file names; ``{}`` (a holder that cannot be checked) when it is not readable."""
    try:
        holder = json.loads(raw.decode("utf-8"))
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _read_holder(path: Path) -> dict | None:
    raw = _read_bytes(path)
    return None if raw is None else _parse_holder(raw)


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds ``folder``'s lock, in words (``ssl-kvasir prepare of DIR (pid 7 on node-3, since ...)``), or
    None when nobody does: no lock, or a stale one whose process is gone. A holder on another host, which
    cannot be checked, is named with that said."""
    holder = _read_holder(Path(folder) / LOCK_FILE)
    if holder is None:
        return None
    alive = _holder_alive(holder)
    if alive is False:
        return None
    return _describe(holder) + ("" if alive else ", on another host: not checked")


# A takeover takes microseconds; a claim this old was left by a process killed in the middle of one.
ABANDONED_CLAIM_S = 30.0


def _remove_stale(path: Path, stale: bytes) -> bool:
    """Remove the lock file ``path`` if it still holds the bytes ``stale``; whether this call removed it.

    Contenders that found the same stale lock must not each remove "the" lock: the second would remove the
    first one's new lock, and both would hold it. So the removal is claimed first, by creating a claim file
    named after the stale lock's bytes (create-exclusive: one contender wins). The winner checks that the
    lock still holds those bytes (every lock's are unique), removes it, then drops the claim; a contender that
    comes later finds other bytes, or no lock, and removes nothing. A claim is never broken, since breaking
    one could let two in: a claim older than :data:`ABANDONED_CLAIM_S` is refused, naming what to delete.

    Raises:
        FolderLocked: when an abandoned claim blocks the takeover.
    """
    claim = path.with_name(f"{path.name}.{hashlib.sha256(stale).hexdigest()[:16]}.takeover")
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            age = time.time() - claim.stat().st_mtime
        except FileNotFoundError:
            return False  # its owner just finished
        if age > ABANDONED_CLAIM_S:
            raise FolderLocked(
                f"{path.parent}: a takeover of its stale lock was left unfinished {age:.0f} s ago; "
                f"if no process uses the folder, delete {path} and {claim}"
            ) from None
        time.sleep(0.01)  # another contender is removing it
        return False
    os.close(fd)
    try:
        if _read_bytes(path) != stale:
            return False
        os.unlink(path)
        return True
    finally:
        os.unlink(claim)


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"{holder.get('what', 'a process')} (pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')})"


@contextlib.contextmanager
def hold_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``folder/.lock`` while the body runs: a second process that asks for it is refused.

    The lock file names its holder (host, pid, the pid's start time, SLURM job, ``what``, since when, and a
    random token that makes each lock's bytes unique). It is created complete in one step (written to a
    temporary file, then hard-linked into place, which fails when a lock exists). A lock whose holder is gone
    is stale: one left on this host by a process that no longer runs, or one left by an earlier run of this
    SLURM job (a requeued job keeps its job id and may land on another node). A stale lock is taken over with
    a warning (:func:`_remove_stale`: one process at a time removes it, so two contenders never both take it);
    a lock held from another host by another job cannot be checked and is refused, with how to remove it.

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
        "started": process_start(os.getpid()),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "token": os.urandom(8).hex(),
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
            raw = _read_bytes(path)
            if raw is None:
                continue  # released between our link and our read: try again
            holder = _parse_holder(raw)
            alive = _holder_alive(holder)
            same_job = me["slurm_job"] is not None and holder.get("slurm_job") == me["slurm_job"]
            if alive or (alive is None and not same_job):
                where = "" if alive else "; if that process is gone, delete the lock file"
                raise FolderLocked(f"{folder} is in use by {_describe(holder)}: lock file {path}{where}")
            if _remove_stale(path, raw):
                log.warning(
                    "taking over the stale lock %s of %s, which no longer runs", path, _describe(holder)
                )
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


def file_sha256(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes (read in blocks: a checkpoint of a few GB never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
