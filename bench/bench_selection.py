"""How many validation images model selection needs before it beats keeping the final (EMA) weights.

Real training curves, resampled validation sets: supervised training and FixMatch train the tiny CNN of
``bench_imbalance.py`` on scikit-learn's digits (4 labeled images per class, 700 unlabeled, 600 steps, the
matched protocol), and the EMA weights predict a held-out pool of 1,000 labeled digits at every epoch's end (30
checkpoints a run). The pool is cut in two halves: validation sets of ``n`` images are drawn from the first
(``--draws`` times per ``n``), the second scores the checkpoint each rule selects. For each ``n`` the benchmark
prints the mean test macro-F1 of the checkpoint selected on validation MCC (a tie to the later checkpoint, and
a tie to the earlier one, Lightning's rule) minus that of the final weights, and how often a tie decided.

``trainer.min_val_size`` (configs/trainer/default.yaml) is the smallest ``n`` of the grid at which selection
with ties to the later checkpoint is, on average, no worse than the final weights (within
:data:`TOLERANCE`). The closing line checks the configured value against that measurement::

    selection: test macro-F1 of the later-tie selection minus the final weights at n_val = 80 = -0.0033 (target >= -0.005: met)

Usage::

    python bench/bench_selection.py            # 2 methods x 2 seeds (250 to 360 s at one thread on a busy machine)
    python bench/bench_selection.py --quick    # FixMatch, 1 seed, 300 steps
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_imbalance import NUM_CLASSES, PROTOCOL, Batches, TinyCNN, make_split, method_config
from harness import bare_trainer, closing_line, parser
from lightning.pytorch.callbacks import Callback
from torch import nn

from ssl_kvasir.methods import METHODS
from ssl_kvasir.metrics import confusion_matrix, metrics_from_confusion
from ssl_kvasir.models.backbone import Network

SIZES = (5, 10, 15, 20, 30, 40, 60, 80, 120, 160)
TOLERANCE = 0.005
"""Macro-F1 that selection may lose against the final weights, on average, and still count as no worse."""
TRAINER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "trainer" / "default.yaml"


class EpochPredictions(Callback):
    """The evaluation weights' predictions (N,) on fixed images at every training epoch's end."""

    def __init__(self, x: torch.Tensor):
        self.x, self.steps, self.preds = x, [], []

    def on_train_epoch_end(self, trainer, module) -> None:
        module.eval()
        with torch.no_grad():
            _, logits = module.predict_batch(self.x)  # (N, C)
        module.train()
        self.steps.append(trainer.global_step)
        self.preds.append(logits.argmax(1).numpy())


def curve(method: str, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) predictions of a run's K checkpoints on the pool, and the pool's (N,) labels."""
    split = make_split("uniform", seed, n_max=4, ratio=1.0, n_max_u=70, n_test=100)
    torch.manual_seed(seed)
    network = Network(
        TinyCNN(), nn.Linear(TinyCNN.num_features, NUM_CLASSES), spec={"name": "tiny_cnn"}, data_config={}
    )
    cls = METHODS[method]
    config = {
        "class_names": [str(c) for c in range(NUM_CLASSES)],
        "labeled_class_counts": torch.bincount(split.y_lb, minlength=NUM_CLASSES).tolist(),
        "max_steps": steps,
        "seed": seed,
        **method_config(method),
        **PROTOCOL,
    }
    if cls.unlabeled_views:
        config["num_unlabeled"] = len(split.y_ulb)
    module = cls.from_config(network, **config)
    record = EpochPredictions(split.x_test)
    trainer = bare_trainer(steps, callbacks=[record])
    trainer.fit(module, train_dataloaders=Batches(split, 20, 16, 4, seed))
    return np.stack(record.preds), split.y_test.numpy()


def scores(preds: np.ndarray, labels: np.ndarray, metric: str) -> np.ndarray:
    """(K,) ``metric`` of each checkpoint's predictions."""
    return np.array(
        [metrics_from_confusion(confusion_matrix(labels, p, NUM_CLASSES))[metric] for p in preds], dtype=float
    )


def select(val: np.ndarray, rule: str) -> tuple[int, bool]:
    """The checkpoint a rule selects from (K,) validation scores, and whether a tie decided it."""
    best = val.max()
    tied = np.flatnonzero(val == best)
    return (int(tied[-1]) if rule == "later" else int(tied[0])), len(tied) > 1


def configured_min_val_size() -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(TRAINER_CONFIG).min_val_size)


def main() -> None:
    p = parser(__doc__, "FixMatch, 1 seed, 300 steps")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--draws", type=int, default=200, help="validation sets drawn per size and run")
    a = p.parse_args()
    methods, seeds, steps = ("supervised", "fixmatch"), range(a.seeds), a.steps
    if a.quick:
        methods, seeds, steps = ("fixmatch",), range(1), 300
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", ".*does not have many workers.*|.*iterable.*|.*module\\(s\\) in eval mode.*"
    )
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    # size -> rule -> differences (selected - final) of test macro-F1, and ties
    diffs = {n: {"later": [], "earlier": []} for n in SIZES}
    ties = {n: [] for n in SIZES}
    for method in methods:
        for seed in seeds:
            preds, labels = curve(method, seed, steps)  # (K, N), (N,)
            half = rng.permutation(len(labels))
            val_rows, test_rows = half[: len(labels) // 2], half[len(labels) // 2 :]
            test_f1 = scores(preds[:, test_rows], labels[test_rows], "macro_f1")  # (K,)
            print(
                f"  {method} seed {seed}: test macro-F1 at epochs' ends {' '.join(f'{v:.2f}' for v in test_f1)}"
                f"  [{time.perf_counter() - start:.0f} s]",
                flush=True,
            )
            for n in SIZES:
                for _ in range(a.draws):
                    rows = rng.choice(val_rows, size=n, replace=False)
                    val = scores(preds[:, rows], labels[rows], "mcc")  # (K,)
                    for rule in ("later", "earlier"):
                        k, tie = select(val, rule)
                        diffs[n][rule].append(test_f1[k] - test_f1[-1])
                    ties[n].append(tie)
    print()
    print(
        "| validation images | later tie: selected - final macro-F1 | earlier tie: selected - final | ties |"
    )
    print("|---:|---:|---:|---:|")
    for n in SIZES:
        later, earlier = np.array(diffs[n]["later"]), np.array(diffs[n]["earlier"])
        print(
            f"| {n} | {later.mean():+.4f} ± {later.std(ddof=1) / np.sqrt(len(later)):.4f} | "
            f"{earlier.mean():+.4f} ± {earlier.std(ddof=1) / np.sqrt(len(earlier)):.4f} | {np.mean(ties[n]):.0%} |"
        )
    measured = next((n for n in SIZES if np.mean(diffs[n]["later"]) >= -TOLERANCE), None)
    print(
        f"\n{len(methods)} method(s) x {len(seeds)} seed(s) x {a.draws} draws per size; smallest size no worse than "
        f"the final weights: {measured}; {time.perf_counter() - start:.0f} s in all."
    )
    configured = configured_min_val_size()
    at = min(SIZES, key=lambda n: abs(n - configured))
    closing_line(
        "selection",
        f"test macro-F1 of the later-tie selection minus the final weights at n_val = {at}",
        float(np.mean(diffs[at]["later"])),
        ">=",
        -TOLERANCE,
        digits=4,
        signed=True,
    )


if __name__ == "__main__":
    main()
