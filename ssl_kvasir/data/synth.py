"""Synthetic archives: small image trees in exactly the HyperKvasir layout, for tests, demos and benchmarks.

The real archive (about 66 GB) cannot be shipped, so tests generate one: real JPEG files of the archive's
common sizes under the real class folders, an unlabeled folder, and a split file in the official format.
The images carry a class signal that a small CNN learns at 32 px: each class is its own combination of
pattern (stripes, elongated blobs, checks, rings), pattern hue and orientation, drawn over a pinkish
"mucosa" background. Every image varies the rest (hue, contrast, brightness, frequency, phase, position,
noise, highlights, the endoscope's round field of view), and some carry a green picture-in-picture
thumbnail in the lower-left corner like the Olympus ScopeGuide frames of the real data, independent of the
class, so that the task is learnable but not trivial.

Pictures are drawn at 128 px width with numpy and enlarged with PIL, so that writing a large JPEG costs
about as much as encoding it.
"""

from __future__ import annotations

import colorsys
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_kvasir.data.archive import LABELED_DIR, UNLABELED_DIR, stratified_folds, write_split_file
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassTable
from ssl_kvasir.errors import ConfigError

SIZES = ((720, 576), (1280, 1024), (1920, 1072))
"""The three most common (width, height) of HyperKvasir images."""

JPEG_QUALITY = 90
_CANVAS_WIDTH = 128  # drawing resolution; the class patterns are a few cycles per image wide
_PATTERNS = ("stripes", "blobs", "checks", "rings")
_N_HUES = 6
_PIP_PROBABILITY = 0.3


@dataclass(frozen=True)
class ClassStyle:
    """What makes one synthetic class: the pattern, its hue (0..1) and its orientation (degrees)."""

    pattern: str
    hue: float
    angle: float


def class_style(index: int) -> ClassStyle:
    """The style of class ``index``: unique (hue, pattern) pairs for the first 24 classes, then the
    orientation keeps later classes apart."""
    hue = (index % _N_HUES) / _N_HUES
    pattern = _PATTERNS[(index // _N_HUES) % len(_PATTERNS)]
    group = index // (_N_HUES * len(_PATTERNS))
    angle = float((index * 30 + group * 45) % 180)
    return ClassStyle(pattern=pattern, hue=hue, angle=angle)


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    """An HSV colour (hue wraps around) as an RGB vector in 0..1."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))))


def _pattern(style: ClassStyle, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The class pattern's coverage in 0..1 on a grid of coordinates (x across 0..1, y scaled alike)."""
    theta = math.radians(style.angle + rng.normal(0, 6))
    u = x * math.cos(theta) + y * math.sin(theta)  # (h, w) along the class orientation
    v = -x * math.sin(theta) + y * math.cos(theta)  # (h, w) across it
    freq = rng.uniform(3.0, 4.5)  # cycles per image width: >= 7 px per cycle at 32 px
    if style.pattern == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi))
    if style.pattern == "checks":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi)) * np.sin(
            2 * np.pi * freq * v + rng.uniform(0, 2 * np.pi)
        )
    if style.pattern == "rings":
        cu, cv = rng.uniform(0.2, 0.8), rng.uniform(0.0, 0.6)
        cu, cv = cu * math.cos(theta) + cv * math.sin(theta), -cu * math.sin(theta) + cv * math.cos(theta)
        r = np.sqrt((u - cu) ** 2 + (1.6 * (v - cv)) ** 2)  # (h, w) elliptic, stretched along the orientation
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * 0.8 * r + rng.uniform(0, 2 * np.pi))
    # blobs: elongated along the orientation
    cover = np.zeros_like(x)
    for _ in range(rng.integers(4, 8)):
        bx, by = rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.95) * y.max()
        bu, bv = bx * math.cos(theta) + by * math.sin(theta), -bx * math.sin(theta) + by * math.cos(theta)
        a, b = rng.uniform(0.10, 0.16), rng.uniform(0.035, 0.05)
        cover = np.maximum(cover, np.exp(-(((u - bu) / a) ** 2) - ((v - bv) / b) ** 2))
    return cover


def _draw_pip(img: np.ndarray, rng: np.random.Generator) -> None:
    """Draw a ScopeGuide-like picture-in-picture box (dark, with a green colon outline) lower left, in place."""
    h, w, _ = img.shape
    bw, bh = int(w * rng.uniform(0.2, 0.26)), int(h * rng.uniform(0.24, 0.3))
    y0, x0 = h - bh - int(h * 0.03), int(w * 0.02)
    yy, xx = np.mgrid[0:bh, 0:bw]
    ey, ex = (yy - bh / 2) / (bh * 0.36), (xx - bw / 2) / (bw * 0.36)  # (bh, bw) ellipse coordinates
    ring = np.abs(np.hypot(ex, ey) - 1.0 + 0.15 * np.sin(3 * np.arctan2(ey, ex) + rng.uniform(0, 6))) < 0.16
    box = np.full((bh, bw, 3), 0.08)
    box[ring] = (0.15, rng.uniform(0.65, 0.85), 0.2)
    img[y0 : y0 + bh, x0 : x0 + bw] = box


