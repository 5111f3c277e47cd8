"""Settings of the encoder stage (one section of the project's settings object)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

#: Name of the default model: an open_clip custom CLIP built from the packaged
#: EfficientNet-Lite0 (image) and MiniLM-L6 (text) towers.
DEFAULT_MODEL = "pinfresh-effl0-minilm"


class EncoderSettings(BaseModel):
    """How a worker builds and runs its image encoder.

    Environment variables use the ``PINFRESH_ENCODER__`` prefix, e.g.
    ``PINFRESH_ENCODER__CHECKPOINT=/models/domain-v3``.
    """

    model: str = Field(
        DEFAULT_MODEL,
        description="open_clip model name (ViT-B-32, ViT-L-14, ...) or the built-in default",
    )
    checkpoint: Path | None = Field(
        None,
        description="local checkpoint: a pinfresh checkpoint directory or an open_clip weights "
        "file; never downloaded",
    )
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    batch_size: int = Field(32, ge=1, le=4096, description="images per forward pass")
    prepare_workers: int = Field(2, ge=1, le=64, description="threads decoding images")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="decoded pixel limit (decompression-bomb guard)"
    )
    min_image_side: int = Field(8, ge=1, description="images smaller than this are refused")
    seed: int = Field(0, description="seed for untrained projection weights")
