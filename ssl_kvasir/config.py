"""Composing the Hydra configs under ``configs/`` for the command line and for sweeps."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_kvasir import names
from ssl_kvasir.errors import ConfigError
from ssl_kvasir.names import LabelBudget


def config_dir() -> Path:
    """The ``configs/`` folder (``SSL_KVASIR_CONFIGS`` overrides it)."""
    return Path(os.environ.get("SSL_KVASIR_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``key=value`` overrides, in struct mode.

    Every key must be one the configs declare. Hydra's ``+key=value`` (and ``++``) would add a key that is not
    there, which nothing reads: it is taken only for a config group (``+experiment=NAME``), and refused for a
    value like a misspelt key is.

    Raises:
        ConfigError: for an unknown key (with the nearest known one), an unknown group option (listing the
            valid ones) or a bad override.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"arguments must be key=value overrides, got {' '.join(bad)}")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        message = str(e).strip()
        # Hydra's advice for a key it does not know is to add it with '+', which nothing would read.
        if message.startswith("Could not override '") and "+" in message:
            key = message.split("'")[1]
            others = [o for o in overrides if o.lstrip("+~").split("=")[0] != key]
            raise ConfigError(_unknown_key(key, config_name, others)) from None
        raise ConfigError(message) from None
    added = {o.lstrip("+").split("=")[0]: o for o in overrides if o.startswith("+")}
    values = {k: o for k, o in added.items() if not (config_dir() / k.replace(".", "/")).is_dir()}
    if values:
        others = [o for o in overrides if o not in values.values()]
        known = _keys(compose(config_name, others))
        unknown = [k for k in values if k not in known]  # '++' on a key that exists only sets it
        if unknown:
            raise ConfigError(
                "; ".join(_unknown_key(k, config_name, others) for k in unknown)
                + " ('+' adds a key that nothing reads; set a key that exists without it)"
            )
    OmegaConf.set_struct(cfg, True)
    return cfg


def _unknown_key(key: str, config_name: str, overrides: list[str]) -> str:
    """``KEY is not a key of configs/<config_name>.yaml`` and the nearest key it has, if one is close;
    ``overrides`` are the other overrides (they choose the groups whose keys are known)."""
    import difflib

    known = []
    with contextlib.suppress(ConfigError):  # another bad override: no suggestion, the key is still unknown
        known = _keys(compose(config_name, overrides))
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    hint = f"; did you mean {near[0]}?" if near else ""
    return f"{key} is not a key of configs/{config_name}.yaml or its groups{hint}"


def _keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cfg``, leaves and sections."""
    keys = []
    for k in cfg:
        name = str(k)  # a key read from YAML: a string, or a number written as a key
        keys.append(f"{prefix}{name}")
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            keys += _keys(node, f"{prefix}{name}.")
    return keys


def require(cfg: DictConfig, *keys: str) -> None:
    """Fail with the key's name when a mandatory value (``???``) was not given."""
    missing = [k for k in keys if OmegaConf.select(cfg, k, throw_on_missing=False) is None]
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)} (pass {missing[0]}=...)")


@dataclass(frozen=True)
class Number:
    """An int (``integer=True``) or a real number within bounds; ``low_open``/``high_open`` exclude a bound."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    nullable: bool = False
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.nullable else "must be given (not null)"
        kind = "an integer" if self.integer else "a number"
        if self.low is not None or self.high is not None:
            kind = f"{kind} {self._range()}"
        # bool is an int in Python, but data.batch_size=true is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, (int, float) if not self.integer else int):
            return f"must be {kind}{' or null' if self.nullable else ''}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            return f"must be {self._range()}, got {value!r}"
        return None

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        assert self.high is not None  # called only for a rule with a bound
        return f"{'<' if self.high_open else '<='} {_num(self.high)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values (``None`` among them when null is allowed)."""

    values: tuple

    def problem(self, value: Any) -> str | None:
        if value in self.values and not (isinstance(value, bool) and True not in self.values):
            return None
        shown = ", ".join("null" if v is None else str(v) for v in self.values)
        return f"must be one of {shown}, got {value!r}"


