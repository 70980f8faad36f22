"""Runs built from a composed config: fit, evaluate, predict.

This is the one layer that reads config objects; below it every constructor takes plain typed arguments.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from ssl_kvasir.config import require
from ssl_kvasir.data.archive import Catalog, load_catalog
from ssl_kvasir.data.datamodule import KvasirDataModule
from ssl_kvasir.data.splits import ExperimentSplit, make_split, unlabeled_pool
from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.io import atomic_write, atomic_write_json
from ssl_kvasir.methods import METHODS, BaseMethod
from ssl_kvasir.models import build_network
from ssl_kvasir.version import code_version

log = logging.getLogger("ssl_kvasir")
# The EMA copy is a submodule kept in eval mode on purpose (BatchNorm uses its averaged statistics).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")

# Keys of a method config that configure the run around the module, not the module itself.
RUN_KEYS = ("name", "rounds", "pseudo", "noise")


@dataclass
class Experiment:
    """The data side of a run: catalog, split and cache."""

    catalog: Catalog
    split: ExperimentSplit
    cache: object | None


def load_experiment(data: DictConfig) -> Experiment:
    """Catalog, cache (optional) and split from a ``data`` config.

    Images that ``prepare`` could not decode are left out, each reported; images missing from the cache
    (the archive grew since) are an error, since ``prepare`` can add them.
    """
    catalog = load_catalog(
        Path(data.root),
        source=data.source,
        split_file=Path(data.split_file) if data.split_file else None,
        generate_folds=data.generate_folds,
        fold_seed=data.seed,
        unlabeled_root=Path(data.unlabeled_root) if data.unlabeled_root else None,
    )
    cache = None
    if data.cache:
        from ssl_kvasir.data.cache import ImageCache

        cache = ImageCache(Path(data.cache), expected_size=None)
        if cache.size < data.image_size:
            raise DataError(
                f"cache {data.cache} was built at {cache.size} px, smaller than data.image_size={data.image_size}; "
                f"run `ssl-kvasir prepare --size {data.image_size}` or lower data.image_size"
            )
        bad = catalog.images.path.isin(cache.skipped.keys())
        for path in catalog.images.path[bad]:
            catalog.problems.append(
                f"{path} is left out: prepare could not decode it ({cache.skipped[path]})"
            )
        catalog.images = catalog.images[~bad].reset_index(drop=True)
        missing = cache.missing(list(catalog.images.path))
        if missing:
            raise DataError(
                f"cache {data.cache} lacks {len(missing)} images of the archive (e.g. {missing[0]}); "
                "run `ssl-kvasir prepare` again to add them"
            )
    for problem in catalog.problems:
        log.warning("%s", problem)
    split = make_split(
        catalog,
        eval_fold=data.fold,
        val_fraction=data.val_fraction,
        label_fraction=data.label_fraction,
        labels_per_class=data.labels_per_class,
        seed=data.seed,
    )
    return Experiment(catalog, split, cache)


def method_class(name: str) -> type[BaseMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None


def build_datamodule(
    cfg: DictConfig,
    exp: Experiment,
    method_cls: type[BaseMethod],
    network,
    steps_per_epoch: int,
    pseudo_labeled=None,
) -> KvasirDataModule:
    """The DataModule of a run; normalisation comes from the network's timm data config."""
    d = cfg.data
    return KvasirDataModule(
        exp.catalog,
        exp.split,
        image_size=d.image_size,
        mean=network.data_config["mean"],
        std=network.data_config["std"],
        batch_size=d.batch_size,
        mu=d.mu,
        labeled_views=method_cls.labeled_views,
        unlabeled_views=method_cls.unlabeled_views,
        unlabeled_rest=d.unlabeled_rest,
        use_archive_unlabeled=d.use_archive_unlabeled,
        pseudo_labeled=pseudo_labeled,
        pseudo_views=method_cls.pseudo_views,
        steps_per_epoch=steps_per_epoch,
        num_workers=d.num_workers,
        cache=exp.cache,
        strong_color=d.strong_color,
        seed=d.seed,
    )


def build_network_from_cfg(cfg: DictConfig, num_classes: int):
    b = cfg.backbone
    weights = OmegaConf.to_container(b.weights) if OmegaConf.is_list(b.weights) else b.weights
    return build_network(
        b.name,
        num_classes,
        head=b.head,
        pretrained=b.pretrained,
        weights=weights,
        drop_rate=b.drop_rate,
        drop_path_rate=b.drop_path_rate,
        mlp_hidden=b.mlp_hidden,
    )


def schedule(max_steps: int, steps_per_epoch: int) -> tuple[int, int]:
    """Steps per epoch and total steps such that the run ends on an epoch boundary (where it validates and
    checkpoints): the total is ``max_steps`` rounded up to a whole number of equal epochs."""
    if max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be at least 1, got {max_steps}")
    epochs = math.ceil(max_steps / max(steps_per_epoch, 1))
    per_epoch = math.ceil(max_steps / epochs)
    return per_epoch, per_epoch * epochs


