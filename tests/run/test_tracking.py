"""W&B conventions (run names, groups, job types of self-training's rounds) and FixMatch's per-class
pseudo-label logging (counts, precision, FlexMatch thresholds) checked against the steps' own mask rates and the
checkpointed masking state."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import tiny

from ssl_kvasir.config import compose
from ssl_kvasir.pseudo_labels.masking import ClassAdaptiveThreshold
from ssl_kvasir.run.folder import RunFolder, write_run_record
from ssl_kvasir.run.tracking import run_identity, run_name, wandb_run_id


def test_run_names_groups_and_round_job_types() -> None:
    cfg = compose(
        "fit",
        ["data.root=/d", "output_dir=/o", "method=fixmatch", "backbone=resnet50", "data.label_fraction=0.1"],
    )
    assert run_name(cfg) == "fixmatch-resnet50-frac0.1-fold0-seed0"
    assert run_identity(cfg) == {
        "name": "fixmatch-resnet50-frac0.1-fold0-seed0",
        "group": "fixmatch-resnet50-frac0.1",
        "job_type": "train",
        "config": {},
    }
    st = compose(
        "fit",
        ["data.root=/d", "output_dir=/o", "method=self_training", "method.rounds=2", "data.fold=1", "seed=3"],
    )
    ids = [run_identity(st, {"round": r, "n_pseudo": 0}) for r in range(3)]
    assert [i["name"] for i in ids] == [
        f"self_training-resnet18-frac1-fold1-seed3-round{r}" for r in range(3)
    ]
    assert [i["job_type"] for i in ids] == ["teacher", "student", "final"]
    assert [i["config"] for i in ids] == [{"round": 0}, {"round": 1}, {"round": 2}]
    # Only the final student stands for the point in its group; the other rounds have a group of their own.
    assert [i["group"] for i in ids] == ["self_training-resnet18-frac1-rounds"] * 2 + [
        "self_training-resnet18-frac1"
    ]


def test_the_wandb_run_id_travels_with_the_run_folder(tmp_path: Path) -> None:
    """The id of a run's W&B run (and of each stage's) comes from its run.json and the stage's place in the
    run, not from the folder's path: moved, it is the same; another folder of the same settings, another."""

    def ids(out: Path) -> tuple[str, str]:
        cfg = compose("fit", [f"data.root={tmp_path}", f"output_dir={out}"])
        return wandb_run_id(cfg, out), wandb_run_id(cfg, out / "round_0")

    before = ids(tmp_path / "old")  # no run.json yet (an older folder): from the path
    assert before != ids(tmp_path / "elsewhere")
    for name in ("run", "repeat"):
        (tmp_path / name).mkdir()
        write_run_record(RunFolder(tmp_path / name), {"seed": 0})
    run, stage = ids(tmp_path / "run")
    assert run != stage and len(run) == 16
    (tmp_path / "moved").mkdir()
    (tmp_path / "run" / "run.json").rename(tmp_path / "moved" / "run.json")
    assert ids(tmp_path / "moved") == (run, stage)
    assert ids(tmp_path / "repeat")[0] != run


