"""``ssl-kvasir label-issues``: suspect labels of the labeled training fold, ranked (``label_issues.csv``).

Confident learning needs, for every labeled image, class probabilities from a model that did not train on
that image's label. The training fold's labeled images are cut into k stratified parts
(:func:`~ssl_kvasir.analysis.label_noise.stratified_parts`, seeded by ``data.seed``), each part is predicted by
a model trained without it, and cleanlab's ``find_label_issues`` ranks the labels those out-of-fold
probabilities contradict (:func:`~ssl_kvasir.analysis.label_noise.rank_label_issues`). The evaluation fold
(``data.fold``) is never read: no fit trains, validates or tests on it, and nothing predicts it.

``label_issues.model`` chooses the model:

- ``finetune`` (default): k real fits of the configured network (``method``, ``backbone``, ``trainer`` and
  ``data`` as ``ssl-kvasir fit`` takes them). The fit of part j is an ordinary run
  (:func:`ssl_kvasir.run.train.fit`) on a split whose evaluation part is part j and whose labeled and validation
  parts are cut, by ``data.val_policy`` and the label budget, from the other k - 1 parts; the evaluation fold is
  in none of its parts (:func:`fold_experiment`). Each fit has its run folder, ``<output_dir>/fold_<j>_of_<k>/``:
  a finished one is reused, an interrupted one resumes from its ``last.ckpt``, a changed setting is refused.
- ``probe``: k logistic regressions (:func:`~ssl_kvasir.analysis.label_noise.out_of_fold_probs`) on the frozen
  features of ``backbone.weights`` (or timm's pretrained weights, ``backbone.pretrained=true``): seconds instead
  of k trainings, with features that never saw these labels, and weaker ones than a fine-tuned network's.

Neither uses a run's checkpoint: a network trained on the training fold has fitted its labels, the wrong ones
too, so its features put a mislabeled image beside its given class, and heads trained on them, k-fold or not,
confirm the error instead of flagging it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, open_dict

from ssl_kvasir.config import require
from ssl_kvasir.data.archive import Catalog
from ssl_kvasir.data.splits import make_split
from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.files import atomic_write_text
from ssl_kvasir.names import LabelBudget
from ssl_kvasir.run.experiment import Experiment, load_experiment

log = logging.getLogger("ssl_kvasir")

ISSUE_COLUMNS = ["rank", "filename", "path", "given_class", "suggested_class", "label_quality"]
"""Columns of ``label_issues.csv``: ``rank`` 1 = most suspect; ``label_quality`` = the out-of-fold probability
of the given class."""


def label_issues(cfg: DictConfig) -> tuple[Path, int, int]:
    """Rank the suspect labels of the training fold; returns the CSV, the number flagged and the number checked.

    Raises:
        ConfigError: for an unknown ``label_issues.model``, or ``probe`` without backbone weights.
        DataError: when the training fold holds no labeled image.
    """
    from ssl_kvasir.analysis.label_noise import rank_label_issues, stratified_parts

    require(cfg, "output_dir", "data.root")
    exp = load_experiment(cfg.data)
    images = exp.catalog.images
    labels, folds = images.label.to_numpy(), images.fold.to_numpy()
    rows = np.flatnonzero((labels >= 0) & (folds >= 0) & (folds != cfg.data.fold))  # the training fold
    if not len(rows):
        raise DataError(f"{cfg.data.root}: no labeled image outside evaluation fold {cfg.data.fold}")
    given = labels[rows]
    parts = stratified_parts(given, cfg.label_issues.folds, seed=cfg.data.seed)  # (N_train,)
    model = cfg.label_issues.model
    if model == "finetune":
        probs = finetuned_probs(cfg, exp, rows, parts)
    elif model == "probe":
        probs = probed_probs(cfg, exp, rows, parts)
    else:
        raise ConfigError(f"unknown label_issues.model {model!r}; valid: finetune, probe")
    ranked = rank_label_issues(given, probs)  # (N_train, C) probabilities -> the flagged, worst first
    found = rows[ranked.position.to_numpy()]
    names = np.asarray(exp.catalog.classes.names, dtype=object)
    paths = images.path.to_numpy()
    table = pd.DataFrame(
        {
            "rank": np.arange(1, len(ranked) + 1),
            "filename": [Path(p).name for p in paths[found]],
            "path": paths[found],
            "given_class": names[ranked.given.to_numpy()],
            "suggested_class": names[ranked.suggested.to_numpy()],
            "label_quality": ranked.label_quality.to_numpy(),
        },
        columns=ISSUE_COLUMNS,
    )
    output = Path(cfg.output) if cfg.output else Path(cfg.output_dir) / "label_issues.csv"
    atomic_write_text(output, table.to_csv(index=False, lineterminator="\n"))
    log.info("%d of %d labeled training images flagged -> %s", len(table), len(rows), output)
    return output, len(table), len(rows)


def fold_experiment(exp: Experiment, rows: np.ndarray, held_out: np.ndarray, cfg: DictConfig) -> Experiment:
    """The data of one fit inside the training fold: ``held_out`` is its evaluation part, the rest of ``rows``
    its training fold (cut into labeled, validation and rest by the config's policy and budget).

    Its catalog keeps the labeled images of ``rows`` as two folds, 0 (``held_out``) and 1 (the others), and the
    archive's unlabeled images; every other image, the evaluation fold first of all, is not in it, so no part
    of the fit can read it.

    Args:
        exp: the command's data.
        rows: ``(N_train,)`` catalog rows of the training fold's labeled images.
        held_out: ``(N_train,)`` True for the images of the part this fit predicts.
        cfg: the command's config (``data``: validation policy and share, label budget, data seed).
    """
    images = exp.catalog.images
    fold = np.full(len(images), -1, dtype=np.int64)
    fold[rows] = np.where(held_out, 0, 1)
    keep = (fold >= 0) | (images.label.to_numpy() < 0)
    catalog: Catalog = dataclasses.replace(
        exp.catalog, images=images.assign(fold=fold)[keep].reset_index(drop=True), n_folds=2
    )
    d = cfg.data
    split = make_split(
        catalog,
        eval_fold=0,
        val_fraction=d.val_fraction,
        budget=LabelBudget.from_settings(d.label_fraction, d.labels_per_class),
        seed=d.seed,
        val_policy=d.val_policy,
    )
    return Experiment(catalog, split, exp.cache)


def finetuned_probs(cfg: DictConfig, exp: Experiment, rows: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """``(N_train, C)`` probabilities of each image of ``rows`` from the configured fit on the other parts,
    one run folder per part under ``output_dir`` (reused when finished, resumed when interrupted)."""
    from ssl_kvasir.run.experiment import method_class
    from ssl_kvasir.run.folder import RunFolder
    from ssl_kvasir.run.train import StageRunner, fit

    k = int(parts.max()) + 1
    probs = np.zeros((len(rows), len(exp.catalog.classes)), dtype=np.float64)  # (N_train, C)
    given = exp.catalog.images.label.to_numpy()[rows]
    for part in range(k):
        held_out = parts == part
        fold_exp = fold_experiment(exp, rows, held_out, cfg)
        folder = RunFolder(Path(cfg.output_dir) / f"fold_{part + 1}_of_{k}")
        # Said before the fit: a finished fold is reused, an interrupted one resumes from its last.ckpt.
        status = "reused" if folder.results.exists() else "resumed" if folder.last.exists() else "trained"
        fold_cfg = cfg.copy()
        with open_dict(fold_cfg):
            fold_cfg.output_dir = str(folder.root)
        results = fit(fold_cfg, exp=fold_exp)
        # The fold's catalog keeps the command's row order, so its evaluation rows are rows[held_out] in order.
        runner = StageRunner(fold_cfg, fold_exp, method_class(cfg.method.name), folder.root)
        probs[held_out] = runner.predict_probs(results["checkpoint"], fold_exp.split.test)  # (n_out, C)
        agree = float(np.mean(probs[held_out].argmax(1) == given[held_out]))
        log.info(
            "fold %d/%d: %s on %d labeled + %d validation images, %d held out (%.0f%% predicted as labeled) -> %s",
            part + 1,
            k,
            status,
            len(fold_exp.split.labeled),
            len(fold_exp.split.val),
            int(held_out.sum()),
            100 * agree,
            folder.root,
        )
    return probs


def probed_probs(cfg: DictConfig, exp: Experiment, rows: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """``(N_train, C)`` out-of-fold probabilities of logistic heads on the frozen features of the configured
    backbone's weights, which must be given: a randomly initialised network has no features worth probing.

    Raises:
        ConfigError: without ``backbone.weights`` or ``backbone.pretrained=true``.
    """
    from ssl_kvasir.analysis.label_noise import out_of_fold_probs
    from ssl_kvasir.run.experiment import (
        build_datamodule,
        build_method,
        build_network_from_cfg,
        method_class,
    )
    from ssl_kvasir.run.predict import Predictor

    if not cfg.backbone.weights and not cfg.backbone.pretrained:
        raise ConfigError(
            "label_issues.model=probe needs features of a network that never saw these labels: "
            "backbone.weights=FILE (`ssl-kvasir weights fetch`) or backbone.pretrained=true"
        )
    num_classes = len(exp.catalog.classes)
    method_cls = method_class(cfg.method.name)
    network = build_network_from_cfg(cfg, num_classes)
    dm = build_datamodule(cfg, exp, method_cls, network, steps_per_epoch=1)
    module = build_method(cfg, method_cls, dm, network, total_steps=1)
    predictor = Predictor.from_config(module, cfg.trainer)
    features = np.concatenate(
        [f for _, f in predictor.batches(dm, rows, features=True, what=f"embedding {len(rows)} images")]
    )  # (N_train, D)
    log.info("probe: %d-fold logistic heads on %d frozen features", int(parts.max()) + 1, features.shape[1])
    return out_of_fold_probs(
        features,
        exp.catalog.images.label.to_numpy()[rows],
        num_classes,
        parts=parts,
        regularization=cfg.label_issues.regularization,
    )
