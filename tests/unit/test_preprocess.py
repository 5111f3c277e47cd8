"""CPU prepare stage: supported formats, hostile images, transparency."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from encoder.errors import ImageError, Reason
from encoder.model import PreprocessSpec
from encoder.preprocess import prepare_image, sniff_format

SPEC = PreprocessSpec(image_size=32)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def prep(data: bytes, max_pixels: int = 10_000_000) -> np.ndarray:
    return prepare_image(data, SPEC, max_pixels=max_pixels, min_side=4)


def gradient(w: int, h: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, x[::-1], np.full_like(x, 80)], -1), "RGB").convert(mode)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
def test_supported_formats_decode(fmt):
    out = prep(encode(gradient(120, 90), fmt))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_transparent_png_composited_on_white():
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    out = prep(encode(img, "PNG"))
    assert (out == 255).all()


def test_cmyk_jpeg_and_16bit_png():
    assert prep(encode(gradient(64, 64, "CMYK"), "JPEG")).shape == (32, 32, 3)
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    out = prep(encode(Image.fromarray(arr), "PNG"))
    assert out.shape == (32, 32, 3) and out.max() > 100


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = prep(buf.getvalue())
    assert out[..., 2].mean() > 200 and out[..., 1].mean() < 50


def test_extreme_aspect_ratio_is_center_cropped():
    out = prep(encode(gradient(4000, 8), "PNG"))
    assert out.shape == (32, 32, 3)


@pytest.mark.parametrize("data, reason", [
    (b"", "not_an_image"),
    (b"<html><body>hi</body></html>", "not_an_image"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not_an_image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "decode_failed"),
])
def test_bad_bytes(data, reason):
    with pytest.raises(ImageError) as err:
        prep(data)
    assert err.value.reason == reason


def test_truncated_jpeg_fails():
    data = encode(gradient(200, 200), "JPEG")
    with pytest.raises(ImageError) as err:
        prep(data[: len(data) // 2])
    assert err.value.reason == "decode_failed"


def test_tiny_image_refused():
    with pytest.raises(ImageError) as err:
        prep(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert err.value.reason == "image_too_small"


def test_decompression_bomb_refused_before_decoding():
    # a 1-bit PNG of 20000x20000 compresses to a few KB
    data = encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(data) < 200_000
    with pytest.raises(ImageError) as err:
        prep(data, max_pixels=50_000_000)
    assert err.value.reason == "too_many_pixels"


def test_sniff():
    assert sniff_format(b"\x89PNG\r\n\x1a\nxxxx") == "PNG"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"GIF89a...") == "GIF"
    assert sniff_format(b"%PDF-1.4") is None


def test_golden_preprocessing():
    """Guards the resize/crop/flatten rules: a change here changes every model version."""
    out = prepare_image(encode(gradient(300, 200), "PNG"), PreprocessSpec(), max_pixels=10**7)
    assert out.shape == (224, 224, 3)
    # central 200x200 of a horizontal 0..255 ramp, resized: mean of channel 0 ~ 127.5
    assert abs(float(out[..., 0].mean()) - 127.4) < 1.0
    assert abs(float(out[..., 2].mean()) - 80.0) < 0.5
    assert int(out[112, 0, 0]) < int(out[112, 223, 0])


PEAK = """
import resource, sys
from encoder.types import PreprocessSpec  # no torch: its import peak would hide the delta
from encoder.preprocess import prepare_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = prepare_image(data, PreprocessSpec(), max_pixels=40_000_000)
assert out.shape == (224, 224, 3) and out.max() > 0
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_a_16bit_png_is_shrunk_before_it_is_converted(tmp_path):
    """A 36 MP 16-bit greyscale PNG (80 KiB) costs about its 16-bit pixels (72 MB), not
    float64 copies of them (+654 MiB before): the budget is 2 bytes a pixel + 100 MiB."""
    import subprocess
    import sys

    arr = np.zeros((6000, 6000), np.uint16)
    arr[::7, ::5] = 60000
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path, "PNG", compress_level=9)
    run = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak_mib = float(run.stdout.strip())
    assert peak_mib < 6000 * 6000 * 2 / 2**20 + 100, peak_mib


