"""Measure how far each inference dtype's embeddings are from float32's.

A model's inference dtype (`encoder.model.ModelSpec.cuda_dtype`) is chosen by
this measurement: the same prepared pixels go through the image tower with
its weights in float32 and in each candidate dtype, on one device, and the
per-image cosine between the two L2-normalised embeddings is reported. The
gate for a shipped model is a minimum cosine of `COSINE_GATE` for its own
dtype. Decode differences (nvjpeg against libjpeg-turbo) are kept out: every
dtype sees the very same uint8 pixels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from encoder.config import EncoderSettings
from encoder.engine import ImageEncoder

#: Smallest acceptable cosine between a dtype's embedding and float32's, per image.
COSINE_GATE = 0.999

DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class Agreement:
    """One dtype against float32 on one device."""

    dtype: str
    min_cosine: float
    mean_cosine: float
    images: int
    forward_img_per_s: float

    @property
    def passes(self) -> bool:
        """Whether the minimum cosine meets `COSINE_GATE`."""
        return self.min_cosine >= COSINE_GATE


def _vectors(enc: ImageEncoder, pixels: np.ndarray, batch: int) -> tuple[np.ndarray, float]:
    out: list[np.ndarray] = []
    t = time.perf_counter()
    for i in range(0, len(pixels), batch):
        rows = enc.forward(pixels[i:i + batch])
        out.extend(r if isinstance(r, np.ndarray) else np.full(enc.dim, np.nan) for r in rows)
    return np.stack(out), len(pixels) / (time.perf_counter() - t)


def measure_agreement(settings: EncoderSettings, images: Sequence[bytes],
                      dtypes: Sequence[str] = DTYPES, batch: int = 32) -> list[Agreement]:
    """Min and mean cosine to float32 of every dtype in ``dtypes``, same device, same pixels.

    ``settings`` names the model, checkpoint and device. Images that do not
    decode are skipped. Rates are single-pass forward rates (after a warm-up
    batch), a rough guide only: benchmarks measure speed.
    """
    base = settings.model_copy(update={"dtype": "float32", "batch_size": batch})
    ref = ImageEncoder.load(base)
    try:
        decoded = []
        for data in images:
            try:
                decoded.append(ref.prepare(data))
            except Exception:  # noqa: BLE001 - undecodable images do not measure anything
                continue
        if not decoded:
            raise ValueError("no image decoded: nothing to measure")
        pixels = np.stack(decoded)
        ref.forward(pixels[:batch])
        want, rate32 = _vectors(ref, pixels, batch)
    finally:
        ref.close()
    out = [Agreement("float32", 1.0, 1.0, len(pixels), round(rate32, 1))]
    for dt in dtypes:
        enc = ImageEncoder.load(settings.model_copy(update={"dtype": dt, "batch_size": batch}))
        try:
            enc.forward(pixels[:batch])
            got, rate = _vectors(enc, pixels, batch)
        finally:
            enc.close()
        cos = np.nan_to_num(np.einsum("ij,ij->i", got, want), nan=-1.0)
        out.append(Agreement(dt, round(float(cos.min()), 6), round(float(cos.mean()), 6),
                             len(pixels), round(rate, 1)))
    return out
