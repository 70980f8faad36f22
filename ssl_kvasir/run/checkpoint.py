"""Checkpoints: written atomically, read back as data into a rebuilt method."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ssl_kvasir.data.datamodule import KvasirDataModule
from ssl_kvasir.errors import DataError
from ssl_kvasir.io import atomic_write
from ssl_kvasir.methods import BaseMethod
from ssl_kvasir.models import build_network
from ssl_kvasir.run.experiment import method_class


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target and renamed into place.

    Lightning's own writer stages the file in the system's temporary folder and moves it: across filesystems
    (a cluster's shared output folder) that move is a copy, and a job killed during it leaves a truncated
    ``last.ckpt`` behind.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)


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
        raise DataError(f"cannot read checkpoint {checkpoint}: {type(e).__name__}: {e}") from None
    if "network_spec" not in ckpt or "method" not in ckpt:
        raise DataError(f"{checkpoint} is not a ssl_kvasir checkpoint (no network spec)")
    network = build_network(**dict(ckpt["network_spec"]))
    module = method_class(ckpt["method"]).from_config(network, **ckpt["hyper_parameters"])
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    module.data_settings = ckpt.get(KvasirDataModule.__qualname__, {})
    return module.eval()
