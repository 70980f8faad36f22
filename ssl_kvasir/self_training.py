"""Self-training rounds: teacher -> pseudo-labels -> noised student -> the student becomes the teacher.

Round 0 trains the first teacher on the labeled subset (with the student's noise, as Noisy Student does). After
each round its selected model labels the unlabeled pool; the confident pseudo-labels, optionally balanced
across classes, join the next round's training set. Each round lives in ``<output_dir>/round_<r>/`` with its
own checkpoints, ``round_results.json`` and ``pseudo_labels.csv``; a finished round is not redone when the run is
restarted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, open_dict

from ssl_kvasir.errors import ConfigError
from ssl_kvasir.io import atomic_write_json

log = logging.getLogger("ssl_kvasir")
BALANCES = ("none", "cap", "duplicate")
# A round's results are not named results.json, so that sweeps and curves count the whole run once.
ROUND_RESULTS = "round_results.json"


def select_for_training(
    probs: np.ndarray,
    threshold: float,
    balance: str = "cap",
    max_per_class: int | None = None,
    soft: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose pseudo-labeled images and their targets.

    Args:
        probs: (N, C) teacher probabilities over the pool.
        threshold: minimum confidence.
        balance: ``none``; ``cap``: at most ``max_per_class`` most confident images per class; ``duplicate``:
            like cap, and classes with fewer images are repeated up to it (Noisy Student: "we duplicate images
            in classes where there are not enough images").
        max_per_class: the per-class budget; None = the median count over classes with any confident image.
        soft: targets are the teacher's probabilities instead of one-hot labels.

    Returns:
        ``positions`` (M,) into the pool (repeated under ``duplicate``) and ``targets`` (M, C).
    """
    if balance not in BALANCES:
        raise ConfigError(f"unknown balance {balance!r}; valid: {', '.join(BALANCES)}")
    conf, pred = probs.max(1), probs.argmax(1)  # (N,), (N,)
    confident = np.flatnonzero(conf >= threshold)
    counts = np.bincount(pred[confident], minlength=probs.shape[1])  # (C,)
    if max_per_class is None:
        present = counts[counts > 0]
        max_per_class = int(np.median(present)) if len(present) else 0
    chosen = []
    for c in range(probs.shape[1]):
        members = confident[pred[confident] == c]
        members = members[np.argsort(-conf[members], kind="stable")]  # most confident first
        if balance != "none":
            members = members[:max_per_class]
        if balance == "duplicate" and 0 < len(members) < max_per_class:
            members = np.resize(members, max_per_class)
        chosen.append(members)
    positions = np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)
    targets = probs[positions] if soft else np.eye(probs.shape[1], dtype=np.float32)[pred[positions]]
    return positions.astype(np.int64), targets.astype(np.float32)


def fit_rounds(cfg: DictConfig, exp, out: Path) -> dict:
    """Run every round of self-training and write ``out/results.json`` (the last round's metrics plus a
    ``rounds`` list with each round's metrics and number of pseudo-labels)."""
    from ssl_kvasir.methods import METHODS
    from ssl_kvasir.pseudo_labels.table import (
        build_pseudo_label_table,
        read_pseudo_labels,
        write_pseudo_labels,
    )
    from ssl_kvasir.runner import fit_once, load_method, predict_rows

    p = cfg.method.pseudo
    images = exp.catalog.images
    cfg = cfg.copy()
    with open_dict(cfg):
        # The student is noised: the method's dropout and stochastic depth, unless the backbone config sets its own.
        cfg.backbone.drop_rate = cfg.backbone.drop_rate or cfg.method.noise.drop_rate
        cfg.backbone.drop_path_rate = cfg.backbone.drop_path_rate or cfg.method.noise.drop_path_rate
    pool = np.concatenate(
        [exp.split.unlabeled, exp.split.rest] if cfg.data.unlabeled_rest else [exp.split.unlabeled]
    )
    pseudo = None
    if p.file:
        table = read_pseudo_labels(Path(p.file), exp.catalog.classes)
        row_of = {path: row for row, path in zip(pool, images.path.to_numpy()[pool], strict=True)}
        unknown = [x for x in table.path if x not in row_of]
        if unknown:
            raise ConfigError(
                f"{p.file}: {len(unknown)} paths are not in the unlabeled pool (e.g. {unknown[0]})"
            )
        rows = np.array([row_of[x] for x in table.path], dtype=np.int64)
        pseudo = (rows, np.eye(len(exp.catalog.classes), dtype=np.float32)[table.paper_index.to_numpy()])
    history = []
    for r in range(cfg.method.rounds + 1):
        round_dir = out / f"round_{r}"
        done = round_dir / ROUND_RESULTS
        n_pseudo = 0 if pseudo is None else len(pseudo[0])
        if done.exists():
            results = json.loads(done.read_text())
        else:
            results = fit_once(
                cfg,
                exp,
                METHODS["self_training"],
                round_dir,
                pseudo_labeled=pseudo,
                extra={"round": r, "n_pseudo": n_pseudo},
                results_file=ROUND_RESULTS,
            )
        history.append(
            {
                "round": r,
                "n_pseudo": n_pseudo,
                "metrics": results["metrics"],
                "val_metrics": results["val_metrics"],
            }
        )
        log.info(
            "self-training round %d: %d pseudo-labels, test MCC %.4f", r, n_pseudo, results["metrics"]["mcc"]
        )
        if r == cfg.method.rounds:
            break
        # The round's selected model becomes the teacher of the next round.
        teacher = load_method(Path(results["checkpoint"]))
        probs, _ = predict_rows(teacher, cfg, exp, pool)  # (N_pool, C)
        positions, targets = select_for_training(probs, p.threshold, p.balance, p.max_per_class, p.soft)
        table = build_pseudo_label_table(
            images.path.to_numpy()[pool], probs, exp.catalog.classes, checkpoint=results["checkpoint"]
        )
        write_pseudo_labels(table, round_dir / "pseudo_labels.csv")
        pseudo = (pool[positions], targets)
    final = dict(results)
    final.update(method="self_training", rounds=history, round=cfg.method.rounds)
    atomic_write_json(out / "results.json", final)
    return final
