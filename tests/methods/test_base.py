"""The extension points of methods: every registered method fits through the same code, a method defined in this
file alone (an extra trainable head) trains that head and averages it in the EMA, and the prior seam
(:attr:`BaseMethod.unlabeled_prior`, filled by ACR and SimPro): the estimate is state a checkpoint restores,
logged at every epoch start, written to results.json, set beside the predicted composition by analyze, and
resumed exactly after a kill."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fit_command, long_tailed_method, straight_and_resumed, tiny
from omegaconf import open_dict
from torch import nn

from ssl_kvasir.cli import main
from ssl_kvasir.config import compose
from ssl_kvasir.methods import METHODS, BaseMethod
from ssl_kvasir.run.checkpoint import load_method
from ssl_kvasir.run.train import fit

pytestmark = pytest.mark.slow


def _cfg(archive, out, method: str, *extra: str):
    data = [f"data.root={archive}", f"data.split_file={archive / '2_fold_split.csv'}"]
    return compose("fit", [f"output_dir={out}", *data, *tiny(f"method={method}", *extra)])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_fits_through_the_same_code(name, synth_archive, tmp_path):
    extra = ["method.rounds=1"] if "rounds" in compose("fit", [f"method={name}"]).method else []
    results = fit(_cfg(synth_archive, tmp_path / name, name, *extra))
    assert results["method"] == name
    assert json.loads((tmp_path / name / "results.json").read_text())["method"] == name
    assert 0 <= results["metrics"]["accuracy"] <= 1


class TwoHeads(BaseMethod):
    """A toy method: cross-entropy through the network's head and through a second head of its own."""

    name = "two_heads"

    def __init__(self, **base):
        super().__init__(**base)
        self.extra_head = nn.Linear(self.model.num_features, self.num_classes)
        # Kept in the checkpoint so the test can see how far the head moved.
        self.register_buffer("initial_head", self.extra_head.weight.detach().clone())

    def training_step(self, batch: dict, batch_idx: int):
        x, y = batch["lb"]["weak"], batch["lb"]["label"]
        features, logits = self.model.features_and_logits(x)  # (B, D), (B, C)
        loss = F.cross_entropy(logits, y) + F.cross_entropy(self.extra_head(features), y)
        self.log("train/loss", loss)
        return loss


def test_a_method_with_an_extra_head_trains_and_averages_it(synth_archive, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, TwoHeads.name, TwoHeads)
    cfg = _cfg(synth_archive, tmp_path / "run", "supervised", "trainer.max_steps=6", "method.ema_decay=0.5")
    with open_dict(cfg):
        cfg.method.name = TwoHeads.name
    results = fit(cfg)
    assert results["method"] == "two_heads"
    checkpoint = tmp_path / "run" / results["checkpoint"]  # the record names it relative to the run
    trained = load_method(checkpoint)
    assert isinstance(trained, TwoHeads) and "extra_head" in trained.trainable_modules()
    initial, live = trained.initial_head, trained.extra_head.weight
    averaged = trained.ema.module["extra_head"].weight
    # The optimizer trained the head, and the EMA follows it: moved from the start, behind the live weights.
    assert not torch.allclose(live, initial)
    assert not torch.allclose(averaged, initial) and not torch.allclose(averaged, live)
    assert (averaged - initial).norm() < (live - initial).norm() * 1.5
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert "extra_head.weight" in state and "ema.module.extra_head.weight" in state


@pytest.mark.parametrize("name", ["acr", "simpro"])
def test_priors_are_state_that_a_checkpoint_restores(name, tmp_path):
    module = long_tailed_method(name)
    state = module.adjustment if name == "acr" else module.prior
    state.unlabeled_prior.copy_(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]))
    torch.save(module.state_dict(), tmp_path / "state.pt")
    fresh = long_tailed_method(name)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert fresh.unlabeled_prior == pytest.approx({"a": 0.5, "b": 0.2, "c": 0.1, "d": 0.1, "e": 0.1})


TINY = tiny("trainer.max_steps=6", "data.val_fraction=0.2")

