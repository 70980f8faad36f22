"""The paper's systems as configs: they compose, name real timm models, and train through `fit`."""

from __future__ import annotations

import json

import pytest
import timm
from helpers import tiny

from ssl_kvasir.cli import main
from ssl_kvasir.config import compose

SYSTEMS = {
    "table3_resnet50": ("resnet50", "linear", "ResNet-50"),
    "table3_resnet152": ("resnet152", "linear", "ResNet-152"),
    "table3_densenet161": ("densenet161", "linear", "DenseNet-161"),
    "table3_resnet152_densenet161": (
        "resnet152+densenet161",
        "averaged",
        "ResNet-152 + DenseNet-161 averaged",
    ),
    "table3_resnet152_densenet161_mlp": ("resnet152+densenet161", "mlp", "ResNet-152 + DenseNet-161 + MLP"),
}


@pytest.mark.parametrize("experiment", sorted(SYSTEMS))
def test_paper_system_configs(experiment):
    from ssl_kvasir.study.table3 import paper_row_for_backbone

    cfg = compose("fit", [f"experiment={experiment}", "data.root=x", "output_dir=y"])
    name, head, row = SYSTEMS[experiment]
    assert (cfg.backbone.name, cfg.backbone.head, cfg.system) == (name, head, experiment)
    assert cfg.method.name == "supervised" and cfg.method.lr == 0.001 and cfg.data.batch_size == 32
    assert cfg.data.image_size == 224 and cfg.backbone.pretrained is True
    assert all(timm.is_model(part) for part in name.split("+"))
    results_backbone = name if head in ("linear", "averaged") else f"{name}+{head}"
    assert paper_row_for_backbone(results_backbone) == row


@pytest.mark.slow
def test_ensemble_system_trains_through_fit_and_reports(synth_archive, tmp_path):
    # The MLP ensemble's config with two tiny timm models standing in for ResNet-152 and DenseNet-161.
    common = [
        f"data.root={synth_archive}",
        f"data.split_file={synth_archive / '2_fold_split.csv'}",
        *tiny(
            "experiment=table3_resnet152_densenet161_mlp",
            # The system's own backbone group (a command-line group choice overrides the experiment's).
            "backbone=resnet152_densenet161_mlp",
            "backbone.name=test_resnet+test_efficientnet",
            "backbone.pretrained=false",
            "trainer.max_steps=2",
        ),
    ]
    for fold in (0, 1):
        assert main(["fit", f"data.fold={fold}", f"output_dir={tmp_path / f'fold{fold}'}", *common]) == 0
    r = json.loads((tmp_path / "fold0" / "results.json").read_text())
    assert r["system"] == "table3_resnet152_densenet161_mlp" and r["backbone"].endswith("+mlp")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "table3.csv").read_text()
    assert "table3_resnet152_densenet161_mlp" in table


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
