"""Model selection: scripted validation scores with ties through a real Lightning Trainer, and the record a fit
writes into results.json."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import tiny

from ssl_kvasir.cli import main
from ssl_kvasir.run.model_selection import Selection


class Scripted(L.LightningModule):
    """One training step per epoch; validation logs the next score of a script as ``val/mcc``."""

    def __init__(self, scores: list[float]):
        super().__init__()
        self.scores = scores
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/mcc", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _select(tmp_path, scores: list[float], rule: str, n_val: int = 50, min_val_size: int = 20) -> Selection:
    selection = Selection(tmp_path, monitor="val/mcc", rule=rule, n_val=n_val, min_val_size=min_val_size)
    data = torch.utils.data.DataLoader(torch.zeros(1, 1))
    trainer = L.Trainer(
        max_epochs=len(scores),
        callbacks=[selection],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(Scripted(scores), train_dataloaders=data, val_dataloaders=data)
    # The checkpoint kept is the selected one.
    saved = torch.load(selection.best_model_path, weights_only=False)
    assert saved["global_step"] == selection.best_step
    return selection


# One step per epoch: the checkpoint of epoch k is step k + 1.
@pytest.mark.parametrize(
    ("scores", "rule", "step", "tie"),
    [
        # MCC on a handful of images: tied from the second epoch on, then a worse one.
        ([0.5, 0.75, 0.75, 0.75, 0.6], "later", 4, True),
        ([0.5, 0.75, 0.75, 0.75, 0.6], "earlier", 2, True),
        # A strict best is chosen by every rule, and no tie decided it.
        ([0.5, 0.75, 1.0, 0.75, 0.75], "later", 3, False),
        ([0.5, 0.75, 1.0, 0.75, 0.75], "earlier", 3, False),
        # A tie on an old best, then a strict improvement: the improvement, undecided by the tie.
        ([0.75, 0.75, 0.9, 0.5], "later", 3, False),
        # The final weights whatever the scores.
        ([0.5, 1.0, 0.75], "final", 3, False),
    ],
)
def test_tied_scores_select_by_the_rule(tmp_path, scores, rule, step, tie):
    s = _select(tmp_path, scores, rule)
    assert (s.best_step, s.tie) == (step, tie)
    record = s.record()
    assert (
        record["rule"] == rule and record["step"] == step and record["tie"] is tie and record["n_val"] == 50
    )
    if rule != "final":
        assert record["score"] == pytest.approx(max(scores))


def test_too_few_validation_images_keep_the_final_weights(tmp_path):
    s = _select(tmp_path, [0.5, 1.0, 0.75], "later", n_val=7, min_val_size=20)
    assert s.best_step == 3 and s.record()["description"].startswith("final weights (7 validation images")


def test_selection_state_survives_a_resume(tmp_path):
    s = _select(tmp_path, [0.5, 0.75, 0.75, 0.6], "later")
    fresh = Selection(tmp_path, monitor="val/mcc", rule="later", n_val=50, min_val_size=20)
    fresh.load_state_dict(s.state_dict())
    assert (fresh.best_step, fresh.tie) == (3, True)
    last = Selection(tmp_path, monitor=None, rule="final", n_val=50, min_val_size=20)
    assert last.state_key != s.state_key
    with pytest.raises(ValueError, match="unknown selection rule"):
        Selection(tmp_path, monitor="val/mcc", rule="best", n_val=50, min_val_size=20)


def _data(archive) -> list[str]:
    return [f"data.root={archive}", f"data.split_file={archive / '2_fold_split.csv'}"]


@pytest.mark.slow
@pytest.mark.parametrize("min_val_size", [1, 1000])
def test_fit_records_the_selection(synth_archive, tmp_path, min_val_size):
    out = tmp_path / "run"
    args = [f"trainer.min_val_size={min_val_size}", "data.val_policy=fold", "method=supervised"]
    assert (
        main(["fit", f"output_dir={out}", *_data(synth_archive), *tiny("data.val_fraction=0.2", *args)]) == 0
    )
    r = json.loads((out / "results.json").read_text())
    s = r["selection"]
    assert s["rule"] == "later" and s["n_val"] == r["n_val"] > 0 and isinstance(s["tie"], bool)
    saved = torch.load(out / r["checkpoint"], weights_only=False)
    assert saved["global_step"] == s["step"] and 0 < s["step"] <= r["steps"]
    if min_val_size > r["n_val"]:
        assert s["step"] == r["steps"] and s["description"].startswith("final weights")
    else:
        assert s["description"].startswith("best val/mcc") and s["score"] == pytest.approx(
            max(float(v) for v in _logged(out, "val/mcc"))
        )


def _logged(out, key: str) -> list[str]:
    import csv

    with (out / "logs" / "metrics.csv").open(newline="") as f:
        return [row[key] for row in csv.DictReader(f) if row.get(key)]