def _old_flatten_then_shrink(img: Image.Image, size: int, bg=(255, 255, 255)) -> np.ndarray:
    """The rule before decode memory was bounded: composite at full size, then resize."""
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*bg, 255))
    canvas.alpha_composite(rgba)
    w, h = canvas.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(canvas.convert("RGB").resize((size, size), Image.Resampling.BICUBIC,
                                                   box=box, reducing_gap=3.0))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_flattened_in_strips_gives_the_same_image(mode):
    """Flattening strip by strip gives exactly the pixels of the old full-size composite, for
    every kind of transparency (the rule every model version's vectors were made with)."""
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (700, 420, 4), dtype=np.uint8)  # several strips
    rgba[..., 3] = np.where(rng.random((700, 420)) < 0.3, 0, rgba[..., 3])  # holes
    img = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":
        img = img.convert("RGB").quantize(64)
        img.info["transparency"] = 3
    buf = io.BytesIO()
    img.save(buf, "PNG")
    new = prepare_image(buf.getvalue(), PreprocessSpec(), max_pixels=10**7).astype(int)
    old = _old_flatten_then_shrink(Image.open(io.BytesIO(buf.getvalue())), 224).astype(int)
    assert np.array_equal(new, old)


def test_decode_memory_is_estimated_from_the_header_and_bounded():
    from encoder.preprocess import decode_bytes

    def opened(mode: str, size=(1000, 500), **info) -> Image.Image:
        img = Image.new(mode, size)
        img.info.update(info)
        return img

    px = 1000 * 500
    assert decode_bytes(opened("L")) == px
    assert decode_bytes(opened("RGB")) == 4 * px
    assert decode_bytes(opened("I;16")) == 2 * px
    assert decode_bytes(opened("RGBA")) == 8 * px + 16 * px  # + its RGB + one strip
    assert decode_bytes(opened("P")) == 5 * px
    assert decode_bytes(opened("P", transparency=0)) == 5 * px + 16 * px
    # a strip is about 1 MP of whole rows, its four copies 16 bytes a pixel
    assert decode_bytes(opened("RGBA", (5000, 4000))) == 8 * 20_000_000 + 16 * (1 << 20)
    assert decode_bytes(opened("RGBA", (2_000_000, 10))) == 8 * 20_000_000 + 16 * 2_000_000
    assert decode_bytes(opened("CMYK")) == 8 * px
    # a 20 MP RGBA PNG is 160 MB to decode: refused under a 128 MiB limit, from its header
    buf = io.BytesIO()
    Image.new("RGBA", (5000, 4000), (1, 2, 3, 4)).save(buf, "PNG")
    with pytest.raises(ImageError) as err:
        prepare_image(buf.getvalue(), PreprocessSpec(), max_pixels=40_000_000,
                      max_decode_bytes=128 << 20)
    assert err.value.reason == Reason.TOO_MANY_PIXELS
    assert "5000x4000 RGBA would take about 169 MiB to decode > limit 128 MiB" in str(err.value)


PEAK_RGBA = PEAK.replace("max_pixels=40_000_000)", "max_pixels=40_000_000, "
                         "max_decode_bytes=1 << 40)")


@pytest.mark.parametrize("shape", [(4000, 6000), (16, 600_000)])
def test_a_transparent_png_costs_what_decode_bytes_says(tmp_path, shape):
    """A 24 MP RGBA PNG (4 bytes a pixel in memory) decodes in its pixels, its RGB and one
    strip's copies (`decode_bytes`: 199 MiB), not in four more full-size copies (a full-size
    composite: +368 MiB measured); a 9.6 MP image 16 rows tall too (a strip of 256 rows
    held the whole of it)."""
    import subprocess
    import sys

    from encoder.preprocess import decode_bytes

    arr = np.zeros((*shape, 4), np.uint8)
    arr[::9, ::7] = (200, 10, 10, 120)
    path = tmp_path / "alpha.png"
    Image.fromarray(arr, "RGBA").save(path, "PNG", compress_level=9)
    del arr
    run = subprocess.run([sys.executable, "-c", PEAK_RGBA, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak_mib = float(run.stdout.strip())
    budget = decode_bytes(Image.open(path)) / 2**20
    assert peak_mib < budget + 40, (peak_mib, budget)
