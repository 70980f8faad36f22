"""Decoding one image file into an RGB picture, as cheaply as the requested size allows.

A JPEG is made of 8x8 DCT blocks, and libjpeg can run the inverse DCT at 1/2, 1/4 or 1/8 scale, which skips
most of the decoding work. ``Image.draft`` asks for that: a 1280x1024 endoscopy frame needed at 256 px is
decoded straight to 320x256, about three times faster than decoding it whole and resizing. Everything else
here exists so that one odd file (a PNG saved as ``.jpg``, a CMYK or palette image, a truncated download)
becomes either a plain RGB image or one :class:`~ssl_kvasir.errors.DataError` that names it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_kvasir.errors import DataError

# Modes that carry an alpha band: composited onto black, the colour of an endoscope frame's border.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Integer and float grey modes that PIL's own conversion would clip at 255 instead of scaling.
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def decode_image(source: Path | bytes, min_size: int | None, name: str) -> Image.Image:
    """Decode an image file into RGB, letting JPEG DCT scaling skip detail that ``min_size`` does not need.

    For a JPEG, decoding asks libjpeg for the smallest scale (1, 1/2, 1/4 or 1/8) whose result keeps both
    sides at or above ``min_size``, so the shorter side stays ``>= min_size`` (an image already smaller than
    ``min_size`` is decoded whole). Nothing else is done: the caller resizes. Other formats decode at full
    size. The mode is converted only when it is not RGB already (the conversion costs about 40 % of a
    decode): grey, CMYK and palette images become RGB; alpha is composited onto black; 16-bit grey is scaled
    down to 8 bits rather than clipped.

    Args:
        source: a file path or the file's bytes.
        min_size: the shorter side the caller needs, or None for a full-size decode.
        name: how to name the image in error messages (a path relative to the archive, for example).

    Returns:
        the decoded RGB image.

    Raises:
        DataError: naming ``name`` and the reason, when the file is missing, not an image, truncated or
            otherwise corrupt, or in a mode that cannot be converted to RGB.
    """
    fp: io.BytesIO | Path
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(source)
    else:
        fp = Path(source)
        if not fp.is_file():
            raise DataError(f"{name}: file not found")
    try:
        with Image.open(fp) as img:
            if min_size is not None and img.format == "JPEG":
                # draft() picks the largest DCT scale with both sides >= the requested (min_size, min_size).
                img.draft("RGB", (min_size, min_size))
            img.load()
            return _to_rgb(img, name)
    except DataError:
        raise
    except Image.UnidentifiedImageError:
        raise DataError(f"{name}: not an image file PIL can read") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        # PIL reports truncated and corrupt data with these, e.g. "image file is truncated (7 bytes not
        # processed)" or "broken data stream when reading image file".
        raise DataError(f"{name}: cannot decode image: {e}") from e


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Convert a loaded image of any mode to RGB (unchanged when it already is)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # A palette with a transparent entry carries alpha; go through RGBA so it is composited like alpha.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in _WIDE_GREY_MODES:
        grey = np.asarray(img, dtype=np.float64)  # (H, W)
        # 16-bit data span 0..65535; 'I' and 'F' images holding 8-bit values are kept as they are.
        scale = 257.0 if mode.startswith("I;16") or grey.max(initial=0.0) > 255.0 else 1.0
        grey8 = np.clip(np.rint(grey / scale), 0, 255).astype(np.uint8)  # (H, W)
        return Image.fromarray(grey8, mode="L").convert("RGB")
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        black = Image.new("RGB", rgba.size, (0, 0, 0))
        black.paste(rgba, mask=rgba.getchannel("A"))
        return black
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise DataError(f"{name}: image mode {mode} cannot be converted to RGB: {e}") from None
