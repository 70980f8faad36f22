"""Per-image PIL views: timm's RandAugment policy, run in the DataLoader workers.

The training views are made on the training device from decoded batches (:mod:`ssl_kvasir.data.augment`),
with FixMatch's own RandAugment by default. timm's policy (``rand-m10-n2-mstd0.5``: photometric operations
that only enhance, a magnitude drawn around 10, each operation applied with probability 0.5) works on PIL
images, so with ``data.strong_policy=timm`` the workers run it, on the image already resized to the network's
input: :func:`timm_strong_image` flips, crops and RandAugments, and Cutout and normalisation follow on the
device as for the FixMatch policy. :func:`build_view` is the whole view as a CPU pipeline, the path the
toolkit used before views moved to the device (``bench/bench_pipeline.py`` measures against it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import transforms as T

from ssl_kvasir.data.augment import VIEWS, weak_padding

# timm's RandAugment operations that change hue or saturation (AutoContrast and Equalize act per channel).
TIMM_COLOR_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color")


def timm_rand_augment(
    image_size: int, mean: tuple[float, ...], color: bool, magnitude: int = 10, num_ops: int = 2
):
    """timm's ``rand-m{magnitude}-n{num_ops}-mstd0.5`` on PIL images, without colour operations unless
    ``color``; it draws from Python's and numpy's global generators."""
    from timm.data.auto_augment import _RAND_TRANSFORMS, rand_augment_transform

    ops = [op for op in _RAND_TRANSFORMS if color or op not in TIMM_COLOR_OPS]
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
    # "mstd0.5" samples the magnitude around `magnitude`, as in timm's RandAugment recipes. The "-inc1"
    # variants are avoided: they crash intermittently under Pillow 13 ("bits must be between 1 and 8").
    return rand_augment_transform(f"rand-m{magnitude}-n{num_ops}-mstd0.5", hparams, transforms=ops)


def _pil_weak(image_size: int) -> list[Callable]:
    return [
        T.RandomHorizontalFlip(),
        T.RandomCrop(image_size, padding=weak_padding(image_size), padding_mode="reflect"),
    ]


def timm_strong_image(image_size: int, mean: tuple[float, ...], strong_color: bool = True) -> T.Compose:
    """An ``image_size`` square PIL image -> ``(3, S, S)`` uint8: flip, reflect-padded crop, timm's
    RandAugment (the strong view of ``data.strong_policy=timm`` before Cutout and normalisation)."""
    return T.Compose(
        [*_pil_weak(image_size), timm_rand_augment(image_size, mean, strong_color), T.PILToTensor()]
    )


def build_view(
    name: str,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    strong_color: bool = True,
) -> T.Compose:
    """A PIL image -> normalised ``(3, image_size, image_size)`` tensor, entirely on the CPU.

    Args:
        name: ``weak`` (flip + translation by up to 12.5 %), ``strong`` (weak + timm's RandAugment + Cutout)
            or ``eval`` (resize only).
        image_size: output side in pixels (images are resized to a square, as in the paper).
        mean, std: normalisation, from the backbone's timm data config.
        strong_color: whether the strong view may use colour-changing operations.
    """
    if name not in VIEWS:
        raise ValueError(f"unknown view {name!r}; valid views: {', '.join(VIEWS)}")
    resize = T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
    if name == "eval":
        return T.Compose([resize, *to_tensor])
    if name == "weak":
        return T.Compose([resize, *_pil_weak(image_size), *to_tensor])
    # Cutout: one square of up to half the image side, filled with zero (the mean after normalisation).
    cutout = T.RandomErasing(p=1.0, scale=(0.02, 0.25), ratio=(1.0, 1.0), value=0.0)
    ra = timm_rand_augment(image_size, mean, strong_color)
    return T.Compose([resize, *_pil_weak(image_size), ra, *to_tensor, cutout])


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo the normalisation of a ``(..., 3, H, W)`` batch, for looking at views."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * s + m
