"""Does the review order pay? k images reviewed in priority order against k drawn at random, before self-training.

scikit-learn's digits (1,797 real 8x8 scans of handwritten digits, shipped with scikit-learn, so offline): a
small labeled set (``--n-labeled`` per digit), a balanced test set (``--n-test`` per digit) and the rest as the
unlabeled pool. Per seed:

1. a teacher trains on the labeled images (self-training's round 0, the real ``SelfTraining`` module driven by a
   Lightning Trainer on in-memory tensors, the tiny CNN and protocol of ``bench_imbalance.py``);
2. the analysis's three views of the pool: the teacher's probabilities, the kNN vote of the labeled images in its
   feature space (FAISS) and HDBSCAN outlier scores; from them the review order of
   :func:`ssl_kvasir.analysis.priority.review_order` (margin, kNN disagreement, outlier, FAISS coverage);
3. an oracle "clinician" gives the true label to the first ``--k`` images of that order, or to ``--k`` images
   drawn at random; each reviewed file is what ``method.pseudo.file`` would hold: the reviewed images keep the
   clinician's label, the teacher pseudo-labels the rest of the pool (threshold 0.8, capped per class, as
   ``configs/method/self_training.yaml``);
4. a student (round 1) trains on the labeled images and each pseudo-labeled set; macro-F1 on the test set.

A student with no review at all is trained too, for scale. Ends with the closing line::

    review: macro-F1 gain of 50 images reviewed by priority over 50 random, 3 seeds = +x ± se (target > 0: met)

(``± se``: the standard error of the mean over seeds). Usage::

    python bench/bench_review.py            # 3 seeds, about 10 minutes at one thread
    python bench/bench_review.py --quick    # 1 seed, fewer steps (a smoke run)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from bench_imbalance import IMAGE_SIZE, PROTOCOL, TinyCNN, method_config, strong_view, weak_view
from harness import bare_trainer, gain_line
from torch import nn

from ssl_kvasir.methods import METHODS
from ssl_kvasir.metrics import confusion_matrix, metrics_from_confusion
from ssl_kvasir.models.backbone import Network

NUM_CLASSES = 10
TARGET = 0.0
"""The priority order must beat random review: a gain above 0, written before the benchmark was first run."""


@dataclass
class Split:
    """One seed's digits as (N, 1, 16, 16) normalised tensors and labels."""

    x_lb: torch.Tensor
    y_lb: torch.Tensor
    x_pool: torch.Tensor
    y_pool: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_split(seed: int, n_labeled: int, n_test: int) -> Split:
    """``n_labeled`` labeled and ``n_test`` test images per digit; every other image is the unlabeled pool."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    images = nn.functional.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()  # (1797, 1, 16, 16)
    labels = torch.tensor(digits.target)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"lb": [], "pool": [], "test": []}
    for c in range(NUM_CLASSES):
        rows = rng.permutation(np.flatnonzero(digits.target == c))
        parts["test"].append(rows[:n_test])
        parts["lb"].append(rows[n_test : n_test + n_labeled])
        parts["pool"].append(rows[n_test + n_labeled :])
    rows = {k: torch.tensor(np.concatenate(v)) for k, v in parts.items()}
    return Split(
        x_lb=images[rows["lb"]],
        y_lb=labels[rows["lb"]],
        x_pool=images[rows["pool"]],
        y_pool=labels[rows["pool"]],
        x_test=images[rows["test"]],
        y_test=labels[rows["test"]],
    )


class Batches:
    """Self-training's streams as the DataModule serves them: ``lb`` (weak view, label) and, for a student,
    ``pl`` (strong view of a pseudo-labeled image and its (C,) target). Each epoch's draw is seeded by
    (seed, epoch), so every student of a seed sees the same labeled batches."""

    def __init__(
        self,
        split: Split,
        pseudo: tuple[torch.Tensor, torch.Tensor] | None,
        steps: int,
        batch: int,
        mu: int,
        seed: int,
    ):
        self.split, self.pseudo, self.steps, self.batch, self.mu, self.seed = (
            split,
            pseudo,
            steps,
            batch,
            mu,
            seed,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        s = self.split
        for _ in range(self.steps):
            i_lb = torch.randint(0, len(s.y_lb), (self.batch,), generator=g)  # (B,)
            batch = {"lb": {"weak": weak_view(s.x_lb[i_lb], g), "label": s.y_lb[i_lb], "pos": i_lb}}
            if self.pseudo is not None:
                x_pl, t_pl = self.pseudo
                i_pl = torch.randint(0, len(t_pl), (self.mu * self.batch,), generator=g)  # (mu B,)
                batch["pl"] = {"strong": strong_view(x_pl[i_pl], g), "target": t_pl[i_pl]}
            yield batch


def train(split: Split, pseudo, seed: int, steps: int, batch: int, mu: int):
    """One round of self-training (round 0 without ``pseudo``); returns the trained module in eval mode."""
    cls = METHODS["self_training"]
    torch.manual_seed(seed)
    network = Network(
        TinyCNN(), nn.Linear(TinyCNN.num_features, NUM_CLASSES), spec={"name": "tiny_cnn"}, data_config={}
    )
    settings = {k: v for k, v in method_config("self_training").items() if k not in cls.procedure_keys}
    config = {
        "class_names": [str(c) for c in range(NUM_CLASSES)],
        "labeled_class_counts": torch.bincount(split.y_lb, minlength=NUM_CLASSES).tolist(),
        "max_steps": steps,
        "seed": seed,
        **settings,
        **PROTOCOL,
    }
    module = cls.from_config(network, **config)
    trainer = bare_trainer(steps)
    trainer.fit(module, train_dataloaders=Batches(split, pseudo, steps, batch, mu, seed))
    return module.eval()


def predict(module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) and probabilities (N, C) with the evaluation (EMA) weights."""
    with torch.no_grad():
        features, logits = module.predict_batch(x)
    return features.numpy(), logits.softmax(1).numpy()


