"""The data and model side of a run, built from a composed config."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from ssl_kvasir.data.archive import Catalog, load_catalog
from ssl_kvasir.data.datamodule import KvasirDataModule
from ssl_kvasir.data.splits import ExperimentSplit, make_split
from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.methods import METHODS, BaseMethod
from ssl_kvasir.models import Network, build_network
from ssl_kvasir.names import LabelBudget

log = logging.getLogger("ssl_kvasir")


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
        budget=LabelBudget.from_settings(data.label_fraction, data.labels_per_class),
        seed=data.seed,
        val_policy=data.val_policy,
    )
    return Experiment(catalog, split, cache)


def method_class(name: str) -> type[BaseMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None


def build_network_from_cfg(cfg: DictConfig, num_classes: int) -> Network:
    b = cfg.backbone
    weights = (
        cast("list[str]", OmegaConf.to_container(b.weights)) if OmegaConf.is_list(b.weights) else b.weights
    )
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


def build_datamodule(
    cfg: DictConfig,
    exp: Experiment,
    method_cls: type[BaseMethod],
    network: Network,
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
        strong_policy=d.strong_policy,
        sampler=d.sampler,
        seed=d.seed,
    )


def schedule(max_steps: int, steps_per_epoch: int) -> tuple[int, int]:
    """Steps per epoch and total steps such that the run ends on an epoch boundary (where it validates and
    checkpoints): the total is ``max_steps`` rounded up to a whole number of equal epochs."""
    if max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be at least 1, got {max_steps}")
    epochs = math.ceil(max_steps / max(steps_per_epoch, 1))
    per_epoch = math.ceil(max_steps / epochs)
    return per_epoch, per_epoch * epochs


def method_config(cfg: DictConfig, method_cls: type[BaseMethod]) -> dict:
    """The keys of ``cfg.method`` that the method's constructor takes (not its name, not its procedure's)."""
    skip = {"name", *method_cls.procedure_keys}
    method = cast("dict[str, Any]", OmegaConf.to_container(cfg.method, resolve=True))
    return {k: v for k, v in method.items() if k not in skip}


def build_method(
    cfg: DictConfig, method_cls: type[BaseMethod], dm: KvasirDataModule, network: Network, total_steps: int
) -> BaseMethod:
    config = method_config(cfg, method_cls) | method_cls.data_kwargs(dm)
    try:
        return method_cls.from_config(
            network,
            class_names=dm.catalog.classes.names,
            max_steps=total_steps,
            seed=cfg.seed,
            **config,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {cfg.method.name}: {e}") from None
