"""Where each point of a sweep stands: ``done``, ``running``, ``queued``, ``failed`` or ``missing``.

A launcher leaves a *marker* in a point's folder, ``job.json``, when it queues or starts the point: which launcher,
the job (a SLURM job id such as ``1234_5``, or a local process id with its host and start time), since when, and
where its log is. The sweep's points are listed in ``<sweep_root>/sweep_points.json`` (every launch adds its
grid), so a point that never started is reported ``missing`` rather than forgotten.

A marker is *live* while its job is: for SLURM, while ``squeue`` lists the job (``sacct`` then says how a job
that left the queue ended); for a local process, while the process with that id and start time runs on this
host. A point whose marker is live is never launched again; a stale marker (its job gone without a
``results.json``) makes the point ``failed``, and the next launch starts it again (it resumes from its
``checkpoints/last.ckpt``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ssl_kvasir.errors import DataError
from ssl_kvasir.files import atomic_write_json, process_alive, process_start
from ssl_kvasir.run.folder import RunFolder, read_results

MARKER = "job.json"
MANIFEST = "sweep_points.json"
POINT_LOG = "point.log"  # a local point's output
STATES = ("done", "running", "queued", "failed", "missing")

# squeue's job states (``%T``) by what they mean here.
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD"}
SLURM_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


@dataclass(frozen=True)
class PointStatus:
    """One point of a sweep.

    Attributes:
        path: the point's folder.
        state: one of :data:`STATES`.
        detail: the job, progress, or the last log line, in words.
        live: whether a queued or running job holds the point (it must not be launched again).
    """

    path: Path
    state: str
    detail: str = ""
    live: bool = False


# ---- markers ----------------------------------------------------------------------------------------------------
def write_marker(out: Path, *, launcher: str, job_id: str, state: str, log: Path | None = None) -> dict:
    """Record that ``job_id`` holds the point ``out`` (``state``: ``queued`` or ``running``).

    For the local launcher, ``job_id`` is a process id on this host (the driver's while the point waits its
    turn, then the point's own process).
    """
    marker = {
        "launcher": launcher,
        "job_id": str(job_id),
        "state": state,
        "host": socket.gethostname(),
        "since": time.time(),
        "log": None if log is None else str(log),
    }
    if launcher == "local":
        marker["pid_start"] = process_start(int(job_id))
    atomic_write_json(Path(out) / MARKER, marker)
    return marker


def read_marker(out: Path) -> dict | None:
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "job_id" in marker else None


def clear_marker(out: Path) -> None:
    (Path(out) / MARKER).unlink(missing_ok=True)


def add_to_manifest(root: Path, points: Iterable[Path]) -> None:
    """Add ``points`` (folders) to the sweep's list of points."""
    path = Path(root) / MANIFEST
    known = list_manifest(root)
    for p in points:
        key = str(Path(p).resolve())
        if key not in known:
            known.append(key)
    atomic_write_json(path, {"points": known})


def list_manifest(root: Path) -> list[str]:
    try:
        points = json.loads((Path(root) / MANIFEST).read_text()).get("points", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(p) for p in points]


# ---- jobs -------------------------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str | None:
    """stdout of ``cmd``, or ``None`` when it cannot run or fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def slurm_job_state(job_id: str) -> tuple[str | None, str]:
    """``("queued" | "running" | None, SLURM's word for it)``: ``None`` when the job has left the queue (then
    ``sacct``'s final state, when it knows it) or when ``squeue`` cannot be run (``"squeue unavailable"``)."""
    listed = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if listed is None and _run(["squeue", "--version"]) is None:
        return "running", "squeue unavailable: cannot check"
    states = [s.strip() for s in (listed or "").splitlines() if s.strip()]
    if states:
        state = states[0]
        if state in SLURM_QUEUED:
            return "queued", state
        if state in SLURM_RUNNING:
            return "running", state
        return None, state
    history = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]) or ""
    final = [s.strip() for s in history.splitlines() if s.strip()]
    return None, final[-1] if final else "not in squeue"