@dataclass(frozen=True)
class Flag:
    """true or false."""

    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or (value is None and self.nullable):
            return None
        return f"must be true or false, got {value!r}"


@dataclass(frozen=True)
class Text:
    """A non-empty string (a name or a path); ``listed`` also accepts a list of them."""

    nullable: bool = False
    listed: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.nullable:
            return None
        values = value if self.listed and isinstance(value, (list, tuple)) else [value]
        if values and all(isinstance(v, str) and v for v in values):
            return None
        return f"must be a {'name or path' if not self.listed else 'path or a list of paths'}, got {value!r}"


@dataclass(frozen=True)
class Paths:
    """A list of paths, in brackets (``key=[a.csv,b.csv]``): a bare ``key=a.csv`` is a string, which would be
    read one character at a time, and ``key=5`` a number."""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
            return None
        return f"must be a list of paths in brackets ([A,B], [] for none), got {value!r}"


@dataclass(frozen=True)
class Devices:
    """Lightning's ``devices``: ``auto``, a count (-1: all), a list of device indices or ``"0,1"``."""

    def problem(self, value: Any) -> str | None:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)
        ):
            return None
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v >= 0 for v in value):
            return None
        if (
            isinstance(value, str)
            and value
            and all(p.strip().lstrip("-").isdigit() for p in value.split(","))
        ):
            return None
        return f"must be auto, a number of devices (-1: all) or a list of device indices, got {value!r}"


Rule = Number | Choice | Flag | Text | Paths | Devices
FRACTION = Number(0, 1)
PROBABILITY_OPEN = Number(0, 1, high_open=True)
NON_NEGATIVE = Number(0)
COUNT = Number(1, integer=True)
SIZE = Number(0, integer=True)

