"""CPU prepare stage: image bytes to a square uint8 RGB array.

Only the formats the product supports are opened (JPEG, PNG, GIF, WebP,
BMP), detected from the bytes, never from a file name or a Content-Type. The
pixel count is checked from the header before any pixel is decoded, so a
decompression bomb costs nothing. JPEGs use PIL's draft mode, which lets the
decoder scale down by 1/2, 1/4 or 1/8 while decoding.

Normalisation (mean/std) is not done here: the forward stage does it for a
whole batch at once, on the device that runs the model.
"""

from __future__ import annotations

import io
import warnings
from typing import cast

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from encoder.errors import ImageError, Reason
from encoder.types import PreprocessSpec

#: PIL format names that may be opened.
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def sniff_format(data: bytes) -> str | None:
    """Return the image format named by the leading bytes, or None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def prepare_image(
    data: bytes, spec: PreprocessSpec, *, max_pixels: int, min_side: int = 8
) -> np.ndarray:
    """Decode, flatten transparency, resize and centre-crop one image.

    Called from the prepare thread pool; pure function, safe to run in
    parallel (PIL releases the GIL while decoding and resizing).

    Returns:
        ``(S, S, 3)`` uint8 array with ``S = spec.image_size``.

    Raises:
        ImageError: with reason ``not_an_image``, ``too_many_pixels``,
            ``image_too_small`` or ``decode_failed``.
    """
    if not data:
        raise ImageError(Reason.NOT_AN_IMAGE, "empty body (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            Reason.NOT_AN_IMAGE,
            f"bytes are not a supported image ({', '.join(SUPPORTED_FORMATS)}); "
            f"starts with {data[:8]!r}",
        )
    size = spec.image_size
    try:
        with warnings.catch_warnings():
            # our own pixel limit below is the rule; PIL's hard limit still
            # raises DecompressionBombError for absurd sizes
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = opened.size
            if w * h > max_pixels:
                raise ImageError(Reason.TOO_MANY_PIXELS,
                                 f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
            if min(w, h) < min_side:
                raise ImageError(Reason.IMAGE_TOO_SMALL, f"{w}x{h} is below {min_side} px")
            if fmt == "JPEG":
                opened.draft("RGB", (size, size))
            if getattr(opened, "is_animated", False):
                opened.seek(0)
            src: Image.Image = opened
            if src.mode == "I;16B":  # PIL resizes big-endian 16-bit wrongly
                src = src.convert("I")
            if src.mode in _WIDE_GREY:
                # crop and shrink in the image's own 16/32-bit mode first, then to 8 bits
                # by the full image's largest value (scaling at full resolution took
                # float64 copies: +654 MiB at 36 MP)
                lo_hi = cast("tuple[float, float]", src.getextrema())
                img = _to_rgb(_resize_crop(src, size), spec.background, float(lo_hi[1]))
            else:
                img = _resize_crop(_to_rgb(src, spec.background), size)
            arr = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(Reason.TOO_MANY_PIXELS, f"decompression bomb refused: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(Reason.DECODE_FAILED, f"{fmt} decode failed: {exc}") from exc
    if arr.shape != (size, size, 3):
        raise ImageError(Reason.DECODE_FAILED, f"unexpected decoded shape {arr.shape}")
    return arr


#: 16- and 32-bit greyscale modes: resized before they become 8-bit (see prepare_image)
_WIDE_GREY = ("I;16", "I;16L", "I")


def _to_rgb(img: Image.Image, background: tuple[int, int, int],
            top: float | None = None) -> Image.Image:
    """Return an RGB image; transparency is composited over ``background``.

    Wide greyscale (16/32-bit) is scaled to 8 bits by ``top`` (its largest
    value; images whose values fit in 8 bits keep them); callers shrink such
    images first and pass the full image's ``top``.
    """
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in _WIDE_GREY:
        arr = np.asarray(img, dtype=np.float32)
        if top is None:
            top = float(arr.max())
        img = Image.fromarray(np.clip(arr * (255.0 / max(top, 255.0)), 0, 255).astype(
            np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central square, then resize it to ``size`` (bicubic).

    Same result as resize-shortest-side-then-centre-crop up to rounding, but
    an extreme aspect ratio never allocates a huge intermediate image.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    # PIL's reduce() (the reducing gap) has no 16/32-bit greyscale: plain bicubic there
    gap = None if img.mode in _WIDE_GREY else 3.0
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=gap)


# Truncated files must fail, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