def local_job_alive(marker: dict) -> bool | None:
    """Whether the marker's local process still runs (``None``: it ran on another host, which cannot be
    checked from here)."""
    started = marker.get("pid_start")
    # A marker of an earlier version holds the start time as a string.
    return process_alive(marker.get("host"), int(marker["job_id"]), None if started is None else int(started))


# ---- the status of a point --------------------------------------------------------------------------------------
def last_line(*paths: Path | str | None) -> str:
    """The last non-empty line of the first of ``paths`` that exists and has one."""
    for path in paths:
        if not path:
            continue
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                lines = [x.strip() for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
        except OSError:
            continue
        if lines:
            return lines[-1]
    return ""


def _progress(out: Path) -> str:
    parts = []
    folder = RunFolder(out)
    try:
        progress = json.loads(folder.progress.read_text())
        parts.append(f"step {progress['step']}")
    except (OSError, ValueError, KeyError):
        progress = {}
    last = folder.last
    stamp = progress.get("checkpoint_time") or (last.stat().st_mtime if last.exists() else None)
    if stamp:
        parts.append("last checkpoint " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)))
    else:
        parts.append("no checkpoint yet")
    return ", ".join(parts)


def point_status(out: Path) -> PointStatus:
    """The state of the point whose folder is ``out`` (see the module's docstring)."""
    out = Path(out)
    results = RunFolder(out).results
    if results.exists():
        try:
            mcc = read_results(results)["metrics"].get("mcc")
        except DataError as e:
            # Not a result this version can use (damaged, or of an older format): the point is to run again.
            return PointStatus(out, "failed", str(e))
        return PointStatus(out, "done", "" if mcc is None else f"MCC {mcc:.4f}")
    marker = read_marker(out)
    if marker is not None:
        job = f"job {marker['job_id']}" if marker["launcher"] == "slurm" else f"pid {marker['job_id']}"
        if marker["launcher"] == "slurm":
            state, word = slurm_job_state(marker["job_id"])
        else:
            alive = local_job_alive(marker)
            state = marker["state"] if alive is not False else None
            word = f"on {marker.get('host')}, cannot check" if alive is None else ""
        if state == "queued":
            return PointStatus(out, "queued", ", ".join(filter(None, [job, word])), live=True)
        if state == "running":
            return PointStatus(
                out, "running", ", ".join(filter(None, [job, word, _progress(out)])), live=True
            )
        line = last_line(marker.get("log"), out / POINT_LOG, out / "sweep.log")
        gone = f"{job} is gone" + (f" ({word})" if word else "")
        return PointStatus(out, "failed", f"{gone}: {line}" if line else gone)
    if out.exists() and any(out.iterdir()):
        line = last_line(out / POINT_LOG, out / "sweep.log")
        return PointStatus(out, "failed", f"no job: {line}" if line else f"no job and no {RunFolder.RESULTS}")
    return PointStatus(out, "missing")


def sweep_points(root: Path) -> list[Path]:
    """The sweep's points: those of its manifest, and any folder below ``root`` with a results file or a
    marker (points launched before the manifest existed)."""
    root = Path(root)
    found = {Path(p) for p in list_manifest(root)}
    for name in (RunFolder.RESULTS, MARKER):
        found.update(p.parent.resolve() for p in root.rglob(name) if ".submitit" not in p.parts)
    return sorted(found)


def sweep_status(root: Path) -> list[PointStatus]:
    return [point_status(p) for p in sweep_points(root)]


def format_status(statuses: list[PointStatus], root: Path) -> list[str]:
    """One line per point, ``state  folder  detail``, and a count per state."""
    root = Path(root).resolve()
    lines = []
    for s in statuses:
        try:
            name = str(s.path.resolve().relative_to(root))
        except ValueError:
            name = str(s.path)
        lines.append(f"{s.state:<8} {name}" + (f"  {s.detail}" if s.detail else ""))
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no points")
    return lines