# Every numeric and enumerated key of configs/, by dotted name. A key a config does not have is skipped, so
# one table serves `fit` and the analysis commands; method keys are shared by name across methods.
RULES: dict[str, Rule] = {
    "seed": Number(integer=True),
    "output_dir": Text(nullable=True),
    "data.source": Choice(("hyperkvasir", "folder")),
    "data.root": Text(),
    "data.unlabeled_root": Text(nullable=True),
    "data.cache": Text(nullable=True),
    "data.split_file": Text(nullable=True),
    "data.generate_folds": Number(2, integer=True, nullable=True),
    "data.fold": SIZE,
    "data.val_policy": Choice(names.VAL_POLICIES),
    "data.val_fraction": PROBABILITY_OPEN,
    "data.label_fraction": Number(0, 1, low_open=True, nullable=True),
    "data.labels_per_class": Number(1, integer=True, nullable=True),
    "data.seed": Number(integer=True),
    "data.image_size": COUNT,
    "data.batch_size": COUNT,
    "data.mu": SIZE,
    "data.num_workers": SIZE,
    "data.unlabeled_rest": Flag(),
    "data.use_archive_unlabeled": Flag(),
    "data.strong_color": Flag(),
    "data.strong_policy": Choice(names.STRONG_POLICIES),
    "data.sampler": Choice(names.SAMPLERS),
    "data.steps_per_epoch": COUNT,
    "trainer.max_steps": COUNT,
    "trainer.accelerator": Choice(("auto", "cpu", "gpu", "cuda", "mps", "tpu")),
    "trainer.devices": Devices(),
    "trainer.num_nodes": COUNT,
    "trainer.strategy": Text(),
    "trainer.precision": Choice(
        (
            "32-true",
            "32",
            32,
            "64-true",
            "64",
            64,
            "16-mixed",
            "16",
            16,
            "bf16-mixed",
            "bf16",
            "16-true",
            "bf16-true",
        )
    ),
    "trainer.channels_last": Flag(),
    "trainer.monitor": Text(),
    "trainer.selection": Choice(names.SELECTION_RULES),
    "trainer.min_val_size": COUNT,
    "trainer.log_every_n_steps": COUNT,
    "trainer.progress_bar": Flag(),
    "logger.kind": Choice(("wandb", "csv")),
    "logger.mode": Choice((None, "online", "offline", "disabled")),
    "backbone.name": Text(),
    "backbone.head": Choice(names.HEADS),
    "backbone.pretrained": Flag(),
    "backbone.weights": Text(nullable=True, listed=True),
    "backbone.drop_rate": PROBABILITY_OPEN,
    "backbone.drop_path_rate": PROBABILITY_OPEN,
    "backbone.mlp_hidden": COUNT,
    "method.optimizer": Choice(names.OPTIMIZERS),
    "method.lr": Number(0, low_open=True),
    "method.momentum": PROBABILITY_OPEN,
    "method.nesterov": Flag(),
    "method.weight_decay": NON_NEGATIVE,
    "method.schedule": Choice(names.SCHEDULES),
    "method.warmup_steps": SIZE,
    "method.ema_decay": PROBABILITY_OPEN,
    "method.ema_warmup": Flag(),
    "method.eval_weights": Choice(names.EVAL_WEIGHTS),
    "method.loss": Choice(names.LABELED_LOSSES),
    "method.la_tau": NON_NEGATIVE,
    "method.threshold": FRACTION,
    "method.lambda_u": NON_NEGATIVE,
    "method.lambda_pl": NON_NEGATIVE,
    "method.masking": Choice(names.MASKINGS),
    "method.alignment": Choice(names.ALIGNMENTS),
    "method.teacher": Choice(names.TEACHERS),
    "method.ema_p": PROBABILITY_OPEN,
    "method.n_sigma": Number(0, low_open=True),
    "method.lambda_f": NON_NEGATIVE,
    "method.unsup_warmup": FRACTION,
    "method.k": COUNT,
    "method.temperature": Number(0, low_open=True),
    "method.rounds": SIZE,
    "method.noise.drop_rate": PROBABILITY_OPEN,
    "method.noise.drop_path_rate": PROBABILITY_OPEN,
    "method.pseudo.threshold": FRACTION,
    "method.pseudo.balance": Choice(names.BALANCES),
    "method.pseudo.max_per_class": Number(1, integer=True, nullable=True),
    "method.pseudo.soft": Flag(),
    "method.pseudo.file": Text(nullable=True),
    "method.tau_min": NON_NEGATIVE,
    "method.tau_max": NON_NEGATIVE,
    "method.tau_balanced": NON_NEGATIVE,
    "method.tau_pseudo_balanced": NON_NEGATIVE,
    "method.ema_u": FRACTION,
    "method.est_epoch": SIZE,
    "method.scale_labeled_loss": Flag(),
    "method.mix_estimate": Choice(names.MIX_ESTIMATES),
    "method.em_posteriors": Choice(names.EM_POSTERIORS),
    "method.em_warmup_steps": SIZE,
    # The analysis commands (configs/analyze.yaml).
    "checkpoint": Text(nullable=True),
    "predictions": Paths(),
    "knn.neighbours_of": Paths(),
    "format": Choice(("ssl_kvasir", "authors", "label-studio")),
    "embed.dtype": Choice(("float16", "float32")),
    "embed.chunk_rows": COUNT,
    "embed.batch_size": COUNT,
    "knn.database": Choice(("budget", "all")),
    "knn.k": COUNT,
    "knn.temperature": Number(0, low_open=True),
    "knn.neighbours_k": COUNT,
    "umap.n_neighbors": Number(2, integer=True),
    "umap.min_dist": NON_NEGATIVE,
    "umap.cluster_dims": COUNT,
    "umap.pca_dims": Number(1, integer=True, nullable=True),
    "umap.exact": Flag(),
    "umap.backend": Choice(("auto", "umap-learn", "cuml")),
    "umap.plot_epochs": Number(1, integer=True, nullable=True),
    "umap.cluster_epochs": Number(1, integer=True, nullable=True),
    "cluster.enabled": Flag(),
    "cluster.export": Flag(),
    "cluster.min_cluster_size": Number(2, integer=True),
    "select.min_confidence": FRACTION,
    "select.top_k_per_class": Number(1, integer=True, nullable=True),
    "select.require_agreement": Flag(),
    "select.order": Choice(("none", "review")),
    "label_studio.image_prefix": Text(),
    "review.margin_weight": NON_NEGATIVE,
    "review.disagreement_weight": NON_NEGATIVE,
    "review.outlier_weight": NON_NEGATIVE,
    "review.coverage": FRACTION,
    "review.neighbours": COUNT,
    "review.candidates": Number(1, integer=True, nullable=True),
    "review.limit": Number(1, integer=True, nullable=True),
    "review.group_by": Choice(("class", "cluster")),
    "review.thumb_size": Number(16, integer=True),
    "review.page_size": COUNT,
    "review.label_issues": Text(nullable=True),
    "label_issues.model": Choice(("finetune", "probe")),
    "label_issues.folds": Number(2, integer=True),
    "label_issues.regularization": Number(0, low_open=True),
}
CHECKPOINT_SETTINGS = (
    "data.fold",
    "data.image_size",
    "data.label_fraction",
    "data.labels_per_class",
    "data.val_policy",
    "data.val_fraction",
    "data.seed",
)
"""What a checkpoint was trained with, which the commands that apply a checkpoint (evaluate, embed, analyze,
export-pseudo-labels) take from it when left null (``ssl_kvasir.run.checkpoint.adopt_checkpoint_settings``)."""


