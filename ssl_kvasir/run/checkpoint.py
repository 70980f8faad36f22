"""Checkpoints: written atomically, read back as data into a rebuilt method, and the source of truth for what
the method was trained with.

A checkpoint stores (``KvasirDataModule.state_dict``) the class names, the image size and normalisation, and its
split: the evaluation fold, the label budget, the validation policy and share, the data seed, and the split's
identity (a hash of the images of its labeled, validation and evaluation parts). A command that applies a
checkpoint (evaluate, embed, analyze, export-pseudo-labels) takes each of these settings from it when the
command leaves it null, refuses one that disagrees, naming both values (:func:`adopt_checkpoint_settings`), and
refuses data whose classes or split are not the checkpoint's (:func:`require_same_data`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from ssl_kvasir.data.datamodule import KvasirDataModule
from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.files import atomic_write
from ssl_kvasir.methods import BaseMethod
from ssl_kvasir.models import build_network
from ssl_kvasir.names import LabelBudget
from ssl_kvasir.run.experiment import Experiment, method_class
from ssl_kvasir.run.guard import unreadable_checkpoint

# config key -> the key of the checkpoint's split record that holds its value ("image_size": the data settings)
SPLIT_SETTINGS = {
    "data.fold": "eval_fold",
    "data.val_policy": "val_policy",
    "data.val_fraction": "val_fraction",
    "data.seed": "seed",
}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target and renamed into place.

    Lightning's own writer stages the file in the system's temporary folder and moves it: across filesystems
    (a cluster's shared output folder) that move is a copy, and a job killed during it leaves a truncated
    ``last.ckpt`` behind.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        """Write ``checkpoint`` to ``path`` in one rename.

        Raises:
            OSError: naming ``path`` and the cause (a full disk, a folder that cannot be written); the file
                already there is left as it was.
        """
        try:
            with atomic_write(path, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as e:
            # torch's zip writer reports a failed write (ENOSPC) as "RuntimeError: ... unexpected pos"; the
            # OSError it swallowed is the exception's context.
            cause = e if isinstance(e, OSError) else e.__context__
            if not isinstance(cause, OSError) or cause.errno is None:
                raise
            raise OSError(
                cause.errno, f"cannot write checkpoint {path}: {os.strerror(cause.errno)}"
            ) from None


class FolderPaths(Callback):
    """Keeps the paths that the checkpoint callbacks store in a checkpoint (their folder, the best and last
    checkpoints, the best ``k``) relative to the run's folder, and puts them back under the folder the run
    resumes in.

    Lightning stores them absolute: a run folder moved or copied elsewhere would resume with the old folder's
    ``best.ckpt`` as its selected model (or fail where it is gone), and Lightning, seeing another folder, would
    forget the best score so far and take the next checkpoint as the best.

    Args:
        root: the run's folder.
    """

    PATH_KEYS = ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path")

    def __init__(self, root: Path):
        # ModelCheckpoint resolves its folder (os.path.realpath), so the paths it stores are under this one.
        self.root = os.path.realpath(root)

    @staticmethod
    def _is_checkpoint_state(state: object) -> bool:
        return isinstance(state, dict) and "dirpath" in state and "best_model_path" in state

    def _map(self, state: dict, change) -> None:
        for key in self.PATH_KEYS:
            if state.get(key):
                state[key] = change(state[key])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {change(k): v for k, v in state["best_k_models"].items()}

    def _relative(self, path: str) -> str:
        path = os.path.realpath(path)
        inside = os.path.commonpath([path, self.root]) == self.root
        return os.path.relpath(path, self.root) if inside else path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for state in checkpoint.get("callbacks", {}).values():
            if self._is_checkpoint_state(state):
                self._map(state, self._relative)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Before the callbacks load their states (Lightning calls every on_load_checkpoint first).
        for state in checkpoint.get("callbacks", {}).values():
            if self._is_checkpoint_state(state):
                self._map(state, lambda path: os.path.join(self.root, path))


def load_method(checkpoint: Path, map_location: str = "cpu") -> BaseMethod:
    """Rebuild a trained method from its checkpoint (network from the stored spec, weights, EMA).

    The data settings it was trained with (``KvasirDataModule.state_dict``: image size, normalisation,
    classes, split) are attached as ``module.data_settings``, and the network normalises with the
    checkpoint's mean and std.

    Raises:
        DataError: when the file is not a ssl_kvasir checkpoint, or records no data settings.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise DataError(f"checkpoint {checkpoint} does not exist")
    try:
        # weights_only: a checkpoint is read as data (tensors, numbers, strings), never as code to run.
        ckpt = torch.load(checkpoint, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read checkpoint {checkpoint}: {unreadable_checkpoint(e)}") from None
    if "network_spec" not in ckpt or "method" not in ckpt:
        raise DataError(f"{checkpoint} is not a ssl_kvasir checkpoint (no network spec)")
    settings = ckpt.get(KvasirDataModule.__qualname__)
    needed = ("classes", "image_size", "mean", "std", "split")
    if not isinstance(settings, dict) or any(k not in settings for k in needed):
        raise DataError(
            f"checkpoint {checkpoint} does not record what it was trained with (classes, image size, "
            "normalisation, split); it was written by an older ssl_kvasir: train it again"
        )
    network = build_network(**dict(ckpt["network_spec"]))
    # The normalisation the weights were trained with, whatever timm's default for the backbone is today.
    network.data_config = {
        **network.data_config,
        "mean": tuple(settings["mean"]),
        "std": tuple(settings["std"]),
    }
    module = method_class(ckpt["method"]).from_config(network, **ckpt["hyper_parameters"])
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    module.data_settings = settings
    return module.eval()


def adopt_checkpoint_settings(cfg: DictConfig, module: BaseMethod, checkpoint: str | Path) -> None:
    """Give ``cfg`` what the checkpoint was trained with: each of ``ssl_kvasir.config.CHECKPOINT_SETTINGS``
    left null takes the checkpoint's value; one that was given must agree with it.

    Args:
        cfg: a command's config (changed in place).
        module: the method loaded by :func:`load_method`.
        checkpoint: its file (named in errors).

    Raises:
        ConfigError: one line naming every setting that disagrees, with both values.
        DataError: when the checkpoint's split record is incomplete.
    """
    settings = module.data_settings
    split = settings["split"]
    missing = [k for k in (*SPLIT_SETTINGS.values(), "label_budget", "identity") if k not in split]
    if missing:
        raise DataError(
            f"checkpoint {checkpoint} does not record its split (no {', '.join(missing)}); it was written by "
            "an older ssl_kvasir: train it again"
        )
    theirs = {key: split[name] for key, name in SPLIT_SETTINGS.items()}
    theirs["data.image_size"] = settings["image_size"]
    budget = LabelBudget.from_record(split["label_budget"])
    d = cfg.data
    conflicts = []
    for key, value in theirs.items():
        given = OmegaConf.select(cfg, key)
        if given is not None and given != value:
            conflicts.append(f"{key}={given} (the checkpoint's is {value})")
    if d.label_fraction is not None or d.labels_per_class is not None:
        given_budget = LabelBudget.from_settings(d.label_fraction, d.labels_per_class)
        if given_budget != budget:
            conflicts.append(f"label budget {given_budget.id} (the checkpoint's is {budget.id})")
    if conflicts:
        raise ConfigError(
            f"checkpoint {checkpoint} was trained otherwise: {'; '.join(conflicts)}; leave these settings out "
            "to use the checkpoint's"
        )
    with open_dict(cfg):
        for key, value in theirs.items():
            OmegaConf.update(cfg, key, value, merge=False)
        d.label_fraction, d.labels_per_class = budget.label_fraction, budget.labels_per_class


def require_same_data(module: BaseMethod, checkpoint: str | Path, exp: Experiment, root: str | Path) -> None:
    """Refuse to apply a checkpoint to data other than its own: other class names (or another order of them),
    or a split whose images are not those it was trained and evaluated on (another archive, split file or fold
    assignment).

    Raises:
        DataError: naming the checkpoint, the data, and what differs.
    """
    ours, theirs = list(exp.catalog.classes.names), list(module.data_settings["classes"])
    if ours != theirs:
        differ = [f"{a} / {b}" for a, b in zip(theirs, ours, strict=False) if a != b][:3]
        detail = (
            f"first differences (checkpoint / data): {', '.join(differ)}"
            if differ
            else "the same names as far as both go"
        )
        raise DataError(
            f"checkpoint {checkpoint} was trained on {len(theirs)} classes that the data at {root} do not have "
            f"({len(ours)} classes; {detail})"
        )
    recorded = module.data_settings["split"]["identity"]
    if exp.split.identity != recorded:
        raise DataError(
            f"checkpoint {checkpoint} was trained and evaluated on other images than the split cut from {root} "
            f"(fold {exp.split.settings['eval_fold']}, budget {exp.split.budget.id}; split hash "
            f"{exp.split.identity[:12]}, the checkpoint's {recorded[:12]}): another archive, split file or fold "
            "assignment"
        )
