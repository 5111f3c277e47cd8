"""Settings of the encoder stage (one section of the project's settings object)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
        description="open_clip model name (ViT-B-32, ViT-L-14, ...), the built-in default, or "
        "'null': a stub that returns a deterministic unit vector per image without decoding "
        "(benchmarks of everything around the encoder; never serve its vectors)",
    )
    checkpoint: Path | None = Field(
        None,
        description="local checkpoint: a pinfresh checkpoint directory or an open_clip weights "
        "file; never downloaded",
    )
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="weights dtype on CUDA, cast once at load; auto = the model's own (its "
        "spec or checkpoint manifest: float16 for the EfficientNet tower, bfloat16 for ViTs); "
        "the CPU always runs float32",
    )
    batch_size: int = Field(
        0, ge=0, le=4096,
        description="images per forward pass; 0 = auto (32 on CPU; on CUDA the largest of "
        "256, 128, ... whose measured activation memory fits a quarter of the free GPU memory)",
    )
    max_wait_s: float = Field(
        0.005, ge=0, le=10,
        description="longest an image waits for its batch to fill before a partial batch is "
        "dispatched",
    )
    queue_depth: int = Field(2, ge=1, le=16, description="batches queued between stages")
    prepare: Literal["auto", "pil", "tensor"] = Field(
        "auto",
        description="decode path: pil (CPU, JPEG draft scaling), tensor (torchvision "
        "decode_jpeg on the model's device -- nvjpeg on CUDA -- with a per-image PIL "
        "fallback); auto = tensor on CUDA, pil on CPU",
    )
    prepare_pool: Literal["thread", "process"] = Field(
        "thread", description="where CPU decodes run: a thread pool or a process pool"
    )
    prepare_workers: int = Field(
        0, ge=0, le=64,
        description="CPU decode threads/processes; 0 = auto (half the cores on a CPU worker, "
        "where the forward pass needs the rest; up to 8 on a GPU worker, for the fallbacks)",
    )
    decode_lanes: int = Field(
        0, ge=0, le=8,
        description="prepare stages running side by side, each its own thread (and CUDA stream "
        "for the JPEG decoder); 0 = auto: 2 on CUDA (measured on an H200: 12,782 img/s "
        "decode+resize with two, 10,960 with one), 1 on CPU",
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="decoded pixel limit (decompression-bomb guard)"
    )
    max_decode_mib: int = Field(
        256, ge=1, description="most MiB one image's decode may hold at once (its pixels in "
        "memory plus the copy its conversion needs, from the header: `encoder.preprocess."
        "decode_bytes`); a bigger one is refused as too_many_pixels before it is decoded. An "
        "in-process worker decodes prepare_workers images at once per version it writes, a "
        "feeder one per batch in flight (docs/integration.md)"
    )
    min_image_side: int = Field(8, ge=1, description="images smaller than this are refused")
    seed: int = Field(0, description="seed for untrained projection weights")
    remote: Path | None = Field(
        None, description="Unix socket of an encoder process (`pinfresh encoder serve`): set, "
        "this worker is a feeder that sends images there instead of loading a model "
        "(`pinfresh worker --feeders N` sets it)",
    )
    remote_wait_s: float = Field(
        600.0, gt=0, description="how long a feeder waits at start for its encoder process "
        "(which may be loading its model)",
    )
    remote_timeout_s: float = Field(
        300.0, gt=0, description="when a feeder's requests wait and its encoder process sends "
        "nothing for this many seconds, the connection is dropped and the requests fail (an "
        "outage: the stream pauses and retries); a slow encoder that answers is not cut off",
    )
    remote_max_request_mib: float = Field(
        64.0, gt=0, le=1000, description="most MiB of images a feeder puts in one request to "
        "its encoder process; a batch over it goes as several requests",
    )
    max_failed_batches: int = Field(
        3, ge=1, description="an encoder process whose batches fail this many times in a row "
        "(a device error: a sticky CUDA error) exits, so that its pool restarts it",
    )
