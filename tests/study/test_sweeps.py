"""The label-efficiency sweep: Hydra's real multirun machinery with submitit's local executor standing in for
SLURM, the skip of finished runs, the SLURM launcher's sbatch script from the make variables, run folder names,
and a 2-process DDP fit on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import results_record, tiny, wandb_records
from hydra import compose, initialize_config_dir
from omegaconf.errors import InterpolationResolutionError

from ssl_kvasir.errors import ConfigError
from ssl_kvasir.study.sweeps import match_launcher

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = tiny("method=supervised", "data.batch_size=4")
FRACTIONS = (0.5, 1.0)
# One torch thread per process: tiny convolutions gain nothing from more, and on shared cores they spin.
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def sweep_command(archive: Path, root: Path) -> list[str]:
    return [
        sys.executable,
        "experiments/sweep.py",
        "hydra/launcher=submitit_local",
        f"data.root={archive}",
        f"data.split_file={archive / '2_fold_split.csv'}",
        f"sweep_root={root}",
        "data.label_fraction=" + ",".join(map(str, FRACTIONS)),
        "data.fold=1",
        *TINY,
    ]


def run_dir(root: Path, fraction: float) -> Path:
    return root / "supervised" / "test_resnet" / f"frac{fraction:g}" / "fold1" / "seed0"


@pytest.fixture(scope="module")
def sweep_root(synth_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two points (label fraction 0.5 and 1.0, fold 1) launched as submitit jobs in their own processes."""
    root = tmp_path_factory.mktemp("sweep") / "runs"
    done = subprocess.run(
        sweep_command(synth_archive, root), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


@pytest.mark.slow
def test_two_point_sweep_writes_one_run_per_point(sweep_root: Path) -> None:
    found = sorted(sweep_root.rglob("results.json"))
    assert found == sorted(run_dir(sweep_root, f) / "results.json" for f in FRACTIONS)
    for fraction in FRACTIONS:
        results = json.loads((run_dir(sweep_root, fraction) / "results.json").read_text())
        assert results["fold"] == 1 and results["label_budget"]["amount"] == fraction and results["seed"] == 0
        assert results["method"] == "supervised" and results["backbone"] == "test_resnet"
        # The folder's budget is spelled as the W&B group spells it, so runs and groups line up.
        assert results["group"] == f"supervised-test_resnet-frac{fraction:g}"
        assert results["config"]["output_dir"] == str(run_dir(sweep_root, fraction))
        # Hydra's record of the job lands in the run's folder.
        assert (run_dir(sweep_root, fraction) / ".hydra" / "overrides.yaml").exists()
    # Each point ran as a submitit job of its own (as it would on SLURM).
    assert len(list((sweep_root / ".submitit").glob("*/*_result.pkl"))) == 2
    assert (
        json.loads((run_dir(sweep_root, 0.5) / "results.json").read_text())["n_labeled"]
        < json.loads((run_dir(sweep_root, 1.0) / "results.json").read_text())["n_labeled"]
    )


@pytest.mark.slow
def test_second_launch_skips_finished_runs(sweep_root: Path, synth_archive: Path) -> None:
    watched = [
        run_dir(sweep_root, f) / name for f in FRACTIONS for name in ("results.json", "checkpoints/last.ckpt")
    ]
    before = {p: p.stat().st_mtime_ns for p in watched}
    done = subprocess.run(
        sweep_command(synth_archive, sweep_root),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # nothing retrained or rewritten
    for fraction in FRACTIONS:
        log = (run_dir(sweep_root, fraction) / "sweep.log").read_text()
        assert f"skipping {run_dir(sweep_root, fraction)}: results.json exists" in log
        assert log.count("fitting ") == 1  # the first launch only


@pytest.mark.slow
def test_ddp_fit_on_cpu_writes_the_same_fields(sweep_root: Path, synth_archive: Path, tmp_path: Path) -> None:
    """Two processes (gloo) write one results.json with the fields of a single-process run of the sweep."""
    out = tmp_path / "ddp"
    cmd = [
        str(BIN / "ssl-kvasir"),
        "fit",
        f"data.root={synth_archive}",
        f"data.split_file={synth_archive / '2_fold_split.csv'}",
        f"output_dir={out}",
        "data.label_fraction=1.0",
        "data.fold=1",
        *TINY,
        "trainer.strategy=ddp",
        "trainer.devices=2",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distributed_backend=gloo" in done.stdout + done.stderr
    ddp = json.loads((out / "results.json").read_text())
    single = json.loads((run_dir(sweep_root, 1.0) / "results.json").read_text())
    assert set(ddp) == set(single)
    assert set(ddp["metrics"]) == set(single["metrics"]) and set(ddp["val_metrics"] or {}) == set(
        single["val_metrics"] or {}
    )
    for key in ("method", "backbone", "fold", "label_budget", "n_labeled", "n_test", "classes", "steps"):
        assert ddp[key] == single[key], key
    assert [c["class"] for c in ddp["per_class"]] == [c["class"] for c in single["per_class"]]
    # Every test image counted once: neither split between the ranks nor counted by both.
    assert (
        sum(map(sum, ddp["confusion_matrix"])) == ddp["n_test"] == sum(map(sum, single["confusion_matrix"]))
    )


def compose_sweep(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("sweep", overrides=["data.root=/data", *overrides], return_hydra_config=True)


def test_run_folder_names_follow_the_budget_and_backbone() -> None:
    cfg = compose_sweep(
        ["sweep_root=/r", "method=fixmatch", "data.label_fraction=0.05", "data.fold=1", "seed=2"]
    )
    assert cfg.output_dir == "/r/fixmatch/resnet18/frac0.05/fold1/seed2"
    cfg = compose_sweep(
        ["data.label_fraction=null", "data.labels_per_class=25", "backbone=resnet152_densenet161_mlp"]
    )
    assert cfg.output_dir == "runs/supervised/resnet152+densenet161+mlp/lpc25/fold0/seed0"
    cfg = compose_sweep(["data.label_fraction=null"])
    # OmegaConf wraps the resolver's ConfigError; its message names both keys.
    with pytest.raises(
        InterpolationResolutionError, match="exactly one of data.label_fraction and data.labels_per_class"
    ):
        _ = cfg.output_dir
    # The default grid: the 7 core methods x 6 fractions x 2 folds x 1 seed.
    params = cfg.hydra.sweeper.params
    assert [
        len(str(params[k]).split(",")) for k in ("method", "data.label_fraction", "data.fold", "seed")
    ] == [7, 6, 2, 1]
    assert str(params.method).split(",") == [
        "supervised",
        "fixmatch",
        "self_training",
        "acr",
        "simpro",
        "linear_probe",
        "knn_probe",
    ]


def test_the_every_method_preset_sweeps_the_whole_registry() -> None:
    from ssl_kvasir.methods import METHODS

    params = compose_sweep(["experiment=every_method"]).hydra.sweeper.params
    assert sorted(str(params.method).split(",")) == sorted(METHODS)
    assert str(params["data.label_fraction"]).split(",") == ["0.01", "0.05", "0.1", "0.25", "0.5", "1.0"]


def test_slurm_launcher_sets_the_trainer_to_its_tasks() -> None:
    cfg = compose_sweep(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2"])
    assert cfg.hydra.launcher.tasks_per_node == 4  # one process per GPU by default
    match_launcher(cfg, cfg.hydra.launcher)
    assert cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2
    cfg = compose_sweep(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "trainer.devices=2"])
    with pytest.raises(ConfigError, match="disagree with the SLURM launcher"):
        match_launcher(cfg, cfg.hydra.launcher)
    cfg = compose_sweep(["trainer.devices=2"])  # the local launcher leaves the trainer alone
    match_launcher(cfg, cfg.hydra.launcher)
    assert cfg.trainer.devices == 2


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_pretrain_slurm_writes_the_sbatch_script(synth_archive: Path, tmp_path: Path) -> None:
    """`make pretrain LAUNCHER=slurm ...` through the real submitit launcher, with an `sbatch` that keeps the
    script it is given and refuses the job (there is no cluster here)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\necho "sbatch: no cluster here" >&2\nexit 1\n'
    )
    # submitit looks for srun before it submits; the job never starts, so srun is never called.
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (fake / tool).chmod(0o755)
    cmd = [
        "make",
        "-s",
        f"BIN={BIN}",
        "-o",
        f"{BIN}/ssl-kvasir",  # never reinstall from a test
        "pretrain",
        f"DATA={synth_archive}",
        f"OUT={tmp_path / 'runs'}",
        "LAUNCHER=slurm",
        "PARTITION=gpu",
        "ACCOUNT=proj",
        "GPUS=4",
        "NODES=2",
        "TIME=90",
        "MEM=128",
        "CPUS=6",
        "ARGS=method=fixmatch data.label_fraction=0.1,1.0 data.fold=0",
    ]
    env = {**ENV, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no cluster here" in done.stdout + done.stderr
    script = (tmp_path / "job.sh").read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --nodes=2",
        "#SBATCH --time=90",
        "#SBATCH --mem=128GB",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --array=0-1%2",  # the two points as one array
        "#SBATCH --signal=USR2@120",  # submitit requeues the job on this signal before a time-out
    ):
        assert line in script.splitlines(), f"{line!r} not in\n{script}"
    assert "srun" in script and "submitit" in script


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_local_ddp_sweep_fits_each_point_once(synth_archive: Path, tmp_path: Path) -> None:
    """`make pretrain` with the local launcher over two points, each a 2-process DDP fit on the CPU: every point
    runs as its own process group, whose second rank Lightning starts by re-running that point alone (not the
    multirun); each point is fitted once, into one results.json and one W&B run named after it; `make status`
    then says done for both."""
    root = tmp_path / "runs"
    args = [
        "data.label_fraction=" + ",".join(map(str, FRACTIONS)),
        "data.fold=1",
        *tiny(*TINY, "logger=wandb"),
        "trainer.strategy=ddp",
        "trainer.devices=2",
    ]
    make = ["make", "-s", f"BIN={BIN}", "-o", f"{BIN}/ssl-kvasir"]
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [*make, "pretrain", f"DATA={synth_archive}", f"OUT={root}", "ARGS=" + " ".join(args)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Launching 2 of 2 points locally, each in its own process" in done.stdout + done.stderr
    assert sorted(root.rglob("results.json")) == sorted(run_dir(root, f) / "results.json" for f in FRACTIONS)
    for fraction in FRACTIONS:
        point = run_dir(root, fraction)
        output = (point / "point.log").read_text()
        assert "distributed_backend=gloo" in output and "Launching" not in output  # no nested multirun
        # Rank 0 (the point's process) and rank 1 (Lightning's re-run of that point) each fitted it once.
        assert (point / "sweep.log").read_text().count("fitting ") == 1
        assert (point / "train_ddp_process_1.log").read_text().count("fitting ") == 1
        results = json.loads((point / "results.json").read_text())
        assert results["config"]["trainer"]["devices"] == 2 and results["label_budget"]["amount"] == fraction
        assert not (point / "job.json").exists()  # the marker goes when the point is done
        runs = list((point / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        records = wandb_records(runs[0])
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.display_name == f"supervised-test_resnet-frac{fraction:g}-fold1-seed0"
        assert run.run_group == f"supervised-test_resnet-frac{fraction:g}" and run.job_type == "train"
        assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
    status = subprocess.run(
        [*make, "status", f"OUT={root}"], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    for fraction in FRACTIONS:
        assert any(
            line.startswith("done ") and f"supervised/test_resnet/frac{fraction:g}/fold1/seed0" in line
            for line in lines
        ), status.stdout
    assert lines[-1] == "2 done"


def test_the_sweep_skip_reads_the_record(tmp_path: Path) -> None:
    """A point whose results.json is of this version is skipped; one of an older format is refused in one line
    (exit 2), as `ssl-kvasir fit` refuses it, not skipped as if done."""
    from ssl_kvasir.config import compose as compose_fit
    from ssl_kvasir.study.sweeps import run_point

    out = tmp_path / "point"
    out.mkdir()
    cfg = compose_fit("fit", [f"data.root={tmp_path}", f"output_dir={out}"])
    (out / "results.json").write_text(json.dumps(results_record()))
    assert run_point(cfg) == {"output_dir": str(out), "skipped": True, "metrics": None}
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as refused:
        run_point(cfg)
    assert refused.value.code == 2


@pytest.mark.slow
def test_sweep_of_supervised_and_fixmatch_shares_one_protocol(synth_archive, tmp_path):
    """A sweep over both methods, at the defaults: only the unlabeled losses differ."""
    shared = ("optimizer", "lr", "schedule", "weight_decay", "ema_decay", "eval_weights")
    root = tmp_path / "runs"
    cmd = [
        sys.executable,
        "experiments/sweep.py",
        f"data.root={synth_archive}",
        f"data.split_file={synth_archive / '2_fold_split.csv'}",
        f"sweep_root={root}",
        "method=supervised,fixmatch",
        "data.label_fraction=0.5",
        "data.fold=1",
        *tiny("data.batch_size=4"),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = {p.parts[-6]: p for p in root.rglob("results.json")}
    assert set(found) == {"supervised", "fixmatch"}
    sup, fm = (json.loads(found[m].read_text()) for m in ("supervised", "fixmatch"))
    assert {k: sup["config"]["method"][k] for k in shared} == {k: fm["config"]["method"][k] for k in shared}
    assert sup["config"]["method"]["lr"] == 0.03 and sup["config"]["method"]["eval_weights"] == "ema"
    assert sup["steps"] == fm["steps"] == 4
    assert sup["protocol"] == fm["protocol"] == "matched"
    assert sup["n_labeled"] == fm["n_labeled"] and sup["n_labels_used"] == fm["n_labels_used"]
    # A default FixMatch run: the live network labels the weak view, as in the paper.
    assert fm["config"]["method"]["teacher"] == "model"
    hydra_record = yaml.safe_load((found["fixmatch"].parent / ".hydra" / "config.yaml").read_text())
    assert hydra_record["method"]["teacher"] == "model"
    assert hydra_record["method"]["alignment"] is None and hydra_record["method"]["threshold"] == 0.95
