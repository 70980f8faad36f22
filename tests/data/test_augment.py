"""Batched views on tensors against a plain per-sample reference, and the properties of their random draws."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ssl_kvasir.data.augment import (
    COLOR_OPS,
    GEOMETRIC_OPS,
    GRAY,
    OPS,
    ViewMaker,
    ViewParams,
    apply_view,
    colour_op,
    draw_params,
    inverse_affine,
    make_views,
    uniforms,
    weak_padding,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- the reference: one sample at a time, float64, written for reading --------------------------------------
def ref_flip_crop(x: np.ndarray, flip: bool, shift: np.ndarray) -> np.ndarray:
    size, pad = x.shape[-1], weak_padding(x.shape[-1])
    if flip:
        x = x[:, :, ::-1]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    top, left = shift
    return padded[:, top : top + size, left : left + size]


def ref_warp(x: np.ndarray, name: str, magnitude: float) -> np.ndarray:
    """Bilinear sampling written pixel by pixel; pixel centres at integers, outside = gray."""
    size = x.shape[-1]
    m = inverse_affine(name, np.array([magnitude]), size)[0]
    c = (size - 1) / 2
    out = np.empty_like(x)

    def at(i: int, j: int) -> np.ndarray:
        return x[:, i, j] if 0 <= i < size and 0 <= j < size else np.full(3, GRAY)

    for i in range(size):
        for j in range(size):
            u, v = j - c, i - c
            sx = m[0, 0] * u + m[0, 1] * v + m[0, 2] + c
            sy = m[1, 0] * u + m[1, 1] * v + m[1, 2] + c
            j0, i0 = int(np.floor(sx)), int(np.floor(sy))
            wx, wy = sx - j0, sy - i0
            out[:, i, j] = (1 - wy) * ((1 - wx) * at(i0, j0) + wx * at(i0, j0 + 1)) + wy * (
                (1 - wx) * at(i0 + 1, j0) + wx * at(i0 + 1, j0 + 1)
            )
    return np.clip(out, 0, 255)


def ref_equalize_channel(channel: np.ndarray) -> np.ndarray:
    """PIL's ImageOps.equalize, as Pillow writes it, on one channel."""
    values = np.clip(np.round(channel), 0, 255).astype(int)
    h = [int((values == i).sum()) for i in range(256)]
    histo = [count for count in h if count]
    if len(histo) <= 1:
        return values.astype(float)
    step = (sum(histo) - histo[-1]) // 255
    if not step:
        return values.astype(float)
    lut, n = [], step // 2
    for i in range(256):
        lut.append(min(n // step, 255))
        n += h[i]
    return np.array(lut, dtype=float)[values]


def ref_op(x: np.ndarray, name: str, m: float) -> np.ndarray:
    luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    if name in GEOMETRIC_OPS:
        return ref_warp(x, name, m)
    if name == "Identity":
        return x
    if name == "Brightness":
        return np.clip(m * x, 0, 255)
    if name == "Color":
        return np.clip(luma + m * (x - luma), 0, 255)
    if name == "Contrast":
        return np.clip(luma.mean() + m * (x - luma.mean()), 0, 255)
    if name == "Sharpness":
        smooth = x.copy()
        kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
        for c in range(3):
            for i in range(1, x.shape[1] - 1):
                for j in range(1, x.shape[2] - 1):
                    smooth[c, i, j] = (kernel * x[c, i - 1 : i + 2, j - 1 : j + 2]).sum()
        return np.clip(smooth + m * (x - smooth), 0, 255)
    if name == "AutoContrast":
        out = x.copy()
        for c in range(3):
            lo, hi = x[c].min(), x[c].max()
            if hi > lo:
                out[c] = (x[c] - lo) * 255 / (hi - lo)
        return out
    if name == "Equalize":
        return np.stack([ref_equalize_channel(x[c]) for c in range(3)])
    if name == "Posterize":
        step = 2 ** (8 - int(m))
        return np.floor(np.round(x) / step) * step
    if name == "Solarize":
        return np.where(x >= m, 255 - x, x)
    raise AssertionError(name)


def ref_view(image: np.ndarray, view: str, p: ViewParams, b: int) -> np.ndarray:
    """The view of sample ``b``: the same parameters, applied one operation at a time."""
    x = image.astype(np.float64)
    if view != "eval":
        x = ref_flip_crop(x, bool(p.flip[b]), p.shift[b])
        for k, m in zip(p.ops[b], p.magnitude[b], strict=True):
            x = ref_op(x, OPS[k], float(m))
        if view == "strong":
            side, row, col = p.cutout[b]
            top, left = row - side // 2, col - side // 2
            for i in range(max(top, 0), min(top + side, x.shape[1])):
                for j in range(max(left, 0), min(left + side, x.shape[2])):
                    x[:, i, j] = GRAY
    return (x / 255 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random pictures (so that resampling and sharpening see structure, not only noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (smooth + torch.rand(n, 3, size, size, generator=g) * 40).clamp(0, 255).to(torch.uint8)


def assert_matches_reference(batched: torch.Tensor, reference: np.ndarray, quantized: bool) -> None:
    """Equal up to float32 rounding. With ``quantized``, the float32 and float64 paths may round a value that
    lies within 1e-4 of a rounding boundary (Posterize, Equalize after another operation) to different
    sides: at most 1 element in 1000 may differ, by at most one posterize step."""
    diff = np.abs(batched.double().numpy() - reference)
    bad = diff > 1e-3
    if quantized:
        assert bad.mean() < 1e-3 and diff.max() < 130 / 255 / min(STD), (bad.mean(), diff.max())
    else:
        assert not bad.any(), diff.max()


# ---- oracles --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_every_operation_matches_the_reference(op):
    size, n = 16, 12
    images = _images(n, size, seed=OPS.index(op))
    p = draw_params(np.arange(n) + 1000 * OPS.index(op), "strong", size)
    # Force the operation into the first slot (the magnitudes of the draw, redrawn in this op's unit) and
    # Identity into the second.
    forced = draw_params(np.arange(n) + 77, "strong", size)
    mags = p.magnitude.copy()
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        mags[:, 0] = np.linspace(0.05, 1.95, n)
    elif op == "Rotate":
        mags[:, 0] = np.linspace(-30, 30, n)
    elif op in ("ShearX", "ShearY"):
        mags[:, 0] = np.linspace(-0.3, 0.3, n)
    elif op in ("TranslateX", "TranslateY"):
        mags[:, 0] = np.linspace(-0.3 * size, 0.3 * size, n)
    elif op == "Posterize":
        mags[:, 0] = np.arange(n) % 5 + 4
    elif op == "Solarize":
        mags[:, 0] = np.linspace(0, 256, n)
    ops = np.stack([np.full(n, OPS.index(op)), np.zeros(n, dtype=np.int64)], axis=1)
    params = forced._replace(ops=ops, magnitude=mags)
    batched = apply_view(images, "strong", params, MEAN, STD)
    for b in range(n):
        reference = ref_view(images[b].numpy(), "strong", params, b)
        assert_matches_reference(batched[b], reference, quantized=False)


@pytest.mark.parametrize("view", ["weak", "strong", "eval"])
@pytest.mark.parametrize("strong_color", [True, False])
def test_whole_views_match_the_reference(view, strong_color):
    size, n = 24, 40
    images = _images(n, size, seed=5)
    seeds = np.arange(n) * 1_000_003 + 11
    maker = ViewMaker(MEAN, STD, size, strong_color)
    params = maker.params(seeds, view)
    batched = make_views(
        {"image": images, "aug_seed": torch.from_numpy(seeds)}, (view,), MEAN, STD, size, strong_color
    )
    for b in range(n):
        assert_matches_reference(
            batched[view][b], ref_view(images[b].numpy(), view, params, b), quantized=True
        )


def test_integer_operations_equal_pil():
    images = _images(6, 20, seed=9)
    for b in range(6):
        x = images[b : b + 1].float()
        pil = Image.fromarray(images[b].permute(1, 2, 0).numpy())
        as_tensor = lambda im: torch.from_numpy(np.asarray(im).transpose(2, 0, 1).astype(np.float32))  # noqa: E731
        assert torch.equal(colour_op("Equalize", x, torch.ones(1))[0], as_tensor(ImageOps.equalize(pil)))
        assert torch.equal(
            colour_op("Posterize", x, torch.tensor([5.0]))[0], as_tensor(ImageOps.posterize(pil, 5))
        )
        assert torch.equal(
            colour_op("Solarize", x, torch.tensor([100.0]))[0], as_tensor(ImageOps.solarize(pil, 100))
        )
        # PIL truncates its lookup table to integers (after float arithmetic of its own); ours stays in float.
        auto = colour_op("AutoContrast", x, torch.ones(1))[0]
        diff = auto - as_tensor(ImageOps.autocontrast(pil))
        assert diff.abs().max() <= 1 + 1e-4 and 0.3 < diff.mean() < 0.7


# ---- the random draws -----------------------------------------------------------------------------------------
def test_uniforms_are_a_function_of_each_seed_alone():
    seeds = np.array([3, 1, 4, 1, 5, 9, 2**62 + 7])
    u = uniforms(seeds, salt=1, n=6)
    assert u.shape == (7, 6) and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(u[1], u[3])  # the same seed, wherever it is
    assert np.array_equal(uniforms(seeds[::-1], 1, 6), u[::-1])
    assert np.array_equal(uniforms(seeds[4:5], 1, 6), u[4:5])
    assert not np.array_equal(uniforms(seeds, 2, 6), u)  # another view, another stream
    many = uniforms(np.arange(20_000), 1, 4)
    assert abs(many.mean() - 0.5) < 0.01 and abs((many < 0.25).mean() - 0.25) < 0.01
    assert abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03


def test_a_samples_views_do_not_depend_on_its_batch():
    size = 24
    images = _images(30, size, seed=2)
    seeds = torch.arange(30) * 31 + 5
    full = make_views({"image": images, "aug_seed": seeds}, ("weak", "strong"), MEAN, STD, size)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))[:11]
    part = make_views({"image": images[order], "aug_seed": seeds[order]}, ("weak", "strong"), MEAN, STD, size)
    for view in ("weak", "strong"):
        assert torch.allclose(part[view], full[view][order], atol=1e-5), view
    # Seeds reproduce; another seed gives another view.
    again = make_views({"image": images, "aug_seed": seeds}, ("strong",), MEAN, STD, size)
    assert torch.equal(again["strong"], full["strong"])
    other = make_views({"image": images, "aug_seed": seeds + 1}, ("strong",), MEAN, STD, size)
    assert all(not torch.equal(other["strong"][b], full["strong"][b]) for b in range(30))


def test_operations_and_magnitudes_span_the_papers_ranges_in_both_directions():
    size, n = 32, 20_000
    p = draw_params(np.arange(n), "strong", size)
    names = np.asarray(OPS)[p.ops]  # (n, 2)
    counts = {op: int((names == op).sum()) for op in OPS}
    assert min(counts.values()) > 0.8 * 2 * n / len(OPS)  # every operation, about equally often
    assert (p.ops[:, 0] != p.ops[:, 1]).mean() > 0.9  # the two slots are drawn independently
    mags = p.magnitude

    def of(*ops):
        return mags[np.isin(names, ops)]

    rotate = of("Rotate")
    assert rotate.min() < -27 and rotate.max() > 27 and np.abs(rotate).max() <= 30
    shear = of("ShearX", "ShearY")
    assert shear.min() < -0.27 and shear.max() > 0.27 and np.abs(shear).max() <= 0.3
    translate = of("TranslateX", "TranslateY") / size
    assert translate.min() < -0.27 and translate.max() > 0.27 and np.abs(translate).max() <= 0.3
    factor = of("Brightness", "Color", "Contrast", "Sharpness")
    assert factor.min() < 0.1 and factor.max() > 1.9 and ((factor > 0.95) & (factor < 1.05)).sum() == 0
    assert set(of("Posterize").astype(int)) == {4, 5, 6, 7, 8}
    solarize = of("Solarize")
    assert solarize.min() < 15 and solarize.max() > 240
    side = p.cutout[:, 0]
    assert side.min() == 1 and side.max() == size // 2
    assert 0.45 < p.flip.mean() < 0.55 and set(p.shift.ravel()) == set(range(2 * weak_padding(size) + 1))


def test_without_colour_the_strong_view_never_changes_hue():
    size, n = 32, 200
    p = draw_params(np.arange(n), "strong", size, strong_color=False)
    assert not set(np.asarray(OPS)[p.ops].ravel()) & set(COLOR_OPS)
    assert set(np.asarray(OPS)[p.ops].ravel()) == set(OPS) - set(COLOR_OPS)
    # A dye-blue picture of one hue. Geometric operations uncover gray; sharpening the gray next to the blue
    # overshoots into a faint complement, so only clearly coloured pixels are compared.
    dye = (50, 60, 110)
    images = torch.tensor(dye, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, size, size).contiguous()
    out = make_views(
        {"image": images, "aug_seed": torch.arange(n)}, ("strong",), (0, 0, 0), (1, 1, 1), size, False
    )
    rgb = out["strong"].clamp(0, 1).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in rgb[::7]])
    hue = colorsys.rgb_to_hsv(*(np.array(dye) / 255))[0]
    coloured = hsv[:, 1] > 0.3
    assert coloured.mean() > 0.5
    assert np.abs(hsv[coloured, 0] - hue).max() < 0.01
    # With colour operations the same picture changes hue somewhere.
    out = make_views(
        {"image": images, "aug_seed": torch.arange(n)}, ("strong",), (0, 0, 0), (1, 1, 1), size, True
    )
    rgb = out["strong"].clamp(0, 1).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in rgb[::7]])
    assert np.abs(hsv[hsv[:, 1] > 0.3, 0] - hue).max() > 0.05