def render_image(label: int, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Draw one synthetic endoscopy-like image of class ``label`` at ``width`` x ``height``.

    Args:
        label: the class index (its look comes from :func:`class_style`).
        width: image width in pixels.
        height: image height in pixels.
        rng: source of the per-image variation.

    Returns:
        an RGB image.
    """
    style = class_style(label)
    ch = max(8, round(_CANVAS_WIDTH * height / width))
    yy, xx = np.mgrid[0:ch, 0:_CANVAS_WIDTH] / _CANVAS_WIDTH  # (ch, 128) each, same scale on both axes
    mucosa = _rgb(rng.uniform(-0.03, 0.04), rng.uniform(0.45, 0.7), rng.uniform(0.6, 0.85))
    tint = _rgb(style.hue + rng.normal(0, 0.025), rng.uniform(0.55, 0.9), rng.uniform(0.65, 0.95))
    cover = _pattern(style, xx, yy, rng) * rng.uniform(0.45, 0.85)  # (ch, 128) pattern contrast varies
    img = mucosa * (1 - cover[..., None]) + tint * cover[..., None]  # (ch, 128, 3)
    # Lighting: the scope's light falls off from a point near the centre; specular glints.
    cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65) * ch / _CANVAS_WIDTH
    r2 = (xx - cx) ** 2 + (yy - cy) ** 2  # (ch, 128)
    img *= (rng.uniform(0.75, 1.15) * np.exp(-r2 * rng.uniform(0.8, 2.0)))[..., None]
    for _ in range(rng.integers(0, 4)):
        gx, gy = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9) * ch / _CANVAS_WIDTH
        img += np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / rng.uniform(2e-5, 1.5e-4))[..., None]
    img += rng.normal(0, 0.04, img.shape)
    # The round field of view of the endoscope, cut by the frame on the long side.
    fov = ((xx - 0.5) / rng.uniform(0.5, 0.6)) ** 2 + (
        (yy - ch / _CANVAS_WIDTH / 2) / (0.62 * ch / _CANVAS_WIDTH)
    ) ** 2
    img[fov > 1.0] = 0.0
    if rng.random() < _PIP_PROBABILITY:
        _draw_pip(img, rng)
    small = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
    # Bilinear up to a quarter of the target, then pixel replication: smooth enough for a JPEG of the real
    # sizes at a fraction of the cost of a full-size bilinear enlargement.
    quarter = small.resize((max(1, -(-width // 4)), max(1, -(-height // 4))), Image.Resampling.BILINEAR)
    return quarter.resize((width, height), Image.Resampling.NEAREST)


def _uuid_names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """``n`` new random-UUID-like file names (``<uuid4>.jpg``) from ``rng``, none in ``taken``."""
    names: list[str] = []
    while len(names) < n:
        name = f"{uuid.UUID(bytes=rng.bytes(16), version=4)}.jpg"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _check_empty(out: Path, subdirs: Sequence[str]) -> None:
    for sub in subdirs:
        d = out / sub
        if d.exists() and any(d.iterdir()):
            raise ConfigError(f"{d} already holds files; generate a synthetic archive into an empty folder")


def make_synthetic_archive(
    out: Path,
    per_class: int | Sequence[int],
    unlabeled: int,
    seed: int,
    n_folds: int = 2,
    classes: ClassTable = HYPERKVASIR_CLASSES,
    sizes: Sequence[tuple[int, int]] = SIZES,
) -> Path:
    """Write a synthetic archive in the HyperKvasir layout.

    Writes ``labeled-images/<tract>/<category>/<class-folder>/<uuid>.jpg`` for every class,
    ``unlabeled-images/images/<uuid>.jpg``, and the split file ``<n_folds>_fold_split.csv`` (official format,
    seeded stratified folds). Unlabeled images come from the same class-conditional generator, with classes
    drawn in proportion to the labeled counts; their classes are recorded nowhere. Each image's size is
    drawn uniformly from ``sizes``. The same arguments always write the same bytes.

    Args:
        out: the archive root to create (it may exist, but must not hold an archive already).
        per_class: labeled images per class, or one count per class (to mimic HyperKvasir's imbalance).
        unlabeled: number of unlabeled images.
        seed: seed of everything: names, sizes, pictures and folds.
        n_folds: number of folds in the split file.
        classes: the class table (folders and split-file spellings).
        sizes: the (width, height) to draw from.

    Returns:
        ``out``.

    Raises:
        ConfigError: for negative counts, fewer than 2 folds, no sizes, or an ``out`` that already holds an
            archive.
    """
    out = Path(out)
    counts = [per_class] * len(classes) if isinstance(per_class, int) else [int(n) for n in per_class]
    if len(counts) != len(classes):
        raise ConfigError(f"per_class lists {len(counts)} counts for {len(classes)} classes")
    if min(counts) < 0 or unlabeled < 0:
        raise ConfigError(f"image counts must be >= 0, got per_class={per_class}, unlabeled={unlabeled}")
    if n_folds < 2:
        raise ConfigError(f"n_folds must be at least 2, got {n_folds}")
    if not sizes:
        raise ConfigError("sizes is empty")
    _check_empty(out, (LABELED_DIR, UNLABELED_DIR))

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), counts)  # (n_labeled,)
    p = np.asarray(counts, dtype=float)
    p = p / p.sum() if p.sum() > 0 else np.full(len(classes), 1 / len(classes))
    hidden = rng.choice(len(classes), size=unlabeled, p=p)  # (unlabeled,) classes of the unlabeled images
    taken: set[str] = set()
    names = _uuid_names(rng, len(labels), taken)
    unlabeled_names = _uuid_names(rng, unlabeled, taken)
    size_of = rng.integers(0, len(sizes), size=len(labels) + unlabeled)  # (n_labeled + unlabeled,)

    jobs = [out / LABELED_DIR / classes[y].archive_dir / n for y, n in zip(labels, names, strict=True)]
    jobs += [out / UNLABELED_DIR / n for n in unlabeled_names]
    for i, (path, label) in enumerate(zip(jobs, np.concatenate([labels, hidden]), strict=True)):
        width, height = sizes[size_of[i]]
        # One generator per image: image i looks the same whatever else is generated.
        image = render_image(int(label), width, height, np.random.default_rng([seed, i]))
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=JPEG_QUALITY)
    if unlabeled == 0:
        (out / UNLABELED_DIR).mkdir(parents=True, exist_ok=True)
    folds = stratified_folds(labels, n_folds, seed)
    write_split_file(out / f"{n_folds}_fold_split.csv", names, labels, folds, classes)
    return out


def write_image_folder_dataset(
    out: Path,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    unlabeled_mask: Sequence[bool] | np.ndarray,
    image_format: str = "png",
) -> Path:
    """Write an array of images as a generic image-folder data set (``data.source=folder``).

    Labeled image ``i`` goes to ``out/labeled/<class_names[labels[i]]>/<i>.<ext>``, unlabeled ones (where
    ``unlabeled_mask`` is true; their labels are ignored) to ``out/unlabeled/<i>.<ext>``, with ``i``
    zero-padded so that file order is array order. Point ``data.root`` at ``out/labeled`` and
    ``data.unlabeled_root`` at ``out/unlabeled``.

    Args:
        out: the folder to create (it must not hold ``labeled/`` or ``unlabeled/`` files already).
        images: ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB images, uint8.
        labels: ``(N,)`` class indices into ``class_names``.
        class_names: the class folder names.
        unlabeled_mask: ``(N,)`` true for the images to write as unlabeled.
        image_format: ``png`` (lossless) or ``jpg``.

    Returns:
        ``out``.

    Raises:
        ConfigError: for an array of the wrong shape or dtype, lengths that disagree, a label outside
            ``class_names``, an unknown format, or an ``out`` that already holds a data set.
    """
    out = Path(out)
    images = np.asarray(images)
    labels = np.asarray(labels)
    unlabeled_mask = np.asarray(unlabeled_mask, dtype=bool)
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ConfigError(
            f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    if not len(images) == len(labels) == len(unlabeled_mask):
        raise ConfigError(
            f"{len(images)} images, {len(labels)} labels and {len(unlabeled_mask)} mask entries must agree"
        )
    if image_format not in ("png", "jpg"):
        raise ConfigError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    labeled = ~unlabeled_mask
    if labeled.any() and (labels[labeled].min() < 0 or labels[labeled].max() >= len(class_names)):
        raise ConfigError(f"labels must lie in 0..{len(class_names) - 1}")
    _check_empty(out, ("labeled", "unlabeled"))
    for name in class_names:
        (out / "labeled" / name).mkdir(parents=True, exist_ok=True)
    (out / "unlabeled").mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(images) - 1, 0)))
    for i, (image, label, is_unlabeled) in enumerate(zip(images, labels, unlabeled_mask, strict=True)):
        folder = out / "unlabeled" if is_unlabeled else out / "labeled" / class_names[int(label)]
        path = folder / f"{i:0{width}d}.{image_format}"
        pil = Image.fromarray(image, "L" if image.ndim == 2 else "RGB")
        if image_format == "jpg":
            pil.save(path, "JPEG", quality=JPEG_QUALITY)
        else:
            pil.save(path, "PNG")
    return out
