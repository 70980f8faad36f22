"""Views made from batches of decoded images, as tensor operations on whatever device holds the batch.

FixMatch (Sohn et al. 2020) pairs a *weak* view, "a standard flip-and-shift augmentation strategy" (flip with
probability 0.5, translation by up to 12.5 % of the image), with a *strong* view: RandAugment followed by
Cutout. Its appendix defines the RandAugment it uses: "in each training step, we randomly select N = 2
transformations from the list ... and apply them to an image, with a magnitude sampled at random" from each
operation's range (Table 12), and "Cutout ... sets a random square patch of side-length (v x image width)
pixels to gray", v up to 0.5.

Workers only decode; this module turns a ``(B, 3, S, S)`` uint8 batch into normalised float views where the
network runs. Every random number of a sample's view is drawn from a counter-based generator (SplitMix64)
seeded by the sample's ``aug_seed`` and the view's name, so a sample gets the same view whatever batch it is
in, on whatever device, and after a resume. The draws are made on the CPU, as a few numbers per sample
(:func:`draw_params`), then applied in batch (:func:`apply_view`), with the samples grouped by operation.
``tests/test_augment.py`` holds a reference that applies the same parameters one sample at a time, as
plainly as it can, and checks the two against each other.

Images are float32 tensors in [0, 255] between operations, clamped after each one (PIL's operations work on
uint8; rounding after every operation would add nothing but noise here). Operations that need integer pixel
values (Equalize, Posterize) round first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ssl_kvasir.names import STRONG_POLICIES

VIEWS = ("weak", "strong", "eval")

# FixMatch's RandAugment operations (Sohn et al. 2020, Table 12), in a fixed order: an operation is its index.
OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Color",
    "Contrast",
    "Equalize",
    "Posterize",
    "Rotate",
    "Sharpness",
    "ShearX",
    "ShearY",
    "Solarize",
    "TranslateX",
    "TranslateY",
)
# Operations that act on each channel on its own or on saturation, and so can change a pixel's hue (left out
# by ``strong_color=False``: two HyperKvasir classes are defined by blue dye).
COLOR_OPS = ("AutoContrast", "Color", "Equalize", "Posterize", "Solarize")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
# Enhancement factors: Table 12 gives [0.05, 0.95] (0 = black, grey or blurred image, 1 = the image). We read
# it as the distance from the identity and draw both directions, 1 - d or 1 + d with d in [0.05, 0.95], as the
# authors' code does (``0.1 + 1.9 * level``): the table's range alone would only ever darken and blur.
ENHANCE_OPS = ("Brightness", "Color", "Contrast", "Sharpness")
MAX_ROTATE = 30.0  # degrees, both directions
MAX_SHEAR = 0.3  # both directions
MAX_TRANSLATE = 0.3  # of the image side, both directions
WEAK_TRANSLATE = 0.125  # FixMatch's weak view: "randomly translating by up to 12.5%"
MAX_CUTOUT = 0.5  # of the image side
GRAY = 128.0  # fill of Cutout ("to gray") and of the pixels that geometric operations uncover
NUM_OPS = 2  # RandAugment's N

# Uniform draws per view and where each one goes: the weak part (flip, x shift, y shift), then per RandAugment
# operation (which, magnitude, direction), then Cutout (side, centre row, centre column).
_WEAK_DRAWS = 3
_OP_DRAWS = 3
_CUTOUT_DRAWS = 3
_SALT = {"weak": 0x5745414B, "strong": 0x5354524F}  # a view's own stream of draws

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijection of uint64 that scatters nearby inputs."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seeds: np.ndarray, salt: int, n: int) -> np.ndarray:
    """``n`` uniform numbers in [0, 1) per seed: ``(B, n)`` float64, row ``b`` a function of ``seeds[b]`` alone.

    SplitMix64: the ``k``-th number of a stream is the mixed ``k``-th multiple of the golden-ratio constant
    past the stream's start, so every row is computed at once, whatever the batch size.
    """
    seeds = np.asarray(seeds).astype(np.uint64)  # (B,)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        start = _mix64(seeds ^ _mix64(np.full_like(seeds, salt)))  # (B,)
        counters = start[:, None] + _GOLDEN * np.arange(1, n + 1, dtype=np.uint64)  # (B, n)
        bits = _mix64(counters) >> np.uint64(11)  # (B, n) 53 random bits
    return bits.astype(np.float64) * 2.0**-53


class ViewParams(NamedTuple):
    """The random parameters of one view for a batch, as numpy arrays (CPU-side: Lightning leaves numpy
    arrays where they are when it moves a batch, so grouping samples by operation needs no device sync).

    Attributes:
        flip: ``(B,)`` bool, mirror left-right.
        shift: ``(B, 2)`` int64, the crop's (row, column) offset in the reflect-padded image, in [0, 2 pad].
        ops: ``(B, N)`` int64 indices into :data:`OPS` (N = 0 for the weak view).
        magnitude: ``(B, N)`` float64, each operation's signed magnitude in its own unit (factor, degrees,
            shear rate, pixels, bits, threshold).
        cutout: ``(B, 3)`` int64: the square's side, centre row and centre column (side 0: no Cutout).
    """

    flip: np.ndarray
    shift: np.ndarray
    ops: np.ndarray
    magnitude: np.ndarray
    cutout: np.ndarray


def allowed_ops(strong_color: bool) -> tuple[int, ...]:
    """Indices into :data:`OPS` that the strong view draws from."""
    return tuple(k for k, name in enumerate(OPS) if strong_color or name not in COLOR_OPS)


def weak_padding(image_size: int) -> int:
    """The reflect padding (and the largest shift) of the weak view's crop, in pixels."""
    return int(WEAK_TRANSLATE * image_size)


