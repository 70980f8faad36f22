"""The kNN probe: the database its fit fills, its vote against a naive one, a fit from a local weights file."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny

from ssl_kvasir.config import compose
from ssl_kvasir.run.checkpoint import load_method
from ssl_kvasir.run.train import fit


def test_the_vote_of_a_fixed_database_is_the_weighted_naive_one(make_method):
    module = make_method("knn_probe", k=2, temperature=0.5).eval()
    d = module.model.num_features
    # Three stored images of classes 0, 1, 1 along three axes; a query between the first two axes.
    module.bank.zero_()
    module.bank[:3, :3] = torch.eye(3)
    module.bank_labels[:3] = torch.tensor([0, 1, 1])
    query = torch.zeros(1, d)
    query[0, :2] = torch.tensor([0.8, 0.6])  # cosine 0.8 with image 0, 0.6 with image 1, 0 with image 2
    original = module.model.backbone.forward
    module.model.backbone.forward = lambda x: query  # the features of "any image" are the query
    try:
        _, logits = module.predict_batch(torch.zeros(1, 3, 32, 32))
    finally:
        module.model.backbone.forward = original
    w0, w1 = math.exp(0.8 / 0.5), math.exp(0.6 / 0.5)  # the two nearest vote with exp(s / tau)
    expected = [w0 / (w0 + w1), w1 / (w0 + w1), 0.0, 0.0, 0.0]
    assert logits.exp()[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_a_step_stores_features_and_labels_at_the_images_positions(make_method, make_batch):
    module = make_method("knn_probe")
    assert module.trainable_modules() == {} and len(module.bank) == 5  # one labeled image per class
    batch = make_batch(0)
    batch["lb"]["eval"] = batch["lb"].pop("weak")
    batch["lb"]["pos"] = torch.tensor([4, 0, 2, 1])
    assert module.training_step(batch, 0) is None
    with torch.no_grad():
        features = module.model.backbone(batch["lb"]["eval"])
    assert torch.allclose(module.bank[[4, 0, 2, 1]], features)
    assert module.bank_labels.tolist() == [1, 3, 2, -1, 0]


@pytest.mark.slow
def test_knn_probe_fits_from_a_local_weights_file_and_fills_its_database(synth_archive, tmp_path):
    import timm

    weights = tmp_path / "backbone.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    data = [f"data.root={synth_archive}", f"data.split_file={synth_archive / '2_fold_split.csv'}"]
    overrides = tiny("method=knn_probe", "method.k=3", "trainer.max_steps=48", "data.steps_per_epoch=16")
    cfg = compose("fit", [f"output_dir={tmp_path / 'run'}", *data, *overrides, f"backbone.weights={weights}"])
    results = fit(cfg)
    assert results["method"] == "knn_probe" and 0 <= results["metrics"]["macro_f1"] <= 1
    trained = load_method(tmp_path / "run" / results["checkpoint"])
    assert (trained.bank_labels >= 0).all()  # every labeled training image is in the database
    assert len(trained.bank) == results["n_labeled"]
    # The first epoch filled the database, and the fit ended with it (not after the three epochs asked for).
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 16
