"""apply_views: one shared resize, the same tensors as running every view on its own."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ssl_kvasir.data.transforms import apply_views, build_view

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _seed(s: int) -> None:
    # torchvision draws from torch's generator, timm's RandAugment from numpy's (ops) and Python's (magnitudes).
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


@pytest.mark.parametrize("names", [("weak", "strong"), ("eval",), ("strong", "weak", "eval")])
@pytest.mark.parametrize("strong_color", [True, False])
def test_apply_views_equals_each_view_alone(names, strong_color):
    views = {n: build_view(n, 32, MEAN, STD, strong_color) for n in names}
    for seed, size in [(0, (48, 40)), (1, (40, 64)), (2, (33, 33))]:
        image = _image(seed, size)
        _seed(seed)
        naive = {n: v(image) for n, v in views.items()}
        _seed(seed)
        shared = apply_views(image, views)
        assert list(shared) == list(naive)
        for n in names:
            assert shared[n].shape == (3, 32, 32)
            assert torch.equal(shared[n], naive[n]), n


def test_apply_views_resizes_once_per_size(monkeypatch):
    calls = []
    forward = T.Resize.forward

    def counting(self, img):
        calls.append(tuple(self.size))
        return forward(self, img)

    monkeypatch.setattr(T.Resize, "forward", counting)
    image = _image(0, (50, 40))
    views = {"weak": build_view("weak", 24, MEAN, STD), "strong": build_view("strong", 24, MEAN, STD)}
    views["eval"] = build_view("eval", 16, MEAN, STD)
    out = apply_views(image, views)
    assert sorted(calls) == [(16, 16), (24, 24)]
    assert out["eval"].shape == (3, 16, 16) and out["strong"].shape == (3, 24, 24)


def test_apply_views_runs_plain_callables_alone():
    image = _image(3, (20, 20))
    out = apply_views(image, {"raw": T.ToTensor(), "eval": build_view("eval", 8, MEAN, STD)})
    assert out["raw"].shape == (3, 20, 20) and out["eval"].shape == (3, 8, 8)
