"""Fitting and evaluating methods: ``ssl-kvasir fit`` and ``ssl-kvasir evaluate``.

A run is its method's :meth:`~ssl_kvasir.methods.BaseMethod.procedure`, handed a :class:`StageRunner`: one
Lightning fit for most methods, several stages for a method that declares them (self-training's rounds). The
runner never asks which method it runs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from ssl_kvasir.config import require
from ssl_kvasir.data.splits import unlabeled_pool
from ssl_kvasir.errors import ConfigError
from ssl_kvasir.methods import BaseMethod
from ssl_kvasir.names import backbone_id
from ssl_kvasir.run import guard
from ssl_kvasir.run.checkpoint import (
    AtomicCheckpointIO,
    FolderPaths,
    adopt_checkpoint_settings,
    load_method,
    require_same_data,
)
from ssl_kvasir.run.experiment import (
    Experiment,
    build_datamodule,
    build_method,
    build_network_from_cfg,
    load_experiment,
    method_class,
    schedule,
)
from ssl_kvasir.run.folder import RunFolder, read_results, write_results
from ssl_kvasir.run.predict import Predictor
from ssl_kvasir.run.tracking import one_tracking_run, run_group, wandb_logger
from ssl_kvasir.version import code_version

log = logging.getLogger("ssl_kvasir")
# The EMA copy is a submodule kept in eval mode on purpose (BatchNorm uses its averaged statistics).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


class StageRunner:
    """The :class:`~ssl_kvasir.methods.base.Runner` of one ``fit``: what a method's procedure may call.

    Args:
        cfg: the composed run config.
        exp: the run's data.
        method_cls: the method being run.
        out: the run's folder.
    """

    def __init__(self, cfg: DictConfig, exp: Experiment, method_cls: type[BaseMethod], out: Path):
        self.cfg, self.exp, self.method_cls, self.out = cfg, exp, method_cls, out
        self.folder = RunFolder(out)
        method = cast("dict[str, Any]", OmegaConf.to_container(cfg.method, resolve=True))
        self.config: Mapping[str, Any] = {k: method[k] for k in method_cls.procedure_keys if k in method}
        self.num_classes = len(exp.catalog.classes)
        d = cfg.data
        self.pool_rows = unlabeled_pool(exp.split, d.use_archive_unlabeled, d.unlabeled_rest)
        images = exp.catalog.images
        self.pool_paths = images.path.to_numpy()[self.pool_rows]
        self.pool_labels = images.label.to_numpy()[self.pool_rows]
        self.classes = exp.catalog.classes

    def fit_stage(
        self,
        out: Path,
        pseudo_labeled: tuple[np.ndarray, np.ndarray] | None = None,
        extra: dict | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> dict:
        stage = RunFolder(out)
        # The run's own folder keeps its results record; a stage's folder, a stage record.
        record = stage.results if stage.root == self.folder.root else stage.stage_results
        if record.exists():
            results = read_results(record)
        else:
            cfg = self.cfg
            if overrides:
                cfg = cfg.copy()
                with open_dict(cfg):
                    for key, value in overrides.items():
                        OmegaConf.update(cfg, key, value, merge=False)
            results = fit_once(cfg, self.exp, self.method_cls, stage, record, pseudo_labeled, extra)
        # For the procedure, the checkpoint relative to the run's folder (a stage's record: to its own).
        checkpoint = self.folder.relative(stage.resolve(results["checkpoint"]))
        return {**results, "checkpoint": checkpoint}

    def predict_probs(self, checkpoint: str | Path, rows: np.ndarray) -> np.ndarray:
        module = load_method(self.folder.resolve(checkpoint))
        dm = build_datamodule(self.cfg, self.exp, type(module), module.model, steps_per_epoch=1)
        predictor = Predictor.from_config(module, self.cfg.trainer)
        return predictor.probs(dm, rows, what=f"predicting {len(rows)} images")

    def write_results(self, results: dict) -> None:
        # The run's fingerprint, not a stage's (a stage may override settings, e.g. self-training's noise).
        write_results(self.folder.results, {**results, "fingerprint": guard.fingerprint(self.cfg)})


def fit(cfg: DictConfig, exp: Experiment | None = None) -> dict:
    """Run ``cfg.method``'s procedure: train, select on the validation part, test on the evaluation fold,
    write the results record.

    A run whose results record exists is not redone; a run with a ``last.ckpt`` resumes from it. A folder that
    holds another run is refused, and so is one that another fit is writing
    (:func:`ssl_kvasir.run.guard.run_folder`).

    Args:
        cfg: the composed run config.
        exp: the run's data, when the caller cut them itself (``label-issues`` fits inside the training fold);
            by default, :func:`~ssl_kvasir.run.experiment.load_experiment` of ``cfg.data``.
    """
    require(cfg, "output_dir", "data.root")
    folder = RunFolder(Path(cfg.output_dir))
    identity = guard.fingerprint(cfg)
    with guard.run_folder(folder, identity):
        if folder.results.exists():
            results = read_results(folder.results)
            log.warning("%s exists: the run is done (delete it to run again)", folder.results)
            return results
        method_cls = method_class(cfg.method.name)
        exp = load_experiment(cfg.data) if exp is None else exp
        guard.check_experiment(exp, cfg)
        guard.begin(folder, identity)
        return method_cls.procedure(StageRunner(cfg, exp, method_cls, folder.root))


def fit_once(
    cfg: DictConfig,
    exp: Experiment,
    method_cls: type[BaseMethod],
    folder: RunFolder,
    record: Path,
    pseudo_labeled=None,
    extra: dict | None = None,
) -> dict:
    """One Lightning fit + validation + test of ``method_cls`` in ``folder``, its results written to ``record``
    (the folder's results record, or a stage's)."""
    from lightning.fabric.utilities.seed import seed_everything

    seed_everything(cfg.seed, workers=True, verbose=False)
    per_epoch, total = schedule(cfg.trainer.max_steps, cfg.data.steps_per_epoch)
    network = build_network_from_cfg(cfg, len(exp.catalog.classes))
    if cfg.trainer.channels_last:
        network = network.to(memory_format=torch.channels_last)
    dm = build_datamodule(cfg, exp, method_cls, network, per_epoch, pseudo_labeled)
    module = build_method(cfg, method_cls, dm, network, total)
    for line in module.fit_warnings():
        log.warning("%s", line)
    has_val = len(exp.split.val) > 0
    logger = build_logger(cfg, folder.root, stage=extra)
    trainer = build_trainer(cfg, folder, total, per_epoch, len(exp.split.val), logger)
    last = folder.last
    if last.exists():
        guard.check_checkpoint(last, guard.fingerprint(cfg), folder.root)
        log.info("resuming from %s", last)
    with guard.interruptions(trainer, last), one_tracking_run(logger):
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None, weights_only=True)
        # In this folder whatever folder the run began in (FolderPaths keeps the callbacks' paths relative).
        best = trainer.checkpoint_callback.best_model_path or str(last)
        val = None
        if has_val:
            trainer.validate(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
            val = module.last_eval["val"]
        trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    test = module.last_eval["test"]
    results = make_results(
        cfg,
        exp,
        module,
        test,
        val,
        folder.relative(best),
        total,
        selection=trainer.checkpoint_callback.record(),
    )
    results.update(extra or {})
    if trainer.is_global_zero:
        write_outputs(record, results, exp.catalog.classes.names, test["confusion_matrix"])
    return results


def build_logger(cfg: DictConfig, out: Path, stage: Mapping[str, Any] | None = None):
    """The fit's logger: a CSV log, or a W&B run (:func:`ssl_kvasir.run.tracking.wandb_logger`; ``stage``: a
    method stage's record, e.g. self-training's ``{"round": r}``)."""
    from lightning.pytorch.loggers import CSVLogger

    if cfg.logger.kind == "csv":
        return CSVLogger(save_dir=str(out), name="logs", version="")
    if cfg.logger.kind != "wandb":
        raise ConfigError(f"unknown logger {cfg.logger.kind!r}; valid: wandb, csv")
    return wandb_logger(cfg, out, stage)


class ConsoleLines(Callback):
    """One log line per epoch (at its validation, if any), for logs and pipes where a progress bar would be
    noise."""

    def on_train_start(self, trainer, module) -> None:
        # A run resumed mid-epoch (run.preempt) starts without on_train_epoch_start.
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        shown = [f"{k} {float(m[k]):.4f}" for k in ("train/loss", "val/mcc", "val/macro_f1") if k in m]
        log.info(
            "epoch %d/%d, step %d: %s (%.1f s)",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            trainer.global_step,
            ", ".join(shown),
            time.perf_counter() - self.start,
        )


def build_trainer(
    cfg: DictConfig, folder: RunFolder, total_steps: int, steps_per_epoch: int, n_val: int, logger
):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ssl_kvasir.run.model_selection import Selection

    t = cfg.trainer
    has_val = n_val > 0
    best = Selection(
        dirpath=folder.checkpoints,
        monitor=t.monitor,
        rule=t.selection,
        n_val=n_val,
        min_val_size=t.min_val_size,
    )
    # The resume point, written at every epoch end. Not ModelCheckpoint(save_last=True): Lightning 2.6 writes
    # that one only when the monitored metric improved, so a requeued job would redo every epoch since then.
    last = ModelCheckpoint(
        dirpath=folder.checkpoints, filename=RunFolder.LAST, save_top_k=1, enable_version_counter=False
    )
    # A progress bar on a terminal; one line per epoch in logs and pipes.
    interactive = bool(t.progress_bar) and sys.stderr.isatty()
    plugins: list[Any] = [AtomicCheckpointIO()]
    from ssl_kvasir.run.preempt import PreemptionCheckpoint, ProgressFile

    cluster: list[Any] = [ProgressFile(folder.progress, every_n_steps=t.log_every_n_steps)]
    if "SLURM_JOB_ID" in os.environ:
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        # A pre-empted or timed-out job checkpoints at its step, is requeued and resumes from last.ckpt:
        # run.preempt owns the signals, not Lightning's auto-requeue (which waits for USR1, while submitit asks
        # SLURM for USR2).
        plugins.append(SLURMEnvironment(auto_requeue=False))
        cluster.append(PreemptionCheckpoint(folder.last))
    else:
        # SIGTERM or Ctrl-C, even in the first epoch: a checkpoint at the current step, which the same command
        # resumes from.
        cluster.append(
            PreemptionCheckpoint(folder.last, signals=(signal.SIGTERM, signal.SIGINT), requeue=False)
        )
    return L.Trainer(
        # Whole epochs, not max_steps: Lightning resumes a step-based run from an epoch-end checkpoint as if
        # mid-epoch and trains an extra batch, so a requeued run would not repeat an uninterrupted one.
        max_epochs=total_steps // steps_per_epoch,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        logger=logger,
        # trainer.checkpoint_callback is the first: the model selection. One log line per epoch unless a bar shows.
        callbacks=[best, last, guard.fingerprint_callback(guard.fingerprint(cfg)), FolderPaths(folder.root)]
        + ([] if interactive else [ConsoleLines()])
        + cluster,
        plugins=plugins,
        # The samplers shard themselves under DDP and stay seeded by (seed, epoch).
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if has_val else 0,
        log_every_n_steps=min(t.log_every_n_steps, steps_per_epoch),
        enable_progress_bar=interactive,
        enable_model_summary=False,
        default_root_dir=str(folder.root),
    )


def make_results(
    cfg: DictConfig,
    exp: Experiment,
    module: BaseMethod,
    test: dict,
    val: dict | None,
    checkpoint: str,
    steps: int,
    selection: dict | None = None,
) -> dict:
    from ssl_kvasir.metrics import per_class_report

    names = exp.catalog.classes.names
    split = exp.split
    return {
        "method": cfg.method.name,
        "backbone": backbone_id(cfg.backbone.name, cfg.backbone.head),
        "system": cfg.system,
        "protocol": cfg.get("protocol"),
        # What the split was cut with, from the split itself.
        "fold": split.settings["eval_fold"],
        "seed": cfg.seed,
        "data_seed": split.settings["seed"],
        "label_budget": split.budget.record(),
        "val_policy": split.settings["val_policy"],
        "split_identity": split.identity,
        "n_labels_used": split.n_labels_used,  # labeled images used in all: training + validation
        "n_labeled": int(len(split.labeled)),
        # The labeled images each class really has (labels_per_class is clamped at a class's training images).
        "labels_per_class_used": labels_used(exp),
        "n_unlabeled": int(
            len(unlabeled_pool(exp.split, cfg.data.use_archive_unlabeled, cfg.data.unlabeled_rest))
        ),
        "n_val": int(len(exp.split.val)),
        "n_test": int(len(exp.split.test)),
        "steps": steps,
        "code_version": code_version(),
        "classes": names,
        "metrics": {k: float(v) for k, v in test["metrics"].items()},
        "metrics_weights": module.hparams.eval_weights,
        "val_metrics": {k: float(v) for k, v in val["metrics"].items()} if val else None,
        # How the scored checkpoint was chosen (run.model_selection.Selection.record); None for a re-evaluation.
        "selection": selection,
        "per_class": per_class_report(test["confusion_matrix"], names),
        # Methods that estimate the unlabeled pool's class mix (ACR, SimPro) expose it: class -> share.
        "unlabeled_prior": module.unlabeled_prior,
        # Settings under which the method does no more than a simpler one (ACR with a uniform training prior).
        "warnings": module.fit_warnings(),
        "confusion_matrix": np.asarray(test["confusion_matrix"]).tolist(),
        "checkpoint": str(checkpoint),
        "group": cfg.logger.get("group") or run_group(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "fingerprint": guard.fingerprint(cfg),
    }


def labels_used(exp: Experiment) -> dict[str, int]:
    """Labeled images per class that the run's budget holds: its training part and, when validation comes
    out of the budget (``val_policy=budget``), its validation part."""
    rows = exp.split.labeled
    if exp.split.settings.get("val_policy") == "budget":
        rows = np.concatenate([rows, exp.split.val])
    names = exp.catalog.classes.names
    counts = np.bincount(exp.catalog.images.label.to_numpy()[rows], minlength=len(names))  # (C,)
    return dict(zip(names, counts.tolist(), strict=True))


def write_outputs(record: Path, results: dict, names: list[str], cm) -> None:
    """The results record and a confusion-matrix PNG beside it."""
    from ssl_kvasir.analysis.plots import plot_confusion_matrix

    title = f"{results['method']} {results['backbone']} fold {results['fold']}"
    plot_confusion_matrix(np.asarray(cm), names, record.parent / RunFolder.CONFUSION_MATRIX, title=title)
    write_results(record, results)


def evaluate(cfg: DictConfig) -> dict:
    """Re-evaluate ``cfg.checkpoint`` on its evaluation fold through the prediction path; writes the
    results record ``output_dir/evaluation.json``.

    What the checkpoint was trained with (fold, image size, label budget, validation policy and share, data
    seed) is taken from it where ``cfg`` leaves it null, and a value given that disagrees is refused; so are
    data whose classes or split differ from the checkpoint's (:mod:`ssl_kvasir.run.checkpoint`).
    """
    from ssl_kvasir.metrics import confusion_matrix, metrics_from_confusion

    require(cfg, "checkpoint", "output_dir", "data.root")
    module = load_method(Path(cfg.checkpoint))
    cfg = cfg.copy()
    adopt_checkpoint_settings(cfg, module, cfg.checkpoint)
    exp = load_experiment(cfg.data)
    require_same_data(module, cfg.checkpoint, exp, cfg.data.root)
    n_classes = len(exp.catalog.classes)
    spec = module.model.spec
    with open_dict(cfg):
        cfg.method = {"name": module.name}
        cfg.backbone.name, cfg.backbone.head = spec["name"], spec["head"]
    dm = build_datamodule(cfg, exp, type(module), module.model, steps_per_epoch=1)
    rows = exp.split.test
    probs = Predictor.from_config(module, cfg.trainer).probs(dm, rows, what="evaluating")
    cm = confusion_matrix(exp.catalog.images.label.to_numpy()[rows], probs.argmax(1), n_classes)
    test = {"metrics": metrics_from_confusion(cm), "confusion_matrix": cm}
    results = make_results(cfg, exp, module, test, None, str(cfg.checkpoint), steps=0)
    write_results(RunFolder(Path(cfg.output_dir)).evaluation, results)
    return results