def build_method(
    cfg: DictConfig, method_cls: type[BaseMethod], dm: KvasirDataModule, network, total_steps: int
) -> BaseMethod:
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k not in RUN_KEYS}
    kwargs.update(method_cls.data_kwargs(dm))
    try:
        return method_cls(
            network=network,
            class_names=dm.catalog.classes.names,
            max_steps=total_steps,
            seed=cfg.seed,
            **kwargs,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {cfg.method.name}: {e}") from None


def build_logger(cfg: DictConfig, out: Path):
    from lightning.pytorch.loggers import CSVLogger

    if cfg.logger.kind == "csv":
        return CSVLogger(save_dir=str(out), name="logs", version="")
    if cfg.logger.kind != "wandb":
        raise ConfigError(f"unknown logger {cfg.logger.kind!r}; valid: wandb, csv")
    from lightning.pytorch.loggers import WandbLogger

    from ssl_kvasir.tracking import run_group, run_tags, wandb_mode

    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or run_group(cfg),
        tags=run_tags(cfg),
        name=out.name,
        save_dir=str(out),
        mode=cfg.logger.mode or wandb_mode(),
        config=OmegaConf.to_container(cfg, resolve=True),
        id=_stable_run_id(out),
        resume="allow",
    )


def _stable_run_id(out: Path) -> str:
    """One W&B run per output folder, so a resumed or requeued job continues its run."""
    import hashlib

    return hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target and renamed into place.

    Lightning's own writer stages the file in the system's temporary folder and moves it: across filesystems
    (a cluster's shared output folder) that move is a copy, and a job killed during it leaves a truncated
    ``last.ckpt`` behind.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)


@contextlib.contextmanager
def one_tracking_run(logger):
    """One W&B run per Lightning fit, closed when the fit ends (a failed one marked so): the next fit in the
    same process (a local sweep's next point, self-training's next round) must not log into this run."""
    try:
        yield
    except BaseException:
        _finish_wandb(logger, exit_code=1)
        raise
    _finish_wandb(logger, exit_code=0)


def _finish_wandb(logger, exit_code: int) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def build_trainer(cfg: DictConfig, out: Path, total_steps: int, steps_per_epoch: int, has_val: bool, logger):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    t = cfg.trainer
    best = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="best",
        monitor=t.monitor if has_val else None,
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
    )
    # The resume point, written at every epoch end. Not ModelCheckpoint(save_last=True): Lightning 2.6 writes
    # that one only when the monitored metric improved, so a requeued job would redo every epoch since then.
    last = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
    )
    plugins = [AtomicCheckpointIO()]
    if "SLURM_JOB_ID" in os.environ:
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        # A pre-empted or timed-out job is requeued and resumes from checkpoints/last.ckpt.
        plugins.append(SLURMEnvironment(auto_requeue=True))
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
        callbacks=[best, last],  # trainer.checkpoint_callback is the first: the model selection
        plugins=plugins,
        # The samplers shard themselves under DDP and stay seeded by (seed, epoch).
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if has_val else 0,
        log_every_n_steps=min(t.log_every_n_steps, steps_per_epoch),
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(out),
    )


def fit(cfg: DictConfig) -> dict:
    """Train, select on the validation part, test on the evaluation fold, write ``results.json``.

    A run whose ``results.json`` exists is not redone; a run with ``checkpoints/last.ckpt`` resumes from it.
    Self-training runs its rounds, each in ``round_<r>/``.
    """
    require(cfg, "output_dir", "data.root")
    out = Path(cfg.output_dir)
    if (out / "results.json").exists():
        import json

        log.warning("%s exists: the run is done (delete it to run again)", out / "results.json")
        return json.loads((out / "results.json").read_text())
    method_cls = method_class(cfg.method.name)
    exp = load_experiment(cfg.data)
    if cfg.method.name == "self_training":
        from ssl_kvasir.self_training import fit_rounds

        return fit_rounds(cfg, exp, out)
    return fit_once(cfg, exp, method_cls, out)