def _or_null(rule: Rule) -> Rule:
    if isinstance(rule, Choice):
        return Choice((None, *rule.values))
    assert isinstance(rule, (Number, Flag, Text)), f"{rule} has no null"  # the CHECKPOINT_SETTINGS rules
    return replace(rule, nullable=True)


# The configs of the commands that apply a checkpoint: null means "the checkpoint's".
CHECKPOINT_RULES: dict[str, Rule] = {**RULES, **{k: _or_null(RULES[k]) for k in CHECKPOINT_SETTINGS}}


def method_defaults(name: str) -> dict[str, Any]:
    """The settings of ``configs/method/<name>.yaml`` with the files its defaults list extends (``common``,
    ``fixmatch``...), merged in the list's order as Hydra does, as plain values. The YAML is where a method's
    defaults live: :meth:`ssl_kvasir.methods.BaseMethod.from_config` fills a setting it is not given from here.

    Raises:
        ConfigError: when the file does not exist.
    """
    path = config_dir() / "method" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: method {name!r} has no config")
    own = OmegaConf.load(path)
    if not isinstance(own, DictConfig):
        raise ConfigError(f"{path}: a method config is a mapping of settings, not a list")
    entries = list(own.pop("defaults", []))
    merged: DictConfig | ListConfig = OmegaConf.create()
    for entry in entries if "_self_" in entries else [*entries, "_self_"]:
        merged = OmegaConf.merge(merged, own if entry == "_self_" else method_defaults(str(entry)))
    # Merging mappings gives a mapping, whose keys are the YAML's strings.
    return cast(dict[str, Any], OmegaConf.to_container(merged, resolve=True))


def method_names() -> list[str]:
    """The method options of ``configs/method/`` (without importing the methods, which imports torch)."""
    return sorted(p.stem for p in (config_dir() / "method").glob("*.yaml") if p.stem != "common")


def validate(cfg: DictConfig, rules: dict[str, Rule] = RULES) -> None:
    """Check every key of ``cfg`` that ``rules`` knows (type, range, allowed values) and the method's name,
    right after composing and before anything heavy is imported, so a bad value costs a second, not a
    traceback after the data have been scanned.

    Raises:
        ConfigError: one line naming every bad key, its value and what it must be.
    """
    problems = []
    for key, rule in rules.items():
        value = _lookup(cfg, key)
        if value is _ABSENT:
            continue  # not in this config, or mandatory and not given (`require` names it)
        if (why := rule.problem(value)) is not None:
            problems.append(f"{key} {why}")
    name = OmegaConf.select(cfg, "method.name", default=None, throw_on_missing=False)
    if name is not None and name not in method_names():
        problems.append(f"method.name must be one of {', '.join(method_names())}, got {name!r}")
    d = cfg.get("data") or {}
    fraction, per_class = d.get("label_fraction"), d.get("labels_per_class")
    # The label budget, checked here once (a range problem of either key is already named above); under
    # CHECKPOINT_RULES both may be null: the checkpoint's budget.
    budget_named = any(p.startswith(("data.label_fraction ", "data.labels_per_class ")) for p in problems)
    from_checkpoint = rules is CHECKPOINT_RULES and fraction is None and per_class is None
    if "label_fraction" in d and not budget_named and not from_checkpoint:
        try:
            LabelBudget.from_settings(fraction, per_class)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))