def _magnitudes(op_names: np.ndarray, level: np.ndarray, negative: np.ndarray, image_size: int) -> np.ndarray:
    """Each operation's magnitude in its own unit from a uniform ``level`` in [0, 1) and a direction."""
    sign = np.where(negative, -1.0, 1.0)
    out = np.zeros_like(level)
    enhance = np.isin(op_names, ENHANCE_OPS)
    out[enhance] = 1.0 + sign[enhance] * (
        0.05 + 0.9 * level[enhance]
    )  # factor in [0.05, 0.95] or [1.05, 1.95]
    rotate = op_names == "Rotate"
    out[rotate] = sign[rotate] * MAX_ROTATE * level[rotate]  # degrees
    shear = np.isin(op_names, ("ShearX", "ShearY"))
    out[shear] = sign[shear] * MAX_SHEAR * level[shear]
    translate = np.isin(op_names, ("TranslateX", "TranslateY"))
    out[translate] = sign[translate] * MAX_TRANSLATE * image_size * level[translate]  # pixels
    posterize = op_names == "Posterize"
    out[posterize] = 4 + np.floor(5 * level[posterize])  # bits kept, 4..8
    solarize = op_names == "Solarize"
    out[solarize] = 256.0 * level[solarize]  # pixels at or above the threshold are inverted
    return out


def draw_params(
    seeds: np.ndarray | torch.Tensor, view: str, image_size: int, strong_color: bool = True
) -> ViewParams:
    """The random parameters of ``view`` for samples with the given augmentation seeds (on the CPU).

    Args:
        seeds: ``(B,)`` the samples' ``aug_seed``.
        view: ``weak`` or ``strong`` (``eval`` draws nothing).
        image_size: the side S of the square images.
        strong_color: whether the strong view may use :data:`COLOR_OPS`.
    """
    if view not in _SALT:
        raise ValueError(f"view {view!r} has no random parameters; random views: {', '.join(_SALT)}")
    seeds = seeds.cpu().numpy() if isinstance(seeds, torch.Tensor) else np.asarray(seeds)
    n_ops = NUM_OPS if view == "strong" else 0
    u = uniforms(seeds, _SALT[view], _WEAK_DRAWS + _OP_DRAWS * n_ops + _CUTOUT_DRAWS)  # (B, draws)
    B, pad = len(seeds), weak_padding(image_size)
    flip = u[:, 0] < 0.5  # (B,)
    shift = np.floor(u[:, 1:3] * (2 * pad + 1)).astype(np.int64)  # (B, 2)
    allowed = np.asarray(allowed_ops(strong_color))
    op_u = u[:, _WEAK_DRAWS : _WEAK_DRAWS + _OP_DRAWS * n_ops].reshape(B, n_ops, _OP_DRAWS)  # (B, N, 3)
    ops = allowed[np.floor(op_u[..., 0] * len(allowed)).astype(np.int64)]  # (B, N)
    magnitude = _magnitudes(np.asarray(OPS)[ops], op_u[..., 1], op_u[..., 2] < 0.5, image_size)  # (B, N)
    if view == "strong":
        c = u[:, -_CUTOUT_DRAWS:]  # (B, 3)
        side = 1 + np.floor(c[:, 0] * int(MAX_CUTOUT * image_size)).astype(np.int64)  # (B,) 1 .. S/2
        centre = np.floor(c[:, 1:] * image_size).astype(np.int64)  # (B, 2)
        cutout = np.concatenate([side[:, None], centre], axis=1)  # (B, 3)
    else:
        cutout = np.zeros((B, 3), dtype=np.int64)
    return ViewParams(flip, shift, ops.astype(np.int64), magnitude, cutout)


