"""Checkpoints: written atomically, read back as data into a rebuilt method."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ssl_kvasir.data.datamodule import KvasirDataModule
from ssl_kvasir.errors import DataError
from ssl_kvasir.files import atomic_write
from ssl_kvasir.methods import BaseMethod
from ssl_kvasir.models import build_network
from ssl_kvasir.run.experiment import Experiment, method_class
from ssl_kvasir.run.guard import unreadable_checkpoint


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
        # weights_only: a checkpoint is read as data (tensors, numbers, strings), never as code to run.
        ckpt = torch.load(checkpoint, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read checkpoint {checkpoint}: {unreadable_checkpoint(e)}") from None
    if "network_spec" not in ckpt or "method" not in ckpt:
        raise DataError(f"{checkpoint} is not a ssl_kvasir checkpoint (no network spec)")
    network = build_network(**dict(ckpt["network_spec"]))
    module = method_class(ckpt["method"]).from_config(network, **ckpt["hyper_parameters"])
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    module.data_settings = ckpt.get(KvasirDataModule.__qualname__, {})
    return module.eval()


def require_same_classes(
    module: BaseMethod, checkpoint: str | Path, exp: Experiment, root: str | Path
) -> None:
    """Refuse to apply a checkpoint to data with another number of classes.

    Raises:
        DataError: naming the checkpoint, the data and both class counts.
    """
    n_classes = len(exp.catalog.classes)
    if module.num_classes != n_classes:
        raise DataError(
            f"checkpoint {checkpoint} has {module.num_classes} classes, the data at {root} has {n_classes}"
        )