@pytest.mark.slow
def test_fixmatch_logs_pseudo_labels_per_class(synth_archive: Path, tmp_path: Path) -> None:
    from ssl_kvasir.run.train import fit

    steps_per_epoch = 3
    out = tmp_path / "flexmatch"
    cfg = compose(
        "fit",
        [
            f"data.root={synth_archive}",
            f"data.split_file={synth_archive / '2_fold_split.csv'}",
            f"output_dir={out}",
            *tiny(
                "method=fixmatch",
                "method.masking=flexmatch",
                "data.batch_size=4",
                f"data.steps_per_epoch={steps_per_epoch}",
                "trainer.max_steps=6",
                "trainer.log_every_n_steps=1",
            ),
        ],
    )
    results = fit(cfg)
    names = results["classes"]
    log = pd.read_csv(out / "logs" / "metrics.csv")
    n_ulb = 4 * 2
    steps = log[log["train/mask_rate"].notna()]
    epochs = log[log[f"train/pl_count/{names[0]}"].notna()].sort_values("epoch")
    assert list(epochs.epoch) == [0, 1] and len(steps) == 6
    for epoch, row in epochs.set_index("epoch").iterrows():
        # Every pseudo-label that passed the mask is counted once, in its class: the sum over classes is the
        # sum over the epoch's steps of mask rate x unlabeled batch size.
        passed = (steps[steps.epoch == epoch]["train/mask_rate"] * n_ulb).sum()
        assert sum(row[f"train/pl_count/{c}"] for c in names) == pytest.approx(passed)
        for c in names:
            acc = row.get(f"train/pl_acc/{c}")
            assert pd.isna(acc) or 0.0 <= acc <= 1.0
    # The last epoch's thresholds are FlexMatch's, computed from the masking state the checkpoint holds.
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    masking = ClassAdaptiveThreshold(len(state["masking.selected"]), len(names), threshold=0.95)
    masking.selected.copy_(state["masking.selected"])
    expected = masking.class_thresholds()
    last = epochs.iloc[-1]
    for c, name in enumerate(names):
        assert last[f"train/threshold/{name}"] == pytest.approx(float(expected[c]), abs=1e-6)


@pytest.mark.slow
def test_analyze_logs_to_a_wandb_run_of_its_own(
    synth_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose run logged to W&B: ``analyze`` logs its plots, composition tables and pseudo-label
    summary to an offline run named after that run, with job type ``analysis``, in the run's group."""
    import json

    from helpers import wandb_records

    from ssl_kvasir.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = [f"data.root={synth_archive}", f"data.split_file={synth_archive / '2_fold_split.csv'}"]
    run = tmp_path / "fit"
    fit_args = tiny("trainer.max_steps=2", "logger=wandb", "data.label_fraction=0.5")
    assert main(["fit", f"output_dir={run}", *fit_args, *data]) == 0
    results = json.loads((run / "results.json").read_text())
    out = tmp_path / "analysis"
    args = [f"checkpoint={run / results['checkpoint']}", f"output_dir={out}", *data, "data.num_workers=0"]
    args += ["umap.n_neighbors=5", "cluster.enabled=false"]
    assert main(["analyze", *args]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(r.run for r in wandb_records(runs[0]) if r.WhichOneof("record_type") == "run")
    assert record.display_name == "supervised-test_resnet-frac0.5-fold0-seed0-analysis"
    assert record.job_type == "analysis" and record.run_group == results["group"]
    media = {p.name.rsplit("_", 2)[0] for p in runs[0].rglob("files/media/*/analysis/*")}
    assert {"umap_plot", "knn_confusion", "composition_composition.csv", "pseudo_label_summary"} <= media
    table = json.loads(next(runs[0].rglob("analysis/pseudo_label_summary_*.table.json")).read_text())
    pseudo = pd.read_csv(out / "pseudo_labels.csv")
    assert table["columns"][:3] == ["predicted_class", "images", "mean_confidence"]
    counts = {row[0]: row[1] for row in table["data"]}
    assert counts == pseudo.predicted_class.value_counts().to_dict()


@pytest.mark.slow
def test_self_training_rounds_are_wandb_runs_with_round_and_job_type(
    synth_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import wandb_records

    from ssl_kvasir.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "st"
    args = [f"data.root={synth_archive}", f"data.split_file={synth_archive / '2_fold_split.csv'}"]
    args += [f"output_dir={out}"]
    args += tiny(
        "method=self_training", "method.rounds=1", "data.batch_size=4", "trainer.max_steps=2", "logger=wandb"
    )
    assert main(["fit", *args]) == 0
    seen = []
    for r in range(2):
        (run_dir,) = (out / f"round_{r}" / "wandb").glob("offline-run-*")
        records = wandb_records(run_dir)
        run = next(x.run for x in records if x.WhichOneof("record_type") == "run")
        rounds = [i.value_json for i in run.config.update if i.key == "round"]
        seen.append((run.display_name, run.run_group, run.job_type, rounds))
    point = "self_training-test_resnet-frac1"
    assert seen == [
        (f"{point}-fold0-seed0-round0", f"{point}-rounds", "teacher", ["0"]),
        (f"{point}-fold0-seed0-round1", point, "final", ["1"]),
    ]
