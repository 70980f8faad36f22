"""Named views of an image: ``weak``, ``strong`` and ``eval``.

FixMatch (Sohn et al. 2020) pairs a *weak* view ("a standard flip-and-shift augmentation strategy") that
makes pseudo-labels with a *strong* view (RandAugment followed by Cutout) that learns from them. Two
HyperKvasir classes (dyed-lifted-polyps, dyed-resection-margins) are defined by blue dye, so the strong view
can leave out every operation that changes hue or saturation (``strong_color=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torchvision import transforms as T

# RandAugment operations that change hue or saturation (AutoContrast and Equalize act per channel).
COLOR_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color")
VIEWS = ("weak", "strong", "eval")


def _rand_augment(
    image_size: int, mean: tuple[float, ...], color: bool, magnitude: int = 10, num_ops: int = 2
):
    from timm.data.auto_augment import _RAND_TRANSFORMS, rand_augment_transform

    ops = [op for op in _RAND_TRANSFORMS if color or op not in COLOR_OPS]
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
    # "mstd0.5" samples the magnitude around `magnitude`, as in timm's RandAugment recipes. The "-inc1"
    # variants are avoided: they crash intermittently under Pillow 13 ("bits must be between 1 and 8").
    return rand_augment_transform(f"rand-m{magnitude}-n{num_ops}-mstd0.5", hparams, transforms=ops)


class View(T.Compose):
    """A named view: a deterministic resize, then the view's own transforms (``rest``).

    Calling it runs the whole pipeline, like any ``Compose``; :func:`apply_views` uses the split to resize an
    image once for all its views.
    """

    def __init__(self, resize: T.Resize, rest: list[Callable]):
        super().__init__([resize, *rest])
        self.resize, self.rest = resize, T.Compose(rest)


def apply_views(image, views: Mapping[str, Callable]) -> dict[str, torch.Tensor]:
    """Every view of one image, resizing it once for all the views that begin with the same resize.

    The result equals ``{name: view(image) for name, view in views.items()}``: the resize draws no random
    numbers and every transform returns a new image instead of changing its input, so the views make the same
    random draws in the same order from the same resized picture. Why: the unlabeled stream of FixMatch needs
    a weak and a strong view of each image, and the resize to the network's input is one of the costliest
    steps of a view (about as costly as decoding an image from the prepared cache).

    Args:
        image: the decoded PIL image.
        views: view name -> transform (a :class:`View` shares its resize; any other callable runs alone).
    """
    resized: dict[tuple, object] = {}
    out = {}
    for name, view in views.items():
        if not isinstance(view, View):
            out[name] = view(image)
            continue
        r = view.resize
        key = (tuple(r.size), r.interpolation, r.max_size, r.antialias)
        if key not in resized:
            resized[key] = r(image)
        out[name] = view.rest(resized[key])
    return out


def build_view(
    name: str,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    strong_color: bool = True,
) -> View:
    """A PIL image -> normalised ``(3, image_size, image_size)`` tensor transform.

    Args:
        name: ``weak`` (flip + translation by up to 12.5 %), ``strong`` (weak + RandAugment + Cutout) or
            ``eval`` (resize only).
        image_size: output side in pixels (images are resized to a square, as in the paper).
        mean, std: normalisation, from the backbone's timm data config.
        strong_color: whether the strong view may use colour-changing operations.
    """
    if name not in VIEWS:
        raise ValueError(f"unknown view {name!r}; valid views: {', '.join(VIEWS)}")
    resize = T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
    if name == "eval":
        return View(resize, to_tensor)
    weak = [
        T.RandomHorizontalFlip(),
        T.RandomCrop(image_size, padding=int(0.125 * image_size), padding_mode="reflect"),
    ]
    if name == "weak":
        return View(resize, [*weak, *to_tensor])
    # Cutout: one square of up to half the image side, filled with zero (the mean after normalisation).
    cutout = T.RandomErasing(p=1.0, scale=(0.02, 0.25), ratio=(1.0, 1.0), value=0.0)
    return View(resize, [*weak, _rand_augment(image_size, mean, strong_color), *to_tensor, cutout])


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo the normalisation of a ``(..., 3, H, W)`` batch, for looking at views."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * s + m
