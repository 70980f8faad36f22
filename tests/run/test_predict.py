"""The one prediction path: evaluate, embed and self-training's teacher give the same probabilities, and
prediction memory does not grow with the number of images."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny

from ssl_kvasir.cli import main

pytestmark = pytest.mark.slow


def test_evaluate_embed_and_self_training_predict_alike(synth_archive, tmp_path):
    from ssl_kvasir.config import compose
    from ssl_kvasir.methods import METHODS
    from ssl_kvasir.run.experiment import load_experiment
    from ssl_kvasir.run.train import StageRunner

    data = [f"data.root={synth_archive}", f"data.split_file={synth_archive / '2_fold_split.csv'}"]
    fit_args = [*data, *tiny("method=fixmatch")]
    assert main(["fit", f"output_dir={tmp_path / 'run'}", *fit_args]) == 0
    ckpt = tmp_path / "run" / json.loads((tmp_path / "run" / "results.json").read_text())["checkpoint"]

    assert main(["evaluate", f"checkpoint={ckpt}", f"output_dir={tmp_path / 'eval'}", *fit_args]) == 0
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert (
        main(["embed", f"checkpoint={ckpt}", f"output_dir={tmp_path / 'emb'}", *data, "data.num_workers=0"])
        == 0
    )
    from ssl_kvasir.analysis.embeddings import load_embeddings

    store = load_embeddings(tmp_path / "emb" / "embeddings")

    # Self-training's teacher predicts through the runner a procedure is handed.
    cfg = compose("fit", [f"output_dir={tmp_path / 'st'}", *fit_args])
    exp = load_experiment(cfg.data)
    runner = StageRunner(cfg, exp, METHODS["fixmatch"], tmp_path / "st")
    test_rows = exp.split.test
    teacher = runner.predict_probs(ckpt, test_rows)  # (N_test, C)
    embedded = np.asarray(store.probs)[
        [store.row_of(p) for p in exp.catalog.images.path.to_numpy()[test_rows]]
    ]
    # Same weights, device and precision; only the batches differ (embed batches every image of the archive),
    # which moves float32 results by an ulp at most.
    np.testing.assert_allclose(teacher, embedded, rtol=1e-5, atol=1e-7)
    assert (teacher.argmax(1) == embedded.argmax(1)).all()
    # evaluate scored exactly these predictions.
    labels = exp.catalog.images.label.to_numpy()[test_rows]
    cm = np.zeros((23, 23), dtype=np.int64)
    np.add.at(cm, (labels, teacher.argmax(1)), 1)
    assert cm.tolist() == evaluation["confusion_matrix"]


MEMORY_PROBE = """
import resource, sys, numpy as np, torch
from torch.utils.data import DataLoader, Dataset
from ssl_kvasir.methods import METHODS
from ssl_kvasir.models import build_network
from ssl_kvasir.run.predict import Predictor

class Images(Dataset):
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"eval": torch.randn(3, 8, 8, generator=g), "index": i}

class Source:  # the two calls of a DataModule that prediction makes, over generated images
    def loader(self, rows): return DataLoader(Images(len(rows)), batch_size=256)
    def transfer(self, batch, device): return batch

n = int(sys.argv[1])
module = METHODS["supervised"].from_config(
    build_network("test_resnet", 23), class_names=[str(c) for c in range(23)], max_steps=1
)
predictor = Predictor(module, torch.device("cpu"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seen = 0
for probs, features in predictor.batches(Source(), np.arange(n), features=True):
    seen += len(features)  # consumed and dropped, as the embedding writer does
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(seen, (after - before) * 1024, features.shape[1])
"""


def _peak_growth(n: int) -> tuple[int, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(n)],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    ).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def test_prediction_memory_does_not_grow_with_the_number_of_images():
    seen_small, growth_small, dim = _peak_growth(1_000)
    seen_large, growth_large, _ = _peak_growth(20_000)
    assert (seen_small, seen_large) == (1_000, 20_000)
    kept = 19_000 * (dim + 23) * 4  # what holding the extra images' features and probabilities would cost
    assert growth_large - growth_small < kept / 3, (growth_small, growth_large, kept)
