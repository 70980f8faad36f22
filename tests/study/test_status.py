"""Sweeps you can leave: ``make pretrain LAUNCHER=slurm WAIT=0`` submits and returns, ``make status`` follows the
points (queued, running, failed, done, missing) through fake ``sbatch``/``squeue``/``sacct``, a second launch
never submits a queued or running point again, and a stale marker (job gone) is detected and resubmitted. Local
markers are checked against live and dead processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import results_record, tiny

from ssl_kvasir.study.status import MARKER, format_status, point_status, sweep_status, write_marker
from ssl_kvasir.study.sweeps import Point, plan

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
POINTS = ("frac0.5", "frac1")


def point_dir(root: Path, budget: str) -> Path:
    return root / "supervised" / "test_resnet" / budget / "fold1" / "seed0"


@pytest.fixture
def cluster(tmp_path: Path) -> dict:
    """Fake SLURM tools: sbatch accepts every script as job 777 (keeping a copy), squeue reports the state
    written in ``state`` (``GONE``: the job left the queue), sacct says FAILED."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state, calls = tmp_path / "state", tmp_path / "sbatch_calls"
    state.write_text("PENDING")
    tools = {
        "sbatch": f'#!/bin/sh\necho x >> {calls}\ncp "$1" {tmp_path}/job_$(wc -l < {calls}).sh\n'
        'echo "Submitted batch job 777"\n',
        "squeue": '#!/bin/sh\n[ "$1" = --version ] && { echo "slurm 23.02"; exit 0; }\n'
        f'if [ "$(cat {state})" = GONE ]; then echo "Invalid job id specified" >&2; exit 1; fi\ncat {state}\n',
        "sacct": "#!/bin/sh\necho FAILED\n",
        "srun": "#!/bin/sh\nexit 1\n",
    }
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return {"env": env, "state": state, "calls": calls, "dir": tmp_path}