# Every pseudo-label counts (ACR: from the second epoch on), so that the priors move within a few steps.
EAGER = {
    "acr": ["method.threshold=0.0", "method.est_epoch=0"],
    "simpro": ["method.threshold=0.0", "method.em_warmup_steps=0"],
}


def _data(archive) -> list[str]:
    return [f"data.root={archive}", f"data.split_file={archive / '2_fold_split.csv'}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["acr", "simpro"])
def test_fit_writes_and_logs_the_unlabeled_prior(synth_archive, tmp_path, name, capsys):
    out = tmp_path / name
    assert (
        main(["fit", f"method={name}", f"output_dir={out}", *_data(synth_archive), *TINY, *EAGER[name]]) == 0
    )
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == name and r["metrics"]["macro_f1"] >= 0
    # The generated archive is balanced: ACR's training prior is uniform and it says once that it is inert.
    printed = "".join(capsys.readouterr())
    if name == "acr":
        assert len(r["warnings"]) == 1 and "acr is inert" in r["warnings"][0]
        assert printed.count("acr is inert") == 1
    else:
        assert r["warnings"] == [] and "inert" not in printed
    prior = r["unlabeled_prior"]
    assert list(prior) == r["classes"] and len(prior) == 23
    assert sum(prior.values()) == pytest.approx(1.0, abs=1e-5) and min(prior.values()) >= 0
    # Logged at every epoch start; after an epoch of pseudo-labels the estimate has left the uniform start.
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get(f"train/unlabeled_prior/{r['classes'][0]}")]
    assert len(rows) == 3  # 6 steps, 2 per epoch
    shares = [[float(row[f"train/unlabeled_prior/{c}"]) for c in r["classes"]] for row in rows]
    assert shares[0] == pytest.approx([1 / 23] * 23)
    assert shares[-1] != pytest.approx([1 / 23] * 23, abs=1e-4)
    assert sum(shares[-1]) == pytest.approx(1.0, abs=1e-5)

    # analyze sets the checkpoint's estimate beside the composition its classifier predicts for the unlabeled images.
    analysis = tmp_path / "analysis"
    args = [
        f"checkpoint={out / r['checkpoint']}",
        f"output_dir={analysis}",
        *_data(synth_archive),
        "data.num_workers=0",
    ]
    assert main(["analyze", *args, "umap.n_neighbors=5", "cluster.enabled=false"]) == 0
    compared = json.loads((analysis / "analysis.json").read_text())["unlabeled_prior"]
    from ssl_kvasir.analysis.embeddings import load_embeddings

    assert compared["estimated"] == pytest.approx(load_method(out / r["checkpoint"]).unlabeled_prior)
    store = load_embeddings(analysis / "embeddings")
    predicted = np.bincount(np.asarray(store.probs)[store.labels < 0].argmax(1), minlength=23) / 60
    assert list(compared["predicted"].values()) == pytest.approx(predicted.tolist())
    tv = 0.5 * sum(abs(compared["estimated"][c] - compared["predicted"][c]) for c in r["classes"])
    assert (
        compared["total_variation"] == pytest.approx(tv) and (analysis / "unlabeled_prior.png").stat().st_size
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["acr", "simpro"])
def test_killed_fit_resumes_to_the_same_priors_and_results(synth_archive, tmp_path, name):
    """The priors' running sums live in the checkpoint and are folded in at epoch starts: a fit killed after its
    first checkpoint and started again ends with the weights, priors and metrics of an uninterrupted one."""
    a, b, state = straight_and_resumed(
        lambda out: fit_command(synth_archive, out, extra=(f"method={name}", *EAGER[name])), tmp_path
    )
    assert b["metrics"] == a["metrics"] and b["confusion_matrix"] == a["confusion_matrix"]
    assert b["unlabeled_prior"] == a["unlabeled_prior"]
    # The priors moved during training (results.json holds those of the selected checkpoint, maybe an early one).
    (key,) = [k for k in state if k.endswith(".unlabeled_prior")]
    assert not torch.allclose(state[key], torch.full((23,), 1 / 23), atol=1e-4)
