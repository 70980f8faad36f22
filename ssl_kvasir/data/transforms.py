"""Per-image PIL views: timm's RandAugment policy, run in the DataLoader workers.

The training views are made on the training device from decoded batches (:mod:`ssl_kvasir.data.augment`),
with FixMatch's own RandAugment by default. timm's policy (``rand-m10-n2-mstd0.5``: photometric operations
that only enhance, a magnitude drawn around 10, each operation applied with probability 0.5) works on PIL
images, so with ``data.strong_policy=timm`` the workers run it, on the image already resized to the network's
input: :func:`timm_strong_image` flips, crops and RandAugments, and Cutout and normalisation follow on the
device as for the FixMatch policy.
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

from ssl_kvasir.data.augment import weak_padding

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
