"""Imbalance-aware semi-supervised learning on real images with a controlled class-mix mismatch.

scikit-learn's digits (1,797 real 8x8 scans of handwritten digits, shipped with scikit-learn, so offline) made
long-tailed the way the ACR and SimPro papers make CIFAR long-tailed: labeled images per class fall
geometrically from ``--n-max`` (20) to ``--n-max / --ratio`` (imbalance ratio 10), and the unlabeled pool
(``--n-max-u`` = 120 for its most common class, six times the labeled one, as the papers' 4,000 against 500)
comes in three mixes, *consistent* (the same long tail), *uniform* and *reversed* (the rare labeled classes
are the common unlabeled ones). Which digit is common is drawn per seed. The test set is balanced (30 images
per class), so macro-F1 and the recall of the rare half (the five classes with the fewest labels) measure the
rare classes.

Five systems train on the matched protocol: the same tiny CNN at 16 px, SGD with Nesterov momentum, lr 0.03,
FixMatch's cosine schedule, weight decay, EMA weights for evaluation, steps and batch sizes, through the real
method modules (their ``training_step``, strategies, priors and epoch hooks, driven by a Lightning Trainer) on
in-memory tensors: supervised with logit adjustment, FixMatch, FixMatch + FlexMatch + distribution alignment,
ACR and SimPro. Prints a Markdown table (mean +- sample std over seeds) and ends with the closing line::

    imbalance: best of acr/simpro macro-F1 gain over fixmatch, reversed mix = +0.xxx (target >= +0.03: met)

Usage::

    python bench/bench_imbalance.py            # 3 mixes x 5 systems x 3 seeds
    python bench/bench_imbalance.py --quick    # reversed mix, FixMatch / ACR / SimPro, 1 seed (under a minute)
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
from pathlib import Path

import numpy as np
import torch
from harness import closing_line
from torch import nn

from ssl_kvasir.methods import METHODS
from ssl_kvasir.metrics import confusion_matrix, metrics_from_confusion
from ssl_kvasir.models.backbone import Network

MIXES = ("consistent", "uniform", "reversed")
NUM_CLASSES = 10
IMAGE_SIZE = 16

PROTOCOL = {
    "optimizer": "sgd",
    "lr": 0.03,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "warmup_steps": 0,
    "ema_decay": 0.999,
    "ema_warmup": True,
    "eval_weights": "ema",
}
"""The matched protocol: every system trains and is evaluated with these (configs/method/common.yaml)."""

SYSTEMS: dict[str, tuple[str, dict]] = {
    "supervised + LA": ("supervised", {"loss": "logit_adjusted", "la_tau": 1.0}),
    "fixmatch": ("fixmatch", {}),
    "fixmatch + flexmatch + DA": ("fixmatch", {"masking": "flexmatch", "alignment": "labeled"}),
    # ACR starts estimating the unlabeled mix after est_epoch epochs: 5 of the paper's 500, 1 of our 30.
    "acr": ("acr", {"est_epoch": 1}),
    "simpro": ("simpro", {}),
}
"""System name -> (method, its settings beyond the protocol and the method's config file)."""

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"


def method_config(method: str) -> dict:
    """The method's own keys in ``configs/method/<method>.yaml`` (the papers' hyper-parameters; SimPro's
    logit-adjusted labeled loss), without the shared ``common.yaml``, whose place :data:`PROTOCOL` takes."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{method}.yaml"))
    return {k: v for k, v in config.items() if k not in ("defaults", "name")}


def long_tail(n_max: int, ratio: float, num_classes: int = NUM_CLASSES) -> list[int]:
    """Images per class rank: ``n_max * ratio^(-k / (C - 1))``, as in the ACR and SimPro code."""
    return [int(n_max * ratio ** (-k / (num_classes - 1))) for k in range(num_classes)]


@dataclass
class Split:
    """One seed's data: (N, 1, 16, 16) images normalised, labels, and the rank order of the classes."""

    x_lb: torch.Tensor
    y_lb: torch.Tensor
    x_ulb: torch.Tensor
    y_ulb: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    rare_half: list[int]


def make_split(mix: str, seed: int, n_max: int, ratio: float, n_max_u: int, n_test: int) -> Split:
    """Labeled long tail, unlabeled pool in ``mix``, balanced test set, from scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    images = nn.functional.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()  # (1797, 1, 16, 16)
    labels = torch.tensor(digits.target)
    rng = np.random.default_rng(seed)
    by_rank = rng.permutation(NUM_CLASSES)  # by_rank[k]: the class with the k-th most labels
    labeled = long_tail(n_max, ratio)
    unlabeled = {
        "consistent": long_tail(n_max_u, ratio),
        "uniform": [n_max_u] * NUM_CLASSES,
        "reversed": long_tail(n_max_u, ratio)[::-1],
    }[mix]
    parts = {"lb": [], "ulb": [], "test": []}
    for rank, c in enumerate(by_rank):
        rows = rng.permutation(np.flatnonzero(digits.target == c))
        n_lb, n_ulb = labeled[rank], unlabeled[rank]
        if n_test + n_lb + n_ulb > len(rows):
            raise ValueError(f"digit {c} has {len(rows)} images, fewer than {n_test + n_lb + n_ulb} asked")
        parts["test"].append(rows[:n_test])
        parts["lb"].append(rows[n_test : n_test + n_lb])
        parts["ulb"].append(rows[n_test + n_lb : n_test + n_lb + n_ulb])
    rows = {k: torch.tensor(np.concatenate(v)) for k, v in parts.items()}
    return Split(
        x_lb=images[rows["lb"]],
        y_lb=labels[rows["lb"]],
        x_ulb=images[rows["ulb"]],
        y_ulb=labels[rows["ulb"]],
        x_test=images[rows["test"]],
        y_test=labels[rows["test"]],
        rare_half=[int(c) for c in by_rank[NUM_CLASSES // 2 :]],
    )


def shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image of (N, 1, H, W) by up to ``max_shift`` pixels each way (zero = background)."""
    n, _, h, w = x.shape
    pad = nn.functional.pad(x, (max_shift,) * 4, value=float(x.min()))  # (N, 1, H + 2s, W + 2s)
    oy = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=g)  # (N, 1)
    ox = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=g)
    rows = (oy + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (ox + torch.arange(w))[:, None, :]  # (N, 1, W)
    return pad[torch.arange(n)[:, None, None], 0, rows, cols][:, None]  # (N, 1, H, W)


def weak_view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """FixMatch's weak view for digits: a random translation of up to 2 px (no flips: digits are not symmetric)."""
    return shift(x, 2, g)


def strong_view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A strong view: translation up to 3 px, contrast and brightness jitter, noise, and a 6x6 cutout."""
    n = len(x)
    x = shift(x, 3, g)
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)  # (N, 1, 1, 1)
    brightness = 0.6 * torch.rand(n, 1, 1, 1, generator=g) - 0.3
    x = x * contrast + brightness + 0.2 * torch.randn(x.shape, generator=g)
    cy = torch.randint(0, IMAGE_SIZE - 5, (n,), generator=g)
    cx = torch.randint(0, IMAGE_SIZE - 5, (n,), generator=g)
    grid = torch.arange(IMAGE_SIZE)
    inside_y = (grid[None] >= cy[:, None]) & (grid[None] < cy[:, None] + 6)  # (N, H)
    inside_x = (grid[None] >= cx[:, None]) & (grid[None] < cx[:, None] + 6)  # (N, W)
    cut = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (N, 1, H, W)
    return x.masked_fill(cut, float(x.min()))


class Batches:
    """The training streams as the DataModule serves them (``lb``: weak view and label; ``ulb``: weak and
    strong views, position in the pool and label), drawn from in-memory tensors, one epoch per iteration.

    Each epoch's draw is seeded by (seed, epoch), so two systems with the same seed see the same images.
    """

    def __init__(self, split: Split, steps: int, batch_size: int, mu: int, seed: int):
        self.split, self.steps, self.batch_size, self.mu, self.seed = split, steps, batch_size, mu, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        s, b = self.split, self.batch_size
        for _ in range(self.steps):
            i_lb = torch.randint(0, len(s.y_lb), (b,), generator=g)  # (B,)
            i_ulb = torch.randint(0, len(s.y_ulb), (self.mu * b,), generator=g)  # (mu B,)
            x_u = s.x_ulb[i_ulb]
            yield {
                "lb": {"weak": weak_view(s.x_lb[i_lb], g), "label": s.y_lb[i_lb], "pos": i_lb},
                "ulb": {
                    "weak": weak_view(x_u, g),
                    "strong": strong_view(x_u, g),
                    "pos": i_ulb,
                    "label": s.y_ulb[i_ulb],
                },
            }


class TinyCNN(nn.Module):
    """Three 3x3 convolutions with stride 2 (16, 32, 64 channels), BatchNorm, ReLU, average pooling.

    The first stride brings the 16 px views back to the digits' own 8 px grid: the views are drawn at 16 px so
    that translations and cutouts are finer than the scan's pixels, and the network costs what an 8 px one does.
    """

    num_features = 64

    def __init__(self):
        super().__init__()
        layers, width = [], 1
        for out in (16, 32, 64):
            layers += [nn.Conv2d(width, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 64)


def train_system(
    system: str, split: Split, seed: int, steps: int, steps_per_epoch: int, batch_size: int, mu: int
):
    """Train one system on one split; returns (macro-F1, rare-half recall, estimated unlabeled prior or None)."""
    import lightning as L

    method, settings = SYSTEMS[system]
    cls = METHODS[method]
    torch.manual_seed(seed)
    network = Network(
        TinyCNN(), nn.Linear(TinyCNN.num_features, NUM_CLASSES), spec={"name": "tiny_cnn"}, data_config={}
    )
    counts = torch.bincount(split.y_lb, minlength=NUM_CLASSES).tolist()
    config = {
        "class_names": [str(c) for c in range(NUM_CLASSES)],
        "labeled_class_counts": counts,
        "max_steps": steps,
        "seed": seed,
        **method_config(method),
        **PROTOCOL,
        **settings,
    }
    if method in (
        "fixmatch",
        "simpro",
    ):  # their constructors take the pool's size (FlexMatch, SimPro's scale)
        config["num_unlabeled"] = len(split.y_ulb)
    module = cls.from_config(network, **config)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=Batches(split, steps_per_epoch, batch_size, mu, seed))
    module.eval()
    with torch.no_grad():
        _, logits = module.predict_batch(split.x_test)  # (N_test, C)
    pred = logits.argmax(1).numpy()
    cm = confusion_matrix(split.y_test.numpy(), pred, NUM_CLASSES)  # (C, C)
    recall = np.diag(cm) / cm.sum(1)  # (C,)
    prior = getattr(module, "unlabeled_prior", None)
    return metrics_from_confusion(cm)["macro_f1"], float(recall[split.rare_half].mean()), prior


def mean_std(values: list[float]) -> str:
    """``mean +- sample std`` (3 decimals; the std is left out for one value)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reversed mix, FixMatch/ACR/SimPro, 1 seed")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600, help="training steps per run")
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=20,
        help="steps between the priors' epoch updates (30 in 600 steps)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="labeled images per step")
    p.add_argument("--mu", type=int, default=4, help="unlabeled images per labeled image in a step")
    p.add_argument("--n-max", type=int, default=20, help="labeled images of the most common class")
    p.add_argument(
        "--ratio", type=float, default=10.0, help="labeled (and consistent/reversed) imbalance ratio"
    )
    p.add_argument("--n-max-u", type=int, default=120, help="unlabeled images of the most common class")
    p.add_argument("--n-test", type=int, default=30, help="test images per class (balanced)")
    p.add_argument("--mixes", nargs="+", choices=MIXES, default=list(MIXES), help="unlabeled mixes to run")
    a = p.parse_args()
    if a.ratio < 10:
        p.error("--ratio must be at least 10 (the study's long tail)")
    mixes, systems, seeds, steps = tuple(a.mixes), list(SYSTEMS), range(a.seeds), a.steps
    if a.quick:
        mixes, systems, seeds = ("reversed",), ["fixmatch", "acr", "simpro"], range(1)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*IterableDataset.*|.*iterable.*|.*module\\(s\\) in eval mode.*")

    print(
        f"digits long-tailed: labeled {long_tail(a.n_max, a.ratio)} per class rank (ratio {a.ratio:g}), unlabeled "
        f"max {a.n_max_u} per class, test {a.n_test} per class; {steps} steps of {a.batch_size} labeled + "
        f"{a.mu * a.batch_size} unlabeled, seeds {list(seeds)}",
        flush=True,
    )
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    start = time.perf_counter()
    for mix in mixes:
        for seed in seeds:
            split = make_split(mix, seed, a.n_max, a.ratio, a.n_max_u, a.n_test)
            for system in systems:
                f1, rare, prior = train_system(
                    system, split, seed, steps, a.steps_per_epoch, a.batch_size, a.mu
                )
                results.setdefault((mix, system), []).append((f1, rare))
                estimate = ""
                if prior is not None:
                    true = torch.bincount(split.y_ulb, minlength=NUM_CLASSES).float()
                    true /= true.sum()
                    est = torch.tensor([prior[str(c)] for c in range(NUM_CLASSES)])
                    estimate = f", estimated unlabeled prior off by {0.5 * (est - true).abs().sum():.3f} (TV)"
                print(
                    f"  {mix:10s} seed {seed} {system:26s} macro-F1 {f1:.3f} rare-half recall {rare:.3f}{estimate}"
                    f"  [{time.perf_counter() - start:.0f} s]",
                    flush=True,
                )

    print()
    print("| system | " + " | ".join(f"{m}: macro-F1 | {m}: rare-half recall" for m in mixes) + " |")
    print("|---|" + "---:|" * (2 * len(mixes)))
    for system in systems:
        cells = []
        for mix in mixes:
            runs = results[(mix, system)]
            cells += [mean_std([f1 for f1, _ in runs]), mean_std([r for _, r in runs])]
        print(f"| {system} | " + " | ".join(cells) + " |")
    print(
        f"\n{len(list(seeds))} seed(s) per cell, mean ± sample std; {time.perf_counter() - start:.0f} s in all."
    )

    fixmatch = statistics.mean(f1 for f1, _ in results[("reversed", "fixmatch")])
    gain = (
        max(statistics.mean(f1 for f1, _ in results[("reversed", s)]) for s in ("acr", "simpro")) - fixmatch
    )
    closing_line(
        "imbalance",
        "best of acr/simpro macro-F1 gain over fixmatch, reversed mix",
        gain,
        ">=",
        0.03,
        digits=3,
        signed=True,
    )


if __name__ == "__main__":
    main()