def macro_f1(module, split: Split) -> float:
    _, probs = predict(module, split.x_test)
    cm = confusion_matrix(split.y_test.numpy(), probs.argmax(1), NUM_CLASSES)
    return metrics_from_confusion(cm)["macro_f1"]


def review_order(split: Split, teacher, seed: int) -> np.ndarray:
    """Pool positions in review order, from the teacher's probabilities, the kNN vote and HDBSCAN outliers."""
    from ssl_kvasir.analysis.cluster import hdbscan_cluster
    from ssl_kvasir.analysis.knn import knn_classify, l2_normalize
    from ssl_kvasir.analysis.priority import review_order as order_rows
    from ssl_kvasir.data.classes import ClassTable
    from ssl_kvasir.pseudo_labels.table import build_pseudo_label_table

    f_pool, p_pool = predict(teacher, split.x_pool)  # (N, D), (N, C)
    f_lb, _ = predict(teacher, split.x_lb)
    knn = knn_classify(
        f_lb, split.y_lb.numpy(), f_pool, k=min(10, len(f_lb)), num_classes=NUM_CLASSES, use_gpu=False
    )
    clusters, outliers = hdbscan_cluster(l2_normalize(f_pool), min_cluster_size=15)
    table = build_pseudo_label_table(
        [f"pool/{i}.png" for i in range(len(f_pool))],
        p_pool,
        ClassTable.from_names(str(c) for c in range(NUM_CLASSES)),
        knn_probs=knn,
        clusters=clusters,
        outlier_scores=outliers,
    )
    order, _ = order_rows(table, f_pool)
    return order


