"""The staged image encoder: prepare -> forward -> finish.

* prepare: bytes to a uint8 array (`encoder.preprocess.prepare_image`) in a
  thread pool; at most ``2 * batch_size`` images are in flight, so one slow or
  huge image never makes memory grow or holds up the images behind it longer
  than its own decode.
* forward: the only code that touches the model; stacks a batch, normalises
  it on the model's device and runs the tower under `torch.inference_mode`
  (channels_last on CPU, bf16 autocast on CUDA).
* finish: L2-normalise to float32 numpy; a non-finite row becomes an
  `ImageError` for that image only.

Callers (the stream workers, the benchmarks) use `ImageEncoder.encode_images`
or its async twin; a GPU prepare stage can replace `prepare` without the
callers changing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from encoder.config import EncoderSettings
from encoder.errors import EncoderError, ImageError
from encoder.model import ModelSpec, build_image_tower, model_spec, version_id
from encoder.preprocess import prepare_image

logger = logging.getLogger(__name__)

EncodeResult = np.ndarray | ImageError


@dataclass(frozen=True)
class EncoderInfo:
    """What the store needs to know about an encoder."""

    version: str
    dim: int
    model: str
    checkpoint: str | None
    preprocess: dict[str, object]


def resolve_device(name: str) -> torch.device:
    """Map ``auto``/``cpu``/``cuda[:N]`` to a torch device, with a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {name!r} requested but CUDA is not available: use --device cpu")
    return dev


class ImageEncoder:
    """A loaded image tower with its staged prepare/forward/finish path.

    Thread-safety: `encode_images` may be called from one thread at a time
    (the stream worker uses a single forward thread); `prepare` is safe from
    any thread.
    """

    def __init__(self, tower: nn.Module, spec: ModelSpec, settings: EncoderSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.device = resolve_device(settings.device)
        if self.device.type == "cpu":
            threads = settings.torch_threads or (os.cpu_count() or 1)
            torch.set_num_threads(threads)
            tower = tower.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.tower = tower.to(self.device).eval()
        self.version = version_id(spec, tower)
        self.dim = spec.embed_dim
        pre = spec.preprocess
        self._mean = torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._pool = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="prepare")
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._lock = threading.Lock()
        #: Number of images that went through `forward` (tests count re-encodes).
        self.images_forwarded = 0

    @classmethod
    def load(cls, settings: EncoderSettings) -> ImageEncoder:
        """Build the image tower named by the settings and load its weights.

        Raises:
            CheckpointError: unknown model, missing or mismatched checkpoint.
        """
        spec = model_spec(settings.model, settings.checkpoint)
        tower = build_image_tower(spec, settings.checkpoint, seed=settings.seed)
        enc = cls(tower, spec, settings)
        logger.info(
            "encoder %s loaded: model=%s dim=%d device=%s", enc.version, spec.name, enc.dim,
            enc.device,
        )
        return enc

    @property
    def info(self) -> EncoderInfo:
        """Version, dimension and provenance of this encoder."""
        ckpt = self.settings.checkpoint
        return EncoderInfo(
            version=self.version,
            dim=self.dim,
            model=self.spec.name,
            checkpoint=str(ckpt) if ckpt else None,
            preprocess=self.spec.preprocess.to_dict(),
        )

    def prepare(self, data: bytes) -> np.ndarray:
        """Decode one image to the tower's input size (see `prepare_image`)."""
        return prepare_image(
            data,
            self.spec.preprocess,
            max_pixels=self.settings.max_image_pixels,
            min_side=self.settings.min_image_side,
        )

    def forward(self, batch: np.ndarray) -> list[EncodeResult]:
        """Encode a ``(N, S, S, 3)`` uint8 batch; return one vector or error per row."""
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()  # NHWC storage == channels_last NCHW
        x = (x - self._mean) / self._std
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = self.tower(x)
            else:
                y = self.tower(x.contiguous(memory_format=torch.channels_last))
        with self._lock:
            self.images_forwarded += len(batch)
        return self._finish(y.float().cpu().numpy())

    @staticmethod
    def _finish(y: np.ndarray) -> list[EncodeResult]:
        norms = np.linalg.norm(y, axis=1)
        ok = np.isfinite(y).all(axis=1) & (norms > 0)
        out: list[EncodeResult] = []
        for i in range(len(y)):
            if ok[i]:
                out.append((y[i] / norms[i]).astype(np.float32))
            else:
                out.append(ImageError("nonfinite_embedding", "encoder produced non-finite values"))
        return out

    def encode_images(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """Run prepare -> forward -> finish over images; order is preserved.

        Each result is an L2-normalised float32 vector of length `dim`, or the
        `ImageError` that made that one image fail; other images are unaffected.
        """
        results: list[EncodeResult | None] = [None] * len(items)
        window = 2 * self.settings.batch_size
        pending: deque[tuple[int, Future[np.ndarray]]] = deque()
        source = iter(enumerate(items))
        ready_idx: list[int] = []
        ready: list[np.ndarray] = []

        def refill() -> None:
            while len(pending) < window:
                nxt = next(source, None)
                if nxt is None:
                    return
                pending.append((nxt[0], self._pool.submit(self.prepare, nxt[1])))

        def flush() -> None:
            if not ready:
                return
            for i, res in zip(ready_idx, self.forward(np.stack(ready)), strict=True):
                results[i] = res
            ready_idx.clear()
            ready.clear()

        refill()
        while pending:
            idx, fut = pending.popleft()
            refill()
            try:
                ready.append(fut.result())
                ready_idx.append(idx)
            except ImageError as exc:
                results[idx] = exc
            except Exception as exc:  # noqa: BLE001 - one bad image never fails the batch
                results[idx] = ImageError("decode_failed", f"unexpected decoder error: {exc!r}")
            if len(ready) >= self.settings.batch_size:
                flush()
        flush()
        return [r if r is not None else ImageError("decode_failed", "no result") for r in results]

    async def encode_images_async(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """`encode_images` on the encoder's forward thread; never blocks the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._forward_thread, self.encode_images, list(items))

    def close(self) -> None:
        """Stop the prepare and forward threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._forward_thread.shutdown(wait=False, cancel_futures=True)