def check_inputs(cfg: DictConfig, required: tuple[str, ...] = ()) -> None:
    """The keys a command cannot do without, and the files and folders it names, checked right after
    :func:`validate` and before anything heavy is imported: a checkpoint that is a folder or a prediction file
    that is not there costs a second, not a model load and an embedding.

    Args:
        cfg: the composed config.
        required: keys that must have a value.

    Raises:
        ConfigError: one line naming every key that is missing, or names a path of the wrong kind.
    """
    problems = [
        f"missing value for {k} (pass {k}=...)" for k in required if _lookup(cfg, k) in (_ABSENT, None)
    ]
    value = {k: _lookup(cfg, k) for k in ("checkpoint", "output_dir", "output", "predictions")}
    if value["output"] is None and value["output_dir"] is None and "output" in cfg:
        problems.append("missing value for output_dir (pass output_dir=DIR)")
    if isinstance(value["checkpoint"], str):
        path = Path(value["checkpoint"])
        if path.is_dir():
            problems.append(
                f"checkpoint={path} is a folder: name a checkpoint file (e.g. {path / 'checkpoints' / 'best.ckpt'})"
            )
        elif not path.exists():
            problems.append(f"checkpoint={path} does not exist")
    for key, folder in (("output_dir", value["output_dir"]), ("output", value["output"])):
        if not isinstance(folder, str):
            continue
        path = Path(folder)
        if key == "output" and path.is_dir():
            problems.append(
                f"output={path} is a folder: name the file to write (e.g. {path / 'pseudo_labels.csv'})"
            )
            continue
        # The folder itself (output_dir) or the file's folder (output) must be a folder wherever it exists.
        blocker = next((p for p in [path, *path.parents][key == "output" :] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            problems.append(f"{key}={path}: {blocker} is a file, not a folder")
    if isinstance(value["predictions"], list):
        problems += [f"predictions: {p} is not a file" for p in value["predictions"] if not Path(p).is_file()]
    problems += _data_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def _data_problems(cfg: DictConfig) -> list[str]:
    """The archive folder and where its folds come from: exactly one of a split file and generated folds."""
    if _lookup(cfg, "data.split_file") is _ABSENT or _lookup(cfg, "data.generate_folds") is _ABSENT:
        return []  # a config without folds
    root, split, generate = (_lookup(cfg, f"data.{k}") for k in ("root", "split_file", "generate_folds"))
    problems = []
    if isinstance(root, str) and not Path(root).is_dir():
        problems.append(f"data.root={root} is not a folder")
    if split is not None and generate is not None:
        problems.append("give either a split file (data.split_file) or data.generate_folds, not both")
    elif split is None and generate is None:
        problems.append(
            "no split file: pass data.split_file=FILE (the official 2_fold_split.csv for HyperKvasir), or ask "
            "for seeded stratified folds explicitly with data.generate_folds=N"
        )
    elif isinstance(split, str) and not Path(split).is_file():
        problems.append(f"data.split_file={split} is not a file")
    return problems


_ABSENT = object()


def _lookup(cfg: DictConfig, key: str) -> Any:
    """The resolved value of a dotted key as plain Python, or ``_ABSENT`` when it is not there or is ``???``."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node or OmegaConf.is_missing(node, leaf):
        return _ABSENT
    try:
        value = node[leaf]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}: {e}".splitlines()[0]) from None
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return value
