"""The PIL views of timm's policy: shapes, the colour-free option, and seeded reproducibility."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ssl_kvasir.data.datamodule import seeded
from ssl_kvasir.data.transforms import TIMM_COLOR_OPS, timm_rand_augment, timm_strong_image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_timm_strong_image_is_uint8_and_a_function_of_the_seed():
    view = timm_strong_image(32, MEAN)
    image = _image(1, (32, 32))
    with seeded(7):
        a = view(image)
    torch.manual_seed(123)  # whatever the generators held before
    with seeded(7):
        b = view(image)
    with seeded(8):
        c = view(image)
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_timm_policy_without_colour_leaves_out_the_colour_ops():
    names = lambda ra: {op.name for op in ra.ops}  # noqa: E731
    assert set(TIMM_COLOR_OPS) & names(timm_rand_augment(32, MEAN, color=True))
    without = names(timm_rand_augment(32, MEAN, color=False))
    assert not set(TIMM_COLOR_OPS) & without and {"Rotate", "ShearX", "Brightness"} <= without
