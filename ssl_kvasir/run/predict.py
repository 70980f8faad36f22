"""The one prediction path: every command that needs a model's outputs on images comes through here.

``evaluate``, self-training's teacher, ``embed``, ``analyze`` and ``export-pseudo-labels`` all predict with
:class:`Predictor`: the method's own :meth:`~ssl_kvasir.methods.BaseMethod.predict_batch` (so the weights are
the checkpoint's ``eval_weights``), on the device and with the autocast that ``trainer.accelerator`` and
``trainer.precision`` name. Outputs are streamed batch by batch: memory does not grow with the number of
images, and features are not even computed into host memory when nobody asks for them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from ssl_kvasir.console import Progress
from ssl_kvasir.errors import ConfigError
from ssl_kvasir.methods import BaseMethod

log = logging.getLogger("ssl_kvasir")

AUTOCAST = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}
FULL_PRECISION = ("32-true", "32", "64-true", "64")


def resolve_device(accelerator: str) -> torch.device:
    """``trainer.accelerator`` as a device: ``auto`` takes a GPU when there is one."""
    if accelerator in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if accelerator != "auto":
            raise ConfigError(f"trainer.accelerator={accelerator}, but no GPU is available")
        return torch.device("cpu")
    if accelerator == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"trainer.accelerator={accelerator!r} cannot predict; use auto, gpu or cpu")


def resolve_autocast(precision: str) -> torch.dtype | None:
    """``trainer.precision`` as an autocast dtype (None: full precision)."""
    precision = str(precision)
    if precision in AUTOCAST:
        return AUTOCAST[precision]
    if precision in FULL_PRECISION:
        return None
    raise ConfigError(
        f"unknown trainer.precision {precision!r}; valid: {', '.join([*AUTOCAST, *FULL_PRECISION])}"
    )


@dataclass
class Predictor:
    """Class probabilities (and features, on request) of a trained method, batch by batch.

    Args:
        module: the method; predicts with :meth:`~ssl_kvasir.methods.BaseMethod.predict_batch`.
        device: where the network runs.
        autocast: autocast dtype, or None for full precision.
        channels_last: NHWC inputs and weights (convolutional backbones on GPUs and recent CPUs).
    """

    module: BaseMethod
    device: torch.device
    autocast: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def from_config(cls, module: BaseMethod, trainer: DictConfig) -> Predictor:
        """The predictor a ``trainer`` config describes (accelerator, precision, channels_last)."""
        return cls(
            module,
            resolve_device(trainer.accelerator),
            resolve_autocast(trainer.precision),
            bool(trainer.channels_last),
        )

    def __post_init__(self) -> None:
        self.module.eval().to(self.device)
        if self.channels_last:
            self.module.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def batches(
        self, datamodule, rows: np.ndarray, features: bool = False, what: str = "predicting"
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """For each batch of catalog ``rows`` (in order): probabilities (B, C) float32 and, if ``features``,
        features (B, D) float32 (None otherwise). Workers decode; the ``eval`` view is made on the device, as in
        training. A progress bar on a terminal, a closing log line otherwise."""
        with Progress(what, len(rows), closing_line=True) as progress:
            for batch in datamodule.loader(rows):
                x = datamodule.transfer(batch, self.device)["eval"]  # (B, 3, H, W)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    f, logits = self.module.predict_batch(x)  # (B, D), (B, C)
                probs = logits.float().softmax(1).cpu().numpy()
                yield probs, (f.float().cpu().numpy() if features else None)
                progress.advance(len(x))

    def probs(self, datamodule, rows: np.ndarray, what: str = "predicting") -> np.ndarray:
        """(N, C) probabilities of catalog ``rows`` (N x C floats: features are not kept)."""
        out = [p for p, _ in self.batches(datamodule, rows, what=what)]
        return np.concatenate(out) if out else np.empty((0, self.module.num_classes), np.float32)
