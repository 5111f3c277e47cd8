"""The two prepare paths: PIL (CPU default) and the tensor path (nvjpeg on CUDA).

On this CPU machine the tensor path runs torchvision's libjpeg-turbo decode and
the same resize code the GPU runs, so routing, the per-image fallback and the
agreement of the two paths are all checked here; `test_gpu.py` checks nvjpeg.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.config import EncoderSettings
from encoder.engine import ImageEncoder
from encoder.errors import ImageError
from encoder.jpeg import read_header
from encoder.model import PreprocessSpec
from encoder.prepare_tensor import PilPreparer, TensorPreparer

CPU = torch.device("cpu")
SPEC = PreprocessSpec()


def photo(seed: int, w: int = 736, h: int = 920) -> Image.Image:
    """A smooth, photo-like RGB image: gradients, blobs and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b = rng.uniform(-1, 1, 2)
        img[..., c] = 128 + 60 * np.sin(a * xx / 90 + b * yy / 70 + c)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(30, 200)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool():
    p = ThreadPoolExecutor(2)
    yield p
    p.shutdown()


def preparers(pool, **kw):
    args = dict(pool=pool, max_pixels=40_000_000, min_side=8) | kw
    return PilPreparer(SPEC, CPU, **args), TensorPreparer(SPEC, CPU, **args)


def test_jpeg_header_reader():
    h = read_header(jpeg(photo(0, 300, 200)))
    assert (h.width, h.height, h.components, h.process) == (300, 200, 3, "baseline")
    assert h.gpu_decodable
    prog = read_header(jpeg(photo(0, 64, 64), progressive=True))
    assert prog.process == "progressive" and prog.gpu_decodable
    cmyk = read_header(jpeg(photo(0, 64, 64).convert("CMYK")))
    assert cmyk.components == 4 and not cmyk.gpu_decodable
    gray = read_header(jpeg(photo(0, 64, 64).convert("L")))
    assert gray.components == 1 and gray.gpu_decodable
    assert read_header(b"\xff\xd8\xff\xe0\x00") is None
    assert read_header(png(photo(0, 16, 16))) is None
    assert read_header(b"") is None


def bomb_header(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the SOF0 dimensions of a baseline JPEG (a small-file pixel bomb)."""
    i = data.index(b"\xff\xc0")
    b = bytearray(data)
    b[i + 5:i + 7] = h.to_bytes(2, "big")
    b[i + 7:i + 9] = w.to_bytes(2, "big")
    return bytes(b)


def test_routing_and_errors_on_the_tensor_path(pool):
    _, tens = preparers(pool)
    good = jpeg(photo(1))
    items = [
        good,                                          # 0 device
        png(photo(2, 300, 300)),                       # 1 PNG -> CPU fallback
        jpeg(photo(3, 200, 260).convert("CMYK")),      # 2 CMYK -> CPU fallback
        good[: len(good) // 2],                        # 3 truncated -> PIL refuses
        bomb_header(jpeg(photo(4, 64, 64)), 30000, 30000),  # 4 bomb, never decoded
        b"<html>not an image</html>",                  # 5
        jpeg(photo(5, 4, 300)),                        # 6 too small
        jpeg(photo(6, 500, 400).convert("L")),         # 7 grayscale on device
    ]
    assert [tens.route(d) if isinstance(tens.route(d), str) else tens.route(d).reason
            for d in items] == ["device", "cpu", "cpu", "cpu", "too_many_pixels", "cpu",
                                "image_too_small", "device"]
    pb = tens(items)
    assert pb.n == len(items) and pb.fallbacks == 4
    assert {i: e.reason for i, e in pb.errors.items()} == {
        3: "decode_failed", 4: "too_many_pixels", 5: "not_an_image", 6: "image_too_small"}
    assert sorted(pb.rows) == [0, 1, 2, 7]
    assert pb.pixels.shape == (4, 3, 224, 224) and pb.pixels.dtype == torch.uint8


def test_the_two_paths_agree(pool):
    pil, tens = preparers(pool)
    items = [jpeg(photo(s)) for s in range(6)] + [png(photo(9, 320, 240))]
    a, b = pil(items), tens(items)
    assert a.rows == list(range(7)) and sorted(b.rows) == list(range(7))
    pa = a.pixels.float()
    pb = b.pixels[[b.rows.index(i) for i in range(7)]].float()
    diff = (pa - pb).abs()
    # different decoders and resamplers: close, not bit-equal
    assert diff[:6].mean() < 1.5, diff[:6].mean()
    assert torch.equal(pa[6], pb[6])  # the PNG took the same PIL code on both paths


def test_batched_decode_failure_falls_back_per_image(pool, monkeypatch):
    _, tens = preparers(pool)
    items = [jpeg(photo(s, 300, 300)) for s in range(4)]
    marked = items[2]
    real = tens._decode

    def flaky(x, **kw):
        blobs = x if isinstance(x, list) else [x]
        if any(bytes(t.numpy()) == marked for t in blobs):
            raise RuntimeError("nvjpeg: bitstream not supported")
        return real(x, **kw)

    monkeypatch.setattr(tens, "_decode", flaky)
    pb = tens(items)
    assert pb.errors == {} and sorted(pb.rows) == [0, 1, 2, 3] and pb.fallbacks == 1


def test_encoder_tensor_and_pil_paths_give_close_vectors():
    items = [jpeg(photo(s)) for s in range(4)] + [b"junk"]
    encs = [ImageEncoder.load(EncoderSettings(prepare=p, batch_size=4)) for p in ("pil", "tensor")]
    try:
        a, b = (e.encode_images(items) for e in encs)
    finally:
        for e in encs:
            e.close()
    assert isinstance(a[4], ImageError) and isinstance(b[4], ImageError)
    cos = [float(x @ y) for x, y in zip(a[:4], b[:4], strict=True)]
    assert min(cos) > 0.99, cos


def test_process_pool_decode_matches_threads():
    items = [jpeg(photo(s, 400, 300)) for s in range(3)] + [b"junk"]
    encs = [ImageEncoder.load(EncoderSettings(prepare_pool=k, batch_size=4))
            for k in ("thread", "process")]
    try:
        a, b = (e.encode_images(items) for e in encs)
    finally:
        for e in encs:
            e.close()
    assert isinstance(b[3], ImageError) and b[3].reason == "not_an_image"
    for x, y in zip(a[:3], b[:3], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_out_of_memory_halves_the_forward_batch():
    enc = ImageEncoder.load(EncoderSettings(batch_size=8))
    real = enc.tower
    sizes = []

    class Picky(torch.nn.Module):
        def forward(self, x):
            sizes.append(len(x))
            if len(x) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(x)

    items = [jpeg(photo(s, 200, 200)) for s in range(8)]
    try:
        want = enc.encode_images(items)
        enc.tower = Picky()
        got = enc.encode_images(items)
    finally:
        enc.close()
    assert enc.forward_cap == 2 and max(sizes[-4:]) == 2
    for x, y in zip(want, got, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