def pseudo_labeled(
    split: Split, probs: np.ndarray, reviewed: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's pseudo-labeled set as self-training builds it from a reviewed file: the reviewed images with
    the oracle's (true) label, the teacher's confident, per-class capped pseudo-labels on the rest."""
    from ssl_kvasir.pseudo_labels.selection import select_pseudo_labels

    conf, pred = probs.max(1), probs.argmax(1)  # (N,), (N,)
    free = np.ones(len(probs), dtype=bool)
    free[reviewed] = False
    positions = select_pseudo_labels(
        np.where(free, conf, -1.0), pred, NUM_CLASSES, min_confidence=0.8, balance="cap", max_per_class=None
    )
    eye = np.eye(NUM_CLASSES, dtype=np.float32)
    rows = np.concatenate([reviewed, positions]).astype(np.int64)
    targets = np.concatenate([eye[split.y_pool.numpy()[reviewed]], eye[pred[positions]]])
    return split.x_pool[torch.from_numpy(rows)], torch.from_numpy(targets)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 150 steps per round (a smoke run)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--k", type=int, default=50, help="images the oracle reviews")
    p.add_argument("--steps", type=int, default=1000, help="training steps per round")
    p.add_argument("--batch-size", type=int, default=16, help="labeled images per step")
    p.add_argument("--mu", type=int, default=3, help="pseudo-labeled images per labeled image in a step")
    p.add_argument("--n-labeled", type=int, default=3, help="labeled images per digit")
    p.add_argument("--n-test", type=int, default=50, help="test images per digit")
    a = p.parse_args()
    seeds, steps = (range(1), 150) if a.quick else (range(a.seeds), a.steps)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*|.*IterableDataset.*|.*iterable.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*|.*no `val_dataloader`.*|.*LeafSpec.*")

    print(
        f"digits: {a.n_labeled} labeled and {a.n_test} test images per digit, the rest the pool; k = {a.k} reviewed; "
        f"{steps} steps per round of {a.batch_size} labeled + {a.mu * a.batch_size} pseudo-labeled; seeds {list(seeds)}",
        flush=True,
    )
    start = time.perf_counter()
    rows = []
    for seed in seeds:
        split = make_split(seed, a.n_labeled, a.n_test)
        teacher = train(split, None, seed, steps, a.batch_size, a.mu)
        _, probs = predict(teacher, split.x_pool)
        order = review_order(split, teacher, seed)
        wrong = probs.argmax(1) != split.y_pool.numpy()
        chosen = {
            "none": np.zeros(0, dtype=np.int64),
            "random": np.random.default_rng(10_000 + seed).permutation(len(probs))[: a.k],
            "priority": order[: a.k],
        }
        f1 = {"teacher": macro_f1(teacher, split)}
        for name, reviewed in chosen.items():
            student = train(split, pseudo_labeled(split, probs, reviewed), seed, steps, a.batch_size, a.mu)
            f1[name] = macro_f1(student, split)
        rows.append(f1)
        print(
            f"  seed {seed}: pool {len(probs)} ({wrong.mean():.1%} mislabeled by the teacher); teacher's errors "
            f"among the reviewed: priority {wrong[chosen['priority']].sum()}/{a.k}, random "
            f"{wrong[chosen['random']].sum()}/{a.k}; macro-F1 teacher {f1['teacher']:.3f}, students: no review "
            f"{f1['none']:.3f}, random {f1['random']:.3f}, priority {f1['priority']:.3f}  "
            f"[{time.perf_counter() - start:.0f} s]",
            flush=True,
        )
    print()
    print("| student | macro-F1 (mean ± sample std over seeds) |")
    print("|---|---:|")
    for name in ("teacher", "none", "random", "priority"):
        values = [r[name] for r in rows]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        print(f"| {name} | {statistics.mean(values):.3f}{spread} |")
    print(f"\n{len(rows)} seed(s); {time.perf_counter() - start:.0f} s in all.")
    gain_line(
        "review",
        f"macro-F1 gain of {a.k} images reviewed by priority over {a.k} random, {len(rows)} "
        f"seed{'s' if len(rows) > 1 else ''}",
        [r["priority"] - r["random"] for r in rows],
        ">",
        TARGET,
    )


if __name__ == "__main__":
    main()
