"""End-to-end fits through the real command on a generated archive, and the bad input they must refuse."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import tiny, training_counts

from ssl_kvasir.cli import main
from ssl_kvasir.metrics import metrics_from_confusion

pytestmark = pytest.mark.slow

TINY = tiny("data.val_fraction=0.2")


def _data(archive) -> list[str]:
    return [f"data.root={archive}", f"data.split_file={archive / '2_fold_split.csv'}"]


def test_fixmatch_fit_writes_results_and_evaluate_reproduces_them(synth_archive, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "fit",
        "method=fixmatch",
        "method.masking=flexmatch",
        "method.alignment=labeled",
        "data.fold=1",
        "data.label_fraction=0.5",
        "data.val_policy=fold",  # 2 labels a class leave no validation image inside the budget
        "trainer.min_val_size=1",  # select on the few validation images (by default too few: final weights)
        "seed=3",
        f"output_dir={out}",
        *_data(synth_archive),
        *TINY,
    ]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert (r["method"], r["backbone"], r["fold"], r["seed"]) == ("fixmatch", "test_resnet", 1, 3)
    assert r["format"] == "ssl_kvasir.results/1" and r["checkpoint"] == "checkpoints/best.ckpt"
    # The budget as the split carries it; the labeled images it holds, counted apart.
    assert r["label_budget"] == {"kind": "fraction", "amount": 0.5, "id": "frac0.5"}
    assert (
        r["n_labels_used"]
        == r["n_labeled"] + r["n_val"]
        == sum(r["labels_per_class_used"].values()) + r["n_val"]
    )
    assert r["n_labeled"] > 0 and r["n_unlabeled"] >= 60 and r["metrics_weights"] == "ema"
    assert r["config"]["method"]["masking"] == "flexmatch" and r["code_version"].startswith("0.1.0")
    cm = np.array(r["confusion_matrix"])
    assert cm.shape == (23, 23) and cm.sum() == r["n_test"] == 69  # fold 1 holds 3 of each class's 6
    for key, value in metrics_from_confusion(cm).items():
        assert r["metrics"][key] == pytest.approx(value)
    assert set(r["metrics"]) >= {
        "mcc",
        "macro_f1",
        "micro_f1",
        "macro_precision",
        "macro_recall",
        "micro_precision",
        "micro_recall",
        "balanced_accuracy",
    }
    assert (
        r["val_metrics"] is not None
        and "validation part of the training folds" in r["selection"]["description"]
    )
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "confusion_matrix.png").exists()
    assert "MCC" in capsys.readouterr().out

    # Without data.fold, data.label_fraction or data.val_policy: evaluate takes the checkpoint's fold 1, budget
    # and split, and scores exactly what the fit scored.
    ev = tmp_path / "eval"
    evaluate = ["evaluate", f"checkpoint={out / r['checkpoint']}", f"output_dir={ev}", "data.num_workers=0"]
    assert main([*evaluate, *_data(synth_archive)]) == 0
    e = json.loads((ev / "evaluation.json").read_text())
    assert e["confusion_matrix"] == r["confusion_matrix"] and e["metrics"] == r["metrics"]

    # A finished run is not redone.
    mtime = (out / "results.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "results.json").stat().st_mtime_ns == mtime


def test_self_training_rounds(synth_archive, tmp_path):
    out = tmp_path / "st"
    args = [
        "fit",
        "method=self_training",
        "method.rounds=1",
        "method.pseudo.threshold=0.0",
        "method.pseudo.balance=duplicate",
        f"output_dir={out}",
        *_data(synth_archive),
        *TINY,
    ]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert [x["round"] for x in r["rounds"]] == [0, 1]
    assert r["rounds"][0]["n_pseudo"] == 0 and r["rounds"][1]["n_pseudo"] > 0
    from ssl_kvasir.pseudo_labels.table import read_pseudo_labels

    table = read_pseudo_labels(out / "round_0" / "pseudo_labels.csv")
    assert len(table) == r["n_unlabeled"]
    assert not (out / "round_0" / "results.json").exists()  # sweeps count the whole run once


def test_pseudo_label_selection_balances_classes():
    from ssl_kvasir.pseudo_labels.selection import select_pseudo_labels

    probs = np.array([[0.9, 0.1]] * 6 + [[0.2, 0.8]] * 2 + [[0.55, 0.45]])
    conf, pred = probs.max(1), probs.argmax(1)
    pos = select_pseudo_labels(conf, pred, 2, min_confidence=0.6, balance="cap", max_per_class=3)
    assert pos.tolist() == [0, 1, 2, 6, 7]
    pos = select_pseudo_labels(conf, pred, 2, min_confidence=0.6, balance="duplicate", max_per_class=3)
    assert sorted(pos.tolist()) == [0, 1, 2, 6, 6, 7]
    assert len(select_pseudo_labels(conf, pred, 2)) == 9
    # The default budget is the median count over the classes with any kept image: median(6, 2) = 4.
    pos = select_pseudo_labels(conf, pred, 2, min_confidence=0.6, balance="cap")
    assert pos.tolist() == [0, 1, 2, 3, 6, 7]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=mixmatch", "Could not find 'method/mixmatch'"),
        ("backbone.name=resnet1800", "unknown backbone 'resnet1800'"),
        ("trainer.max_step=3", "max_step"),
        ("data.label_fraction=0", r"label_fraction must be in \(0, 1\]"),
        ("data.label_fraction=1.5", r"label_fraction must be in \(0, 1\]"),
        ("data.fold=2", "the split has folds 0..1"),
    ],
)
def test_bad_config_gets_one_clear_line(synth_archive, tmp_path, capsys, override, message):
    assert main(["fit", f"output_dir={tmp_path}", *_data(synth_archive), *TINY, override]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message.replace("\\", "") in err or __import__("re").search(message, err)


def test_checkpoint_of_another_class_count_is_refused(synth_archive, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "run"
    assert main(["fit", f"output_dir={out}", *_data(synth_archive), *TINY]) == 0
    ckpt = out / json.loads((out / "results.json").read_text())["checkpoint"]
    for cls in ("a", "b"):
        (tmp_path / "two" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "two" / cls / f"{i}.jpg")
    code = main(
        [
            "evaluate",
            f"checkpoint={ckpt}",
            f"output_dir={tmp_path / 'e'}",
            "data=folder",
            f"data.root={tmp_path / 'two'}",
            "data.generate_folds=2",
            *TINY,
        ]
    )
    assert code == 2
    assert "was trained on 23 classes that the data at" in capsys.readouterr().err


def test_nan_loss_stops_with_a_message_and_keeps_last_checkpoint(synth_archive, tmp_path, capsys):
    out = tmp_path / "nan"
    args = [
        "fit",
        f"output_dir={out}",
        *_data(synth_archive),
        *TINY,
        "data.steps_per_epoch=1",
        "method.lr=1e30",
        "method.momentum=0",
        "method.nesterov=false",
        "method.eval_weights=model",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "last good checkpoint" in err
    assert (out / "checkpoints" / "last.ckpt").exists() and not (out / "results.json").exists()


def test_fit_from_cache_leaves_out_undecodable_images(synth_archive, tmp_path, capsys):
    root = tmp_path / "archive"
    shutil.copytree(synth_archive, root)
    victim = next((root / "unlabeled-images" / "images").iterdir())
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    cache = tmp_path / "cache"
    assert main(["prepare", "--root", str(root), "--cache", str(cache), "--size", "32", "--no-progress"]) == 0
    out = tmp_path / "run"
    args = ["fit", "method=fixmatch", f"output_dir={out}", f"data.cache={cache}", *_data(root), *TINY]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["n_unlabeled"] == 59  # 60 generated, one truncated and reported
    assert victim.name in capsys.readouterr().err
    assert main([*args[: -len(TINY)], *TINY, "data.image_size=64", f"output_dir={tmp_path / 'r2'}"]) == 2
    assert "built at 32 px" in capsys.readouterr().err


def test_wandb_logger_runs_offline_with_group_and_tags(synth_archive, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # W&B not configured: must stay offline
    out = tmp_path / "wb"
    args = [
        "fit",
        "method=fixmatch",
        "data.label_fraction=0.5",
        f"output_dir={out}",
        *_data(synth_archive),
        *TINY,
    ]
    assert main([*args, "logger=wandb"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["group"] == "fixmatch-test_resnet-frac0.5"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_channels_last_gives_the_same_kind_of_results(synth_archive, tmp_path):
    # The NHWC memory format (for bf16 on GPUs) must not change what a run computes or records.
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        assert (
            main(["fit", f"output_dir={out}", f"trainer.channels_last={flag}", *_data(synth_archive), *TINY])
            == 0
        )
        runs[flag] = json.loads((out / "results.json").read_text())
    assert runs["true"]["config"]["trainer"]["channels_last"] is True
    a, b = runs["false"]["metrics"], runs["true"]["metrics"]
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 0.1 for k in a)


@pytest.mark.slow
def test_validation_is_inside_the_label_budget_at_one_percent(one_percent_run, imbalanced_archive):
    r = one_percent_run
    available = training_counts(imbalanced_archive, eval_fold=1)
    budget = np.maximum(np.round(0.01 * available), 1)  # what a user with 1 % of the labels has
    assert r["val_policy"] == "budget"
    assert r["label_budget"] == {"kind": "fraction", "amount": 0.01, "id": "frac0.01"}
    assert r["n_labels_used"] == budget.sum() == r["n_labeled"] + r["n_val"]
    assert r["n_val"] == 1 and r["n_labels_used"] == 27  # 5 of the big class (1 validates) + 22 single images
    # One validation image: fewer than trainer.min_val_size, so the run keeps its final weights.
    assert r["val_metrics"] is not None and r["selection"]["n_val"] == 1
    assert r["selection"]["step"] == r["steps"] and r["selection"]["description"].startswith("final weights")