def test_the_timm_policy_leaves_only_cutout_to_the_device():
    size = 16
    images = _images(4, size, seed=3)
    strong_image = _images(4, size, seed=4)
    seeds = torch.arange(4)
    out = ViewMaker(MEAN, STD, size, strong_policy="timm").stream(
        {"image": images, "strong_image": strong_image, "aug_seed": seeds, "views": ("weak", "strong")}
    )
    p = draw_params(seeds, "strong", size)
    for b in range(4):
        plain = p._replace(
            ops=p.ops[:, :0],
            magnitude=p.magnitude[:, :0],
            flip=np.zeros(4, bool),
            shift=np.full((4, 2), weak_padding(size)),
        )
        assert_matches_reference(
            out["strong"][b], ref_view(strong_image[b].numpy(), "strong", plain, b), quantized=False
        )
    with pytest.raises(ValueError, match="strong policy"):
        ViewMaker(MEAN, STD, size, strong_policy="autoaugment")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_views_on_the_gpu_equal_views_on_the_cpu():
    size = 64
    images, seeds = _images(48, size, seed=8), torch.arange(48) + 100
    cpu = make_views({"image": images, "aug_seed": seeds}, ("weak", "strong"), MEAN, STD, size)
    gpu = make_views({"image": images.cuda(), "aug_seed": seeds.cuda()}, ("weak", "strong"), MEAN, STD, size)
    for view in ("weak", "strong"):
        diff = (gpu[view].cpu() - cpu[view]).abs()
        assert (diff > 1e-3).float().mean() < 1e-3, view