def fit_once(
    cfg: DictConfig,
    exp: Experiment,
    method_cls: type[BaseMethod],
    out: Path,
    pseudo_labeled=None,
    extra: dict | None = None,
    results_file: str = "results.json",
) -> dict:
    """One Lightning fit + validation + test of ``method_cls``, written to ``out/<results_file>``."""
    from lightning.fabric.utilities.seed import seed_everything

    seed_everything(cfg.seed, workers=True, verbose=False)
    per_epoch, total = schedule(cfg.trainer.max_steps, cfg.data.steps_per_epoch)
    network = build_network_from_cfg(cfg, len(exp.catalog.classes))
    if cfg.trainer.channels_last:
        network = network.to(memory_format=torch.channels_last)
    dm = build_datamodule(cfg, exp, method_cls, network, per_epoch, pseudo_labeled)
    module = build_method(cfg, method_cls, dm, network, total)
    has_val = len(exp.split.val) > 0
    logger = build_logger(cfg, out)
    trainer = build_trainer(cfg, out, total, per_epoch, has_val, logger)
    last = out / "checkpoints" / "last.ckpt"
    with one_tracking_run(logger):
        # weights_only: a checkpoint is read as data (tensors, numbers, strings), never as code to run.
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None, weights_only=True)
        best = trainer.checkpoint_callback.best_model_path or str(last)
        val = None
        if has_val:
            trainer.validate(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
            val = module.last_eval["val"]
        trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    test = module.last_eval["test"]
    results = make_results(cfg, exp, module, test, val, best, total)
    results.update(extra or {})
    if trainer.is_global_zero:
        write_results(out / results_file, results, exp.catalog.classes.names, test["confusion_matrix"])
    return results


def make_results(
    cfg: DictConfig,
    exp: Experiment,
    module: BaseMethod,
    test: dict,
    val: dict | None,
    checkpoint: str,
    steps: int,
) -> dict:
    from ssl_kvasir.metrics import per_class_report
    from ssl_kvasir.tracking import run_group

    names = exp.catalog.classes.names
    return {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name
        if cfg.backbone.head in ("linear", "averaged")
        else f"{cfg.backbone.name}+{cfg.backbone.head}",
        "system": cfg.system,
        "fold": cfg.data.fold,
        "seed": cfg.seed,
        "data_seed": cfg.data.seed,
        "label_fraction": cfg.data.label_fraction if cfg.data.labels_per_class is None else None,
        "labels_per_class": cfg.data.labels_per_class,
        "n_labeled": int(len(exp.split.labeled)),
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
        "selection": f"best {cfg.trainer.monitor} on the validation part of the training folds"
        if val
        else "last checkpoint (no validation images)",
        "per_class": per_class_report(test["confusion_matrix"], names),
        "confusion_matrix": np.asarray(test["confusion_matrix"]).tolist(),
        "checkpoint": str(checkpoint),
        "group": cfg.logger.get("group") or run_group(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write_results(path: Path, results: dict, names: list[str], cm) -> None:
    """``results.json`` and a confusion-matrix PNG beside it."""
    from ssl_kvasir.metrics import plot_confusion_matrix

    title = f"{results['method']} {results['backbone']} fold {results['fold']}"
    plot_confusion_matrix(np.asarray(cm), names, path.parent / "confusion_matrix.png", title=title)
    atomic_write_json(path, results)


def load_method(checkpoint: Path, map_location: str = "cpu") -> BaseMethod:
    """Rebuild a trained method from its checkpoint (network from the stored spec, weights, EMA).

    The data settings it was trained with (``KvasirDataModule.state_dict``: image size, normalisation,
    classes) are attached as ``module.data_settings``.

    Raises:
        DataError: when the file is not a ssl_kvasir checkpoint.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise DataError(f"checkpoint {checkpoint} does not exist")
    try:
        ckpt = torch.load(checkpoint, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read checkpoint {checkpoint}: {type(e).__name__}: {e}") from None
    if "network_spec" not in ckpt or "method" not in ckpt:
        raise DataError(f"{checkpoint} is not a ssl_kvasir checkpoint (no network spec)")
    spec = dict(ckpt["network_spec"])
    network = build_network(**spec)
    cls = method_class(ckpt.get("method", ""))
    module = cls(network=network, **ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    module.data_settings = ckpt.get(KvasirDataModule.__qualname__, {})
    return module.eval()


def evaluate(cfg: DictConfig) -> dict:
    """Re-evaluate ``cfg.checkpoint`` on the evaluation fold of ``cfg.data``; writes
    ``output_dir/evaluation.json`` (same fields as ``results.json``)."""
    import lightning as L

    require(cfg, "checkpoint", "output_dir", "data.root")
    module = load_method(Path(cfg.checkpoint))
    exp = load_experiment(cfg.data)
    n_classes = len(exp.catalog.classes)
    if module.num_classes != n_classes:
        raise DataError(
            f"checkpoint {cfg.checkpoint} has {module.num_classes} classes, the data at {cfg.data.root} has {n_classes}"
        )
    spec = module.model.spec
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.method = {"name": module.name}
        cfg.backbone.name, cfg.backbone.head = spec["name"], spec["head"]
    dm = build_datamodule(cfg, exp, type(module), module.model, steps_per_epoch=1)
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision,
        logger=False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.test(module, datamodule=dm, verbose=False)
    test = module.last_eval["test"]
    results = make_results(cfg, exp, module, test, None, str(cfg.checkpoint), steps=0)
    out = Path(cfg.output_dir)
    atomic_write_json(out / "evaluation.json", results)
    return results


@torch.no_grad()
def predict_rows(
    module: BaseMethod, cfg: DictConfig, exp: Experiment, rows: np.ndarray, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and features (N, D) of the eval network for catalog ``rows``."""
    from rich.progress import Progress

    dm = build_datamodule(cfg, exp, type(module), module.model, steps_per_epoch=1)
    device = (
        "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    )
    network = module.eval_network.to(device).eval()
    probs, feats = [], []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"predicting {len(rows)} images", total=len(rows))
        for batch in dm.loader(rows):
            f, logits = network.features_and_logits(batch["eval"].to(device))  # (B, D), (B, C)
            probs.append(logits.float().softmax(1).cpu().numpy())
            feats.append(f.float().cpu().numpy())
            bar.advance(task, len(f))
    return np.concatenate(probs), np.concatenate(feats)
