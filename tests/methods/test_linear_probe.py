"""The linear probe: only the head trains, the backbone keeps the local weights file's values and statistics."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from ssl_kvasir.config import compose
from ssl_kvasir.run.checkpoint import load_method
from ssl_kvasir.run.train import fit


def test_only_the_head_trains_and_the_backbone_statistics_stay(make_method, make_batch):
    module = make_method("linear_probe")
    assert set(module.trainable_modules()) == {"model"}
    assert not any(p.requires_grad for p in module.model.backbone.parameters())
    stats = {k: v.clone() for k, v in module.model.backbone.state_dict().items()}
    module.step_losses(make_batch(0))["loss"].backward()
    assert all(p.grad is not None for p in module.model.head.parameters())
    assert all(torch.equal(v, module.model.backbone.state_dict()[k]) for k, v in stats.items())


@pytest.mark.slow
def test_linear_probe_fits_from_a_local_weights_file(synth_archive, tmp_path):
    import timm

    weights = tmp_path / "backbone.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    data = [f"data.root={synth_archive}", f"data.split_file={synth_archive / '2_fold_split.csv'}"]
    cfg = compose(
        "fit",
        [
            f"output_dir={tmp_path / 'run'}",
            *data,
            *tiny("method=linear_probe"),
            f"backbone.weights={weights}",
        ],
    )
    results = fit(cfg)
    assert results["method"] == "linear_probe" and 0 <= results["metrics"]["macro_f1"] <= 1
    trained = load_method(tmp_path / "run" / results["checkpoint"])  # relative to the run folder, or absolute
    saved = torch.load(weights, weights_only=True)
    moved = [k for k, v in trained.model.backbone.state_dict().items() if not torch.equal(v, saved[k])]
    assert moved == []