# ---- the operations, each on a (b, 3, S, S) float batch with per-sample magnitudes ------------------------------
def _luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, PIL's conversion to grey: ``(b, 1, S, S)``."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor (x - degenerate)`` (factor 1: the image), clamped."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 255)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, over 13) inside; border pixels unchanged."""
    kernel = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel / 13.0, groups=3)  # (b, 3, S-2, S-2)
    return out


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize, per image and channel, on the rounded pixel values."""
    b, c = x.shape[:2]
    q = x.round().clamp(0, 255).long().view(b * c, -1)  # (b 3, S S)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, q, torch.ones_like(q))  # (b 3, 256)
    last = hist.gather(1, q.amax(1, keepdim=True))  # (b 3, 1) count of the brightest value
    step = (q.shape[1] - last) // 255  # (b 3, 1)
    before = hist.cumsum(1) - hist  # (b 3, 256) pixels below each value
    lut = (step // 2 + before) // step.clamp(min=1)  # (b 3, 256)
    identity = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where(step > 0, lut, identity).clamp(max=255)
    return lut.gather(1, q).view_as(x).to(x.dtype)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast without cut-off: each channel stretched from its min..max to 0..255."""
    lo = x.amin(dim=(2, 3), keepdim=True)  # (b, 3, 1, 1)
    hi = x.amax(dim=(2, 3), keepdim=True)
    stretched = (x - lo) * (255.0 / (hi - lo).clamp(min=1e-6))
    return torch.where(hi > lo, stretched, x).clamp(0, 255)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` high bits of every rounded pixel value."""
    step = (2.0 ** (8 - bits)).view(-1, 1, 1, 1).to(x.dtype)
    return torch.floor(x.round() / step) * step


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the pixel values at or above ``threshold``."""
    return torch.where(x >= threshold.view(-1, 1, 1, 1).to(x.dtype), 255.0 - x, x)


def colour_op(name: str, x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """A non-geometric operation of :data:`OPS` on ``(b, 3, S, S)`` with per-sample magnitudes ``(b,)``."""
    if name == "Identity":
        return x
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Posterize":
        return _posterize(x, magnitude)
    if name == "Solarize":
        return _solarize(x, magnitude)
    if name == "Brightness":
        return _blend(torch.zeros_like(x), x, magnitude)
    if name == "Color":
        return _blend(_luma(x).expand_as(x), x, magnitude)
    if name == "Contrast":
        return _blend(_luma(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), x, magnitude)
    if name == "Sharpness":
        return _blend(_smooth(x), x, magnitude)
    raise ValueError(f"{name!r} is not a non-geometric operation of {OPS}")


def inverse_affine(name: str, magnitude: np.ndarray, image_size: int) -> np.ndarray:
    """``(b, 2, 3)``: for each output pixel (u, v) measured from the image centre in pixels (v down), the
    source point ``A (u, v) + t`` that a geometric operation reads.

    Positive rotations turn the content counter-clockwise as seen; positive shears read from the right (x) or
    below (y); positive translations move the content right (x) or down (y).
    """
    b = len(magnitude)
    m = np.zeros((b, 2, 3))
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    if name == "Rotate":
        r = np.deg2rad(magnitude)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = np.cos(r), -np.sin(r), np.sin(r), np.cos(r)
    elif name == "ShearX":
        m[:, 0, 1] = magnitude
    elif name == "ShearY":
        m[:, 1, 0] = magnitude
    elif name == "TranslateX":
        m[:, 0, 2] = -magnitude
    elif name == "TranslateY":
        m[:, 1, 2] = -magnitude
    else:
        raise ValueError(f"{name!r} is not a geometric operation: {GEOMETRIC_OPS}")
    return m


def _warp(x: torch.Tensor, inverse: np.ndarray) -> torch.Tensor:
    """Bilinear resampling of ``(b, 3, S, S)`` through per-sample inverse maps (pixel units, see
    :func:`inverse_affine`); uncovered pixels are gray."""
    size = x.shape[-1]
    theta = inverse.copy()
    theta[:, :, 2] *= (
        2.0 / size
    )  # pixels -> affine_grid's [-1, 1] units (square image: the linear part stays)
    theta = torch.from_numpy(theta).to(device=x.device, dtype=x.dtype, non_blocking=True)  # (b, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (b, S, S, 2)
    # Sampling x - gray with zero padding, then adding gray back, fills uncovered pixels with gray.
    out = F.grid_sample(x - GRAY, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + GRAY).clamp(0, 255)


# ---- whole views ---------------------------------------------------------------------------------------------
def _index(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(rows).to(device, non_blocking=True)


def flip_and_crop(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """The weak part of a view: mirror where ``flip``, then crop S x S at ``shift`` from the reflect-padded
    image (a translation by up to 12.5 % of the side whose uncovered border is a mirror image)."""
    B, _, S, _ = x.shape
    pad = weak_padding(S)
    flip = torch.from_numpy(params.flip).to(x.device, non_blocking=True).view(B, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, 3, S + 2 pad, S + 2 pad)
    shift = torch.from_numpy(params.shift).to(x.device, non_blocking=True)  # (B, 2)
    ar = torch.arange(S, device=x.device)
    rows = (shift[:, 0:1] + ar).view(B, 1, S, 1).expand(B, 3, S, S + 2 * pad)
    x = padded.gather(2, rows)  # (B, 3, S, S + 2 pad)
    cols = (shift[:, 1:2] + ar).view(B, 1, 1, S).expand(B, 3, S, S)
    return x.gather(3, cols)  # (B, 3, S, S)


def rand_augment(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """FixMatch's RandAugment: for each of the N operation slots, every sample gets its own operation and
    magnitude; the samples are grouped by operation (indices computed on the CPU) and each group runs in batch,
    all geometric operations of a slot in one resampling."""
    x = x.clone()
    for j in range(params.ops.shape[1]):
        ops, mags = params.ops[:, j], params.magnitude[:, j]  # (B,), (B,)
        geometric = np.flatnonzero(np.isin(np.asarray(OPS)[ops], GEOMETRIC_OPS))
        if len(geometric):
            inverse = np.concatenate(
                [inverse_affine(OPS[ops[i]], mags[i : i + 1], x.shape[-1]) for i in geometric]
            )  # (b, 2, 3)
            idx = _index(geometric, x.device)
            x.index_copy_(0, idx, _warp(x.index_select(0, idx), inverse))
        for k in np.unique(ops):
            name = OPS[k]
            if name in GEOMETRIC_OPS or name == "Identity":
                continue
            rows = np.flatnonzero(ops == k)
            idx = _index(rows, x.device)
            mag = torch.from_numpy(mags[rows]).to(device=x.device, dtype=x.dtype, non_blocking=True)  # (b,)
            x.index_copy_(0, idx, colour_op(name, x.index_select(0, idx), mag))
    return x


def cutout(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Set each sample's square (side, centre row, centre column) to gray, clipped to the image."""
    B, _, S, _ = x.shape
    c = torch.from_numpy(params.cutout).to(x.device, non_blocking=True)  # (B, 3)
    top = c[:, 1] - c[:, 0] // 2  # (B,)
    left = c[:, 2] - c[:, 0] // 2
    ar = torch.arange(S, device=x.device)
    in_rows = (ar >= top[:, None]) & (ar < (top + c[:, 0])[:, None])  # (B, S)
    in_cols = (ar >= left[:, None]) & (ar < (left + c[:, 0])[:, None])  # (B, S)
    square = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (B, 1, S, S)
    return torch.where(square, torch.full_like(x, GRAY), x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, float32."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x.float() - m) / s


def apply_view(
    images: torch.Tensor,
    view: str,
    params: ViewParams | None,
    mean: Sequence[float],
    std: Sequence[float],
    augmented: bool = False,
) -> torch.Tensor:
    """One view of a batch: ``(B, 3, S, S)`` uint8 (or float in [0, 255]) -> normalised float32.

    ``eval`` only normalises; ``weak`` flips and crops; ``strong`` flips, crops, runs RandAugment and Cutout.

    Args:
        images: the decoded images.
        view: ``weak``, ``strong`` or ``eval``.
        params: the view's random parameters (None for ``eval``).
        mean, std: normalisation.
        augmented: the images are a strong view already flipped, cropped and RandAugmented (timm's policy, in
            the workers): only Cutout is left.
    """
    x = images.float()  # (B, 3, S, S) in [0, 255]
    if view != "eval":
        if params is None:
            raise ValueError(f"the {view} view needs its random parameters")
        if not augmented:
            x = flip_and_crop(x, params)
            if view == "strong":
                x = rand_augment(x, params)
        if view == "strong":
            x = cutout(x, params)
    return normalize(x, mean, std)


@dataclass(frozen=True)
class ViewMaker:
    """Turns the decoded images of a stream's batch into its named views.

    A stream batch (from :class:`~ssl_kvasir.data.datamodule.StreamCollate`) holds ``image`` (``(B, 3, S,
    S)`` uint8), ``aug_seed`` (``(B,)``), ``views`` (the names it needs), ``aug`` (the views' parameters, drawn
    in the loader's workers; drawn here from ``aug_seed`` when absent) and, with the timm policy,
    ``strong_image``. After the call it holds the named views (normalised float32) instead.

    Args:
        mean, std: normalisation (the backbone's timm data config).
        image_size: the side S of the images.
        strong_color: whether the strong view may change colours.
        strong_policy: ``fixmatch`` (RandAugment here, on the batch's device) or ``timm`` (timm's PIL
            RandAugment in the workers; Cutout here).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    strong_color: bool = True
    strong_policy: str = "fixmatch"

    def __post_init__(self) -> None:
        if self.strong_policy not in STRONG_POLICIES:
            raise ValueError(
                f"unknown strong policy {self.strong_policy!r}; valid: {', '.join(STRONG_POLICIES)}"
            )

    def params(self, seeds: np.ndarray | torch.Tensor, view: str) -> ViewParams | None:
        """The random parameters of ``view`` for these seeds (None for ``eval``)."""
        if view == "eval":
            return None
        return draw_params(seeds, view, self.image_size, self.strong_color)

    def stream(self, batch: dict) -> dict:
        """The views of one stream batch (the batch is changed in place and returned)."""
        views = batch.pop("views")
        images = batch.pop("image")
        drawn = batch.pop("aug", None) or {}
        for view in views:
            params = drawn[view] if view in drawn else self.params(batch["aug_seed"], view)
            if view == "strong" and self.strong_policy == "timm":
                # timm's pipeline flipped, cropped and RandAugmented this view in the workers.
                batch[view] = apply_view(batch.pop("strong_image"), view, params, self.mean, self.std, True)
            else:
                batch[view] = apply_view(images, view, params, self.mean, self.std)
        return batch

    def __call__(self, batch: dict) -> dict:
        """A stream batch, or a dict of stream batches (the training loaders' combined batch); anything
        without decoded images (views made already) passes unchanged."""
        if "image" in batch and "views" in batch:
            return self.stream(batch)
        for value in batch.values():
            if isinstance(value, dict) and "image" in value and "views" in value:
                self.stream(value)
        return batch


def make_views(
    batch: dict,
    views: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    strong_color: bool = True,
    policy: str = "fixmatch",
) -> dict:
    """The named views of a batch holding ``image`` (uint8) and ``aug_seed``: a functional form of
    :class:`ViewMaker` for code that has no DataModule at hand."""
    maker = ViewMaker(tuple(mean), tuple(std), image_size, strong_color, policy)
    return maker.stream({**batch, "views": tuple(views)})
