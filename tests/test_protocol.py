"""Comparisons a reviewer would accept (issue 10): methods on one protocol, validation inside the label budget,
a kNN database inside it too, FixMatch's defaults as published, dropout applied once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import results_record, tiny

from ssl_kvasir.cli import main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
TINY = tiny("data.batch_size=4")
SHARED = ("optimizer", "lr", "schedule", "weight_decay", "ema_decay", "eval_weights")
# One class with 1,000 images among 22 with 2: at 1 % the big class's budget is 5 (one of them validates),
# every other class keeps its single image for training.
COUNTS = [1000] + [2] * 22


def test_dropout_is_applied_once():
    from ssl_kvasir.models import build_network

    torch.manual_seed(0)
    net = build_network("test_resnet", 5, drop_rate=0.5).train()
    x = torch.randn(8, 3, 32, 32)
    # The backbone itself has no dropout: in training mode it gives the same features twice.
    assert torch.equal(net.backbone(x), net.backbone(x))
    seen = []
    linear = net.head[-1]
    linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        clean = net.backbone(x)  # (8, D)
        net(x)
    dropped = seen[0]  # (8, D) what the classifier received
    alive = clean > 0
    share = float((dropped[alive] == 0).float().mean())
    assert 0.4 < share < 0.6  # dropout 0.5 once, not 0.75
    kept = dropped[alive] != 0
    assert torch.allclose(dropped[alive][kept], 2 * clean[alive][kept], atol=1e-5)  # scaled by 1 / (1 - 0.5)


@pytest.fixture(scope="module")
def imbalanced_archive(tmp_path_factory) -> Path:
    from ssl_kvasir.data.synth import make_synthetic_archive

    root = tmp_path_factory.mktemp("imbalanced") / "hyper-kvasir"
    return make_synthetic_archive(root, per_class=COUNTS, unlabeled=20, seed=0, sizes=[(40, 40)])


@pytest.fixture(scope="module")
def one_percent_run(imbalanced_archive, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("budget") / "run"
    args = [
        "fit",
        "method=supervised",
        f"data.root={imbalanced_archive}",
        f"data.split_file={imbalanced_archive / '2_fold_split.csv'}",
        "data.label_fraction=0.01",
        "data.fold=1",
        f"output_dir={out}",
        *TINY,
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    # The record names its checkpoint relative to the run's folder.
    return {**results, "checkpoint": str(out / results["checkpoint"])}


def _training_counts(archive: Path, eval_fold: int) -> np.ndarray:
    """Training-fold images per class, read from the split file."""
    import pandas as pd

    from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES

    split = pd.read_csv(archive / "2_fold_split.csv", sep=";")
    index = {c.split_name: i for i, c in enumerate(HYPERKVASIR_CLASSES)}
    train = split[split["split-index"] != eval_fold]
    return np.bincount(train["class-name"].map(index), minlength=23)


@pytest.mark.slow
def test_validation_is_inside_the_label_budget_at_one_percent(one_percent_run, imbalanced_archive):
    r = one_percent_run
    available = _training_counts(imbalanced_archive, eval_fold=1)
    budget = np.maximum(np.round(0.01 * available), 1)  # what a user with 1 % of the labels has
    assert r["val_policy"] == "budget"
    assert r["label_budget"] == {"kind": "fraction", "amount": 0.01, "id": "frac0.01"}
    assert r["n_labels_used"] == budget.sum() == r["n_labeled"] + r["n_val"]
    assert r["n_val"] == 1 and r["n_labels_used"] == 27  # 5 of the big class (1 validates) + 22 single images
    # One validation image: fewer than trainer.min_val_size, so the run keeps its final weights.
    assert r["val_metrics"] is not None and r["selection"]["n_val"] == 1
    assert r["selection"]["step"] == r["steps"] and r["selection"]["description"].startswith("final weights")


@pytest.mark.slow
def test_knn_database_is_the_checkpoints_own_labeled_images(one_percent_run, imbalanced_archive, tmp_path):
    from ssl_kvasir.config import compose
    from ssl_kvasir.data.splits import make_split
    from ssl_kvasir.errors import ConfigError
    from ssl_kvasir.names import LabelBudget
    from ssl_kvasir.run import analyze as analysis

    data = [f"data.root={imbalanced_archive}", f"data.split_file={imbalanced_archive / '2_fold_split.csv'}"]
    base = [
        f"checkpoint={one_percent_run['checkpoint']}",
        f"output_dir={tmp_path}",
        "data.fold=1",
        "data.num_workers=0",
        *data,
    ]
    cfg = compose("analyze", base)
    module, exp = analysis.load_checkpoint_and_data(cfg)
    rows = analysis.knn_database(cfg, module, exp)
    # The rows a user with the 1 % budget labeled, cut independently of the checkpoint.
    own = make_split(exp.catalog, 1, budget=LabelBudget.from_settings(0.01, None), seed=0)
    assert rows.tolist() == sorted([*own.labeled, *own.val]) and len(rows) == one_percent_run["n_labels_used"]
    cfg_all = compose("analyze", [*base, "knn.database=all", "data.image_size=32"])
    assert analysis.knn_database(cfg_all, module, exp) is None
    store = analysis.embed(cfg_all, module, exp)
    everything = analysis.Analysis(store=store, eval_fold=1).train_rows
    assert len(everything) == _training_counts(imbalanced_archive, 1).sum() > len(rows)
    budget = analysis.Analysis(store=store, eval_fold=1, database_rows=rows)
    analysis.run_knn(cfg, budget)
    assert budget.knn_metrics["n_db"] == 27
    # The vote never comes from a labeled image outside the budget: those rows are queries, not neighbours.
    assert not np.isnan(budget.knn_probs[np.setdiff1d(everything, rows)]).any()
    with pytest.raises(
        ConfigError, match=r"data.fold=0, but checkpoint .* fold 1 held out: pass data.fold=1"
    ):
        analysis.knn_database(compose("analyze", [*base, "data.fold=0"]), module, exp)


@pytest.mark.slow
def test_sweep_of_supervised_and_fixmatch_shares_one_protocol(synth_archive, tmp_path):
    """A sweep over both methods, at the defaults: only the unlabeled losses differ."""
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
        *TINY,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = {p.parts[-6]: p for p in root.rglob("results.json")}
    assert set(found) == {"supervised", "fixmatch"}
    sup, fm = (json.loads(found[m].read_text()) for m in ("supervised", "fixmatch"))
    assert {k: sup["config"]["method"][k] for k in SHARED} == {k: fm["config"]["method"][k] for k in SHARED}
    assert sup["config"]["method"]["lr"] == 0.03 and sup["config"]["method"]["eval_weights"] == "ema"
    assert sup["steps"] == fm["steps"] == 4
    assert sup["protocol"] == fm["protocol"] == "matched"
    assert sup["n_labeled"] == fm["n_labeled"] and sup["n_labels_used"] == fm["n_labels_used"]
    # A default FixMatch run: the live network labels the weak view, as in the paper.
    assert fm["config"]["method"]["teacher"] == "model"
    hydra_record = yaml.safe_load((found["fixmatch"].parent / ".hydra" / "config.yaml").read_text())
    assert hydra_record["method"]["teacher"] == "model"
    assert hydra_record["method"]["alignment"] is None and hydra_record["method"]["threshold"] == 0.95


def test_paper_protocol_is_the_table3_one():
    from ssl_kvasir.config import compose

    paper = compose("fit", ["data.root=/d", "output_dir=/o", "experiment=table3_resnet50"])
    assert (paper.protocol, paper.method.lr, paper.method.schedule, paper.method.eval_weights) == (
        "paper",
        0.001,
        "constant",
        "model",
    )
    for method in ("supervised", "fixmatch", "self_training"):
        cfg = compose("fit", ["data.root=/d", "output_dir=/o", f"method={method}"])
        assert cfg.protocol == "matched" and cfg.data.val_policy == "budget"
        assert (cfg.method.lr, cfg.method.schedule, cfg.method.eval_weights) == (0.03, "cosine", "ema")


def test_curves_say_which_protocol_and_validation_policy_made_each_point(tmp_path):
    from ssl_kvasir.study.curves import load_runs, render_markdown, summarize

    def write(name: str, seed: int, **fields) -> None:
        results = results_record(seed=seed, **fields)
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))

    write("a", 0, protocol="matched", val_policy="budget")
    write("b", 1, protocol="matched", val_policy="budget")
    summary = summarize(load_runs([tmp_path], ["mcc"]), ["mcc"])
    assert (summary.protocol.tolist(), summary.val_policy.tolist()) == (["matched"], ["budget"])
    assert "Protocol: matched; validation: budget." in render_markdown(summary, ["mcc"])
    write("c", 2)  # a hand-made record that names neither
    summary = summarize(load_runs([tmp_path], ["mcc"]), ["mcc"])
    assert (summary.protocol.tolist(), summary.val_policy.tolist()) == (
        ["matched unrecorded"],
        ["budget unrecorded"],
    )
    assert "Protocol: matched, unrecorded; validation: budget, unrecorded (mixed" in render_markdown(
        summary, ["mcc"]
    )
