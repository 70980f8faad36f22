"""Self-training's review loop closes: pseudo-labels exported in the authors' format, reviewed, read back by
self-training, and a reviewed label kept in every round while the teacher labels the rest of the pool; its
labeled loss honours the logit adjustment."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LONG_TAIL, long_tailed_batch, long_tailed_method, naive_ce, one_hot, tiny

from ssl_kvasir.cli import main

pytestmark = pytest.mark.slow
C = len(LONG_TAIL)


def _review(exported: Path, reviewed: Path, keep: int = 4) -> tuple[str, int]:
    """A clinician's pass over an authors'-format file: keep a few rows, correct the first one's label to a
    class the model did not predict. Returns the corrected file name and its reviewed class."""
    with exported.open() as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1 : 1 + keep]
    assert header[:2] == ["filename", "predicted-label"] and len(header) == 25
    assert all("/" not in r[0] for r in body)  # bare file names, as the authors publish them
    corrected = (int(body[0][1]) + 1) % 23
    body[0][1] = str(corrected)
    with reviewed.open("w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    return body[0][0], corrected


def test_reviewed_label_survives_into_round_two(synth_archive, tmp_path, monkeypatch):
    from ssl_kvasir.data.archive import load_catalog
    from ssl_kvasir.run.train import StageRunner

    data = [f"data.root={synth_archive}", f"data.split_file={synth_archive / '2_fold_split.csv'}"]
    teacher = tmp_path / "teacher"
    assert main(["fit", "method=supervised", f"output_dir={teacher}", *data, *tiny()]) == 0
    checkpoint = teacher / json.loads((teacher / "results.json").read_text())["checkpoint"]
    exported = tmp_path / "export" / "authors.csv"
    args = [f"checkpoint={checkpoint}", f"output={exported}", "format=authors", "data.num_workers=0", *data]
    assert main(["export-pseudo-labels", *args]) == 0
    reviewed = tmp_path / "reviewed.csv"
    name, label = _review(exported, reviewed)

    # Every stage's pseudo-labeled set, as self-training hands it to the trainer.
    stages: list[tuple[str, tuple[np.ndarray, np.ndarray] | None]] = []
    fit_stage = StageRunner.fit_stage

    def spy(self, out, pseudo_labeled=None, **kwargs):
        stages.append((Path(out).name, pseudo_labeled))
        return fit_stage(self, out, pseudo_labeled=pseudo_labeled, **kwargs)

    monkeypatch.setattr(StageRunner, "fit_stage", spy)
    out = tmp_path / "self_training"
    st = [
        "fit",
        "method=self_training",
        f"method.pseudo.file={reviewed}",
        "method.rounds=2",
        "method.pseudo.threshold=0.0",  # the teacher labels some of the pool in every round of a tiny run
        f"output_dir={out}",
        *data,
        *tiny(),
    ]
    assert main(st) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]

    images = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv").images
    row = int(np.flatnonzero(images.path.map(lambda p: Path(p).name == name).to_numpy())[0])
    reviewed_rows = {
        int(np.flatnonzero(images.path.map(lambda p, n=n: Path(p).name == n).to_numpy())[0])
        for n in [r[0] for r in list(csv.reader(reviewed.open()))[1:]]
    }
    assert [s[0] for s in stages] == ["round_0", "round_1", "round_2"]
    for round_name, (rows, targets) in stages:
        hits = np.flatnonzero(rows == row)
        assert len(hits) == 1, round_name  # the reviewed image once, with its reviewed label only
        assert targets[hits[0]].argmax() == label and targets[hits[0]].max() == 1.0, round_name
        assert reviewed_rows <= set(rows.tolist()), round_name
    rows_2 = stages[2][1][0]
    assert len(set(rows_2.tolist()) - reviewed_rows) > 0  # the teacher labelled the rest of the pool
    assert results["rounds"][2]["n_pseudo"] == len(rows_2)


def test_self_training_honours_the_logit_adjusted_loss():
    """Round 0 (labeled images only) and the student rounds (labeled + pseudo-labeled) adjust the labeled loss
    by the training prior; the pseudo-labeled images keep plain (soft) cross-entropy."""
    module = long_tailed_method("self_training", loss="logit_adjusted", la_tau=1.5, lambda_pl=0.5)
    batch = long_tailed_batch()
    prior = [n / sum(LONG_TAIL) for n in LONG_TAIL]
    y = [int(v) for v in batch["lb"]["label"]]

    def adjusted(rows):
        return np.mean(
            [
                naive_ce([z + 1.5 * math.log(p) for z, p in zip(row, prior, strict=True)], one_hot(k, C))
                for row, k in zip(rows, y, strict=True)
            ]
        )

    lb_only = {"lb": batch["lb"]}
    loss = module.training_step(lb_only, 0)
    assert loss.item() == pytest.approx(adjusted(module.model(batch["lb"]["weak"]).tolist()), rel=1e-5)
    target = torch.softmax(torch.randn(4, C, generator=torch.Generator().manual_seed(1)), 1)
    with_pl = {**lb_only, "pl": {"strong": batch["ulb"]["strong"][:4], "target": target}}
    loss = module.training_step(with_pl, 0)
    with torch.no_grad():
        z_lb, z_pl = module.model(torch.cat([batch["lb"]["weak"], with_pl["pl"]["strong"]])).split([4, 4])
    soft = np.mean([naive_ce(row, t) for row, t in zip(z_pl.tolist(), target.tolist(), strict=True)])
    assert loss.item() == pytest.approx(adjusted(z_lb.tolist()) + 0.5 * soft, rel=1e-4)
    assert long_tailed_method("self_training", lambda_pl=0.5).training_step(
        lb_only, 0
    ).item() != pytest.approx(adjusted(module.model(batch["lb"]["weak"]).tolist()), rel=1e-3)
