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

#: Default of `prepare_image`'s ``max_decode_bytes`` (``EncoderSettings.max_decode_mib``).
DEFAULT_MAX_DECODE_BYTES = 256 * 2 ** 20
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
    data: bytes, spec: PreprocessSpec, *, max_pixels: int, min_side: int = 8,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> np.ndarray:
    """Decode, flatten transparency, resize and centre-crop one image.

    Called from the prepare thread pool; pure function, safe to run in
    parallel (PIL releases the GIL while decoding and resizing).

    Memory: an image is shrunk in its own mode before it becomes 8-bit RGB
    (see `decode_bytes`), and one whose decode would hold more than
    ``max_decode_bytes`` at once is refused from its header, before any
    pixel is decoded: a decode costs at most that much.

    Returns:
        ``(S, S, 3)`` uint8 array with ``S = spec.image_size``.

    Raises:
        ImageError: with reason ``not_an_image``, ``too_many_pixels`` (pixels
            or decode memory over the limit), ``image_too_small`` or
            ``decode_failed``.
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
            coefficients = 0
            if fmt == "JPEG":
                # a progressive JPEG keeps every DCT coefficient of the full image (2 bytes
                # each, per component) whatever the draft scale
                if opened.info.get("progressive"):
                    coefficients = 2 * len(opened.getbands()) * w * h
                opened.draft("RGB", (size, size))
            if getattr(opened, "is_animated", False):
                opened.seek(0)
            need = decode_bytes(opened) + coefficients + (
                _WEBP_EXTRA * w * h if fmt == "WEBP" else 0)
            if need > max_decode_bytes:
                mib = 2 ** 20
                raise ImageError(
                    Reason.TOO_MANY_PIXELS,
                    f"{opened.size[0]}x{opened.size[1]} {opened.mode} would take about "
                    f"{need / mib:.0f} MiB to decode > limit {max_decode_bytes / mib:.0f} MiB "
                    "(PINFRESH_ENCODER__MAX_DECODE_MIB)")
            arr = _shrink(opened, size, spec.background)
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
#: Modes resized as they are, then made RGB: their conversion to RGB repeats or copies
#: each value, so shrinking first gives the very same image without a full-size RGB copy.
_SHRINK_FIRST = ("L", "RGB")
#: PIL's bytes per pixel in memory (every 3- and 4-band 8-bit mode takes 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I": 4, "F": 4}
#: Pixels flattened at a time (transparency; whole rows, at least one): a strip's four
#: temporary copies (16 bytes a pixel) instead of the image's.
_STRIP_PIXELS = 1 << 20
#: Bytes a pixel that libwebp holds beside PIL's image: Pillow decodes every WebP through
#: its animation decoder, which keeps two RGBA canvases and hands over a bytes copy.
_WEBP_EXTRA = 12


def decode_bytes(img: Image.Image) -> int:
    """The most memory `prepare_image` holds at once to decode ``img`` (from its header).

    The decoded image, plus the full-size copy its path needs: none for
    8-bit grey, RGB and 16/32-bit grey (shrunk as they are, see
    `_SHRINK_FIRST`); an RGB copy for the others (transparency is flattened
    into it strip by strip, `_flatten`; palettes can only be resized
    nearest-neighbour and CMYK's conversion is not linear, so they become RGB
    first); a 32-bit copy for big-endian 16-bit; for transparency, one
    strip's temporary copies (`_flatten`). The 224 px results are left out;
    `prepare_image` adds what a format's decoder holds (WebP, progressive
    JPEG).
    """
    w, h = img.size
    mode = img.mode
    own = _MODE_BYTES.get(mode, 4)
    if mode in ("L", "RGB", "I;16", "I;16L", "I"):
        extra = 0
    elif mode == "1":
        extra = 1  # to L
    else:  # an RGB (or 32-bit) copy
        extra = 4
    strips = 16 * min(w * h, max(_STRIP_PIXELS, w)) if _has_alpha(img) else 0
    return w * h * (own + extra) + strips


def _shrink(src: Image.Image, size: int, background: tuple[int, int, int]) -> np.ndarray:
    """``src`` (opened, not yet decoded) as a ``(size, size, 3)`` uint8 array."""
    if src.mode == "I;16B":  # PIL resizes big-endian 16-bit wrongly
        src = src.convert("I")
    if src.mode in _WIDE_GREY:
        # crop and shrink in the image's own 16/32-bit mode first, then to 8 bits
        # by the full image's largest value (scaling at full resolution took
        # float64 copies: +654 MiB at 36 MP)
        lo_hi = cast("tuple[float, float]", src.getextrema())
        return np.asarray(_to_rgb(_resize_crop(src, size), background, float(lo_hi[1])),
                          dtype=np.uint8)
    if src.mode == "1":
        src = src.convert("L")  # 0 and 255: what its RGB would repeat
    if src.mode not in _SHRINK_FIRST:
        src = _flatten(src, background) if _has_alpha(src) else src.convert("RGB")
    return np.asarray(_to_rgb(_resize_crop(src, size), background), dtype=np.uint8)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (
        img.mode == "P" and "transparency" in img.info)


def _flatten(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """``img`` composited over ``background`` as RGB, about `_STRIP_PIXELS` at a time.

    The same pixels as one full-size composite (compositing is per pixel),
    which took four full-size copies (+16 bytes a pixel); here the RGB
    result is the only one, and strips of whole rows take the copies.
    """
    w, h = img.size
    rows = max(1, _STRIP_PIXELS // w)
    out = Image.new("RGB", (w, h))
    for top in range(0, h, rows):
        part = img.crop((0, top, w, min(h, top + rows)))
        out.paste(_to_rgb(part, background), (0, top))
    return out


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
    if _has_alpha(img):
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