def make(target: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = ["make", "-s", f"BIN={BIN}", "-o", f"{BIN}/ssl-kvasir", target, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def n_submissions(cluster: dict) -> int:
    return len(cluster["calls"].read_text().splitlines()) if cluster["calls"].exists() else 0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_slurm_sweep_submits_once_and_status_follows_it(synth_archive: Path, cluster: dict) -> None:
    root = cluster["dir"] / "runs"
    pretrain = [
        f"DATA={synth_archive}",
        f"OUT={root}",
        "LAUNCHER=slurm",
        "WAIT=0",
        "ARGS=method=supervised backbone=test_resnet data.label_fraction=0.5,1.0 data.fold=1",
    ]
    env = cluster["env"]

    def status() -> list[str]:
        done = make("status", env, f"OUT={root}")
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    def line(lines: list[str], budget: str) -> str:
        return next(x for x in lines if f"/{budget}/fold1/seed0" in x)

    # WAIT=0: one array of two tasks is submitted, each point marked with its job id, and make returns.
    done = make("pretrain", env, *pretrain)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert n_submissions(cluster) == 1
    assert "#SBATCH --array=0-1%2" in (cluster["dir"] / "job_1.sh").read_text()
    ids = {b: json.loads((point_dir(root, b) / MARKER).read_text())["job_id"] for b in POINTS}
    assert ids == {"frac0.5": "777_0", "frac1": "777_1"}
    lines = status()
    assert line(lines, "frac0.5").split()[:1] == ["queued"] and "job 777_0" in line(lines, "frac0.5")
    assert lines[-1] == "2 queued"

    # Queued: launching again submits nothing.
    done = make("pretrain", env, *pretrain)
    assert done.returncode == 0 and n_submissions(cluster) == 1
    assert "nothing to submit" in done.stdout + done.stderr
    assert "not launched again" in (point_dir(root, "frac1") / "sweep.log").read_text()

    # Running: the job, SLURM's state, the step and the time of the last checkpoint.
    cluster["state"].write_text("RUNNING")
    stamp = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    progress = {"step": 120, "epoch": 0, "time": stamp, "checkpoint_time": stamp}
    (point_dir(root, "frac0.5") / "progress.json").write_text(json.dumps(progress))
    lines = status()
    assert line(lines, "frac0.5").startswith("running ")
    assert "job 777_0, RUNNING, step 120, last checkpoint 2026-01-02 03:04:05" in line(lines, "frac0.5")
    assert make("pretrain", env, *pretrain).returncode == 0 and n_submissions(cluster) == 1

    # The jobs are gone (squeue no longer lists them, sacct says FAILED): failed, with the last line of the log.
    cluster["state"].write_text("GONE")
    log = Path(json.loads((point_dir(root, "frac0.5") / MARKER).read_text())["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("epoch 1\nRuntimeError: CUDA out of memory\n\n")
    lines = status()
    assert line(lines, "frac0.5").startswith("failed ")
    assert "job 777_0 is gone (FAILED): RuntimeError: CUDA out of memory" in line(lines, "frac0.5")
    # One of them finished after all; the stale one is submitted again, alone.
    (point_dir(root, "frac1") / "results.json").write_text(json.dumps(results_record()))
    assert line(status(), "frac1").startswith("done ")
    done = make("pretrain", env, *pretrain)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert n_submissions(cluster) == 2
    assert "--array" not in (cluster["dir"] / "job_2.sh").read_text()  # one point: a plain job
    assert json.loads((point_dir(root, "frac0.5") / MARKER).read_text())["job_id"] == "777"
    cluster["state"].write_text("PENDING")
    lines = status()
    assert line(lines, "frac0.5").startswith("queued ") and lines[-1] == "1 done, 1 queued"


def test_local_markers_follow_their_process(tmp_path: Path) -> None:
    live, dead, reused, fresh = (tmp_path / name for name in ("live", "dead", "reused", "fresh"))
    for folder in (live, dead, reused):
        folder.mkdir()
    write_marker(live, launcher="local", job_id=str(os.getpid()), state="running", log=live / "point.log")
    finished = subprocess.Popen(["true"])
    finished.wait()
    write_marker(dead, launcher="local", job_id=str(finished.pid), state="running", log=dead / "point.log")
    (dead / "point.log").write_text("fitting\nValueError: bad batch\n")
    # A live process id whose start time differs: another process got the id, the marker is stale.
    marker = write_marker(reused, launcher="local", job_id=str(os.getpid()), state="queued")
    (reused / MARKER).write_text(json.dumps({**marker, "pid_start": "1"}))

    assert point_status(live).state == "running" and point_status(live).live
    assert (
        f"pid {os.getpid()}" in point_status(live).detail and "no checkpoint yet" in point_status(live).detail
    )
    gone = point_status(dead)
    assert gone.state == "failed" and not gone.live
    assert gone.detail == f"pid {finished.pid} is gone: ValueError: bad batch"
    assert point_status(reused).state == "failed"
    assert point_status(fresh).state == "missing"

    points = [Point(("x=1",), p) for p in (live, dead, reused, fresh)]
    todo = plan(points, tmp_path)
    assert [p.output_dir for p in todo] == [dead, reused, fresh]  # the live one is left alone
    assert "not launched again" in (live / "sweep.log").read_text()
    # The manifest remembers the point that never started, so status lists it as missing.
    states = {s.path.name: s.state for s in sweep_status(tmp_path)}
    assert states == {"live": "running", "dead": "failed", "reused": "failed", "fresh": "missing"}
    assert format_status(sweep_status(tmp_path), tmp_path)[-1] == "1 running, 2 failed, 1 missing"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_local_sweep_with_wait_0_runs_in_the_background(synth_archive: Path, tmp_path: Path) -> None:
    """`make pretrain WAIT=0` (local) returns while its point trains; a second launch meanwhile starts nothing;
    `make status` says done once the background sweep has finished."""
    root = tmp_path / "runs"
    args = " ".join(tiny("method=supervised", "data.label_fraction=1.0", "data.fold=1", "data.batch_size=4"))
    pretrain = [f"DATA={synth_archive}", f"OUT={root}", "WAIT=0", f"ARGS={args}"]
    done = make("pretrain", ENV, *pretrain)
    assert done.returncode == 0 and "sweep started in the background" in done.stdout, done.stderr
    point = point_dir(root, "frac1")
    deadline = time.monotonic() + 300
    while not (point / MARKER).exists() and not (point / "results.json").exists():
        assert time.monotonic() < deadline, (root / "pretrain.log").read_text()
        time.sleep(0.2)
    if not (point / "results.json").exists():  # still queued or running: not launched twice
        again = make("pretrain", {**ENV}, *[a for a in pretrain if a != "WAIT=0"])
        assert again.returncode == 0
        assert "Launching 0 of 1 points locally" in again.stdout + again.stderr
    while not (point / "results.json").exists() or (point / MARKER).exists():
        assert time.monotonic() < deadline, (root / "pretrain.log").read_text()
        time.sleep(0.2)
    status = make("status", ENV, f"OUT={root}")
    assert status.stdout.splitlines()[-1] == "1 done", status.stdout
    assert (root / "pretrain.log").read_text().count("Launching 1 of 1 points locally") == 1


def test_a_results_record_is_read_through_the_one_reader(tmp_path: Path) -> None:
    """A point is done only with a results record of this version; an old (unversioned) or empty file makes it
    failed, with the reader's one line, so that the next launch runs it again."""
    done = tmp_path / "done"
    done.mkdir()
    (done / "results.json").write_text(json.dumps(results_record(metrics={"mcc": 0.25})))
    assert (point_status(done).state, point_status(done).detail) == ("done", "MCC 0.2500")
    for content in ("{}", json.dumps({"metrics": {"mcc": 0.5}})):
        old = tmp_path / f"old{len(content)}"
        old.mkdir()
        (old / "results.json").write_text(content)
        status = point_status(old)
        assert status.state == "failed" and "unversioned results file" in status.detail
        assert str(old / "results.json") in status.detail
