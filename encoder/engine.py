"""The staged image encoder: prepare -> forward -> finish, overlapped.

`ImageEncoder` wires three stage functions into an `encoder.pipeline.StagedPipeline`
(one thread per stage, bounded queues, a batch dispatched when full or after
``max_wait_s``):

* prepare: image bytes to a ``(M, 3, S, S)`` uint8 batch on the model's device
  (`encoder.prepare_tensor`): PIL on CPU, or batched ``decode_jpeg`` (nvjpeg on
  CUDA) with a per-image PIL fallback. A per-image `ImageError` never fails
  the batch.
* forward: the only code that touches the model. Normalises the batch on the
  device, runs the tower under `torch.inference_mode` (channels_last on CPU,
  bf16 autocast on CUDA), L2-normalises in float32 and flags non-finite rows.
  A CUDA out-of-memory error halves the batch and retries.
* finish: copy-back (on CUDA: a separate stream into pinned host memory,
  waited for here, so the forward stage is already on the next batch) and one
  float32 vector or `ImageError` per item.

On CUDA each stage runs on its own stream and hands over with events, so the
decode of batch n+1, the forward of batch n and the copy-back of batch n-1
overlap on the device as well as on the host.

Callers (the stream workers, the benchmarks) use `ImageEncoder.encode_images`
or its async twin, from any number of threads.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from encoder.config import EncoderSettings
from encoder.errors import EncoderError, ImageError, Reason
from encoder.model import ModelSpec, build_image_tower, model_spec, version_id
from encoder.pipeline import StagedPipeline
from encoder.prepare_tensor import PilPreparer, PreparedBatch, TensorPreparer
from encoder.preprocess import prepare_image

logger = logging.getLogger(__name__)

EncodeResult = np.ndarray | ImageError

#: Batch size on CPU when the settings say 0 (auto).
CPU_BATCH = 32
#: Largest automatic batch on CUDA (the forward rate is flat beyond it for
#: the towers measured, and latency is not).
MAX_AUTO_BATCH = 256


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
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _finish_rows(y: np.ndarray, ok: np.ndarray) -> list[EncodeResult]:
    out: list[EncodeResult] = []
    for i in range(len(y)):
        if ok[i]:
            out.append(np.array(y[i], dtype=np.float32))
        else:
            out.append(ImageError(Reason.NONFINITE_EMBEDDING, "encoder produced non-finite values"))
    return out


class ImageEncoder:
    """A loaded image tower with its staged, overlapped encode path."""

    def __init__(self, tower: nn.Module, spec: ModelSpec, settings: EncoderSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.cuda = self.device.type == "cuda"
        if not self.cuda:
            threads = settings.torch_threads or (os.cpu_count() or 1)
            torch.set_num_threads(threads)
            tower = tower.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.tower = tower.to(self.device).eval()
        self.version = version_id(spec, tower)
        self.dim = spec.embed_dim
        pre = spec.preprocess
        self._mean = torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._lock = threading.Lock()
        #: Number of images that went through `forward` (tests count re-encodes).
        self.images_forwarded = 0
        #: Images the tensor path handed to the CPU decoder (a metric).
        self.fallbacks = 0
        #: Largest batch the forward stage runs at once (lowered after an OOM).
        self.forward_cap = 1 << 30

        cores = os.cpu_count() or 1
        self.prepare_workers = settings.prepare_workers or (
            min(8, cores) if self.cuda else max(1, cores // 2))
        self._pool = self._make_pool(settings.prepare_pool, self.prepare_workers)
        kind = settings.prepare
        if kind == "auto":
            kind = "tensor" if self.cuda else "pil"
        self.prepare_kind = kind
        cls = TensorPreparer if kind == "tensor" else PilPreparer
        self.preparer = cls(pre, self.device, pool=self._pool,
                            max_pixels=settings.max_image_pixels,
                            min_side=settings.min_image_side)
        if self.cuda:
            self._streams = {k: torch.cuda.Stream(self.device) for k in ("prepare", "forward",
                                                                        "copy")}
        self.batch_size = settings.batch_size or self._auto_batch()
        self._pipeline: StagedPipeline[bytes, EncodeResult] = StagedPipeline(
            self._prepare_stage, self._forward_stage, self._finish_stage,
            batch_size=self.batch_size, max_wait_s=settings.max_wait_s,
            depth=settings.queue_depth,
        )
        self._caller = ThreadPoolExecutor(4, thread_name_prefix="encode-call")

    @staticmethod
    def _make_pool(kind: str, workers: int) -> Executor:
        if kind == "process":
            # forkserver: never fork a process that holds torch's threads
            ctx = multiprocessing.get_context("forkserver")
            return ProcessPoolExecutor(workers, mp_context=ctx)
        return ThreadPoolExecutor(workers, thread_name_prefix="prepare")

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
            "encoder %s loaded: model=%s dim=%d device=%s prepare=%s/%s x%d batch=%d",
            enc.version, spec.name, enc.dim, enc.device, enc.prepare_kind,
            settings.prepare_pool, enc.prepare_workers, enc.batch_size,
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

    # --------------------------------------------------------- batch sizing
    def _auto_batch(self) -> int:
        """32 on CPU; on CUDA the largest power of two <= 256 whose activations fit.

        Measures the peak memory of a forward at batch 8 and keeps the batch's
        estimated peak under a quarter of the free memory, leaving room for the
        queued batches, the decoder's buffers and other processes.
        """
        if not self.cuda:
            return CPU_BATCH
        probe = 8
        size = self.spec.preprocess.image_size
        x = torch.randint(0, 256, (probe, 3, size, size), dtype=torch.uint8, device=self.device)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._forward_tensor(x)
        torch.cuda.synchronize(self.device)
        per_image = max(1, (torch.cuda.max_memory_allocated(self.device) - base) // probe)
        free, _total = torch.cuda.mem_get_info(self.device)
        batch = MAX_AUTO_BATCH
        while batch > 1 and batch * per_image > free // 4:
            batch //= 2
        logger.info("auto batch %d: %.1f MB activations per image, %.1f GB free", batch,
                    per_image / 2**20, free / 2**30)
        return batch

    # ---------------------------------------------------------------- stages
    def prepare(self, data: bytes) -> np.ndarray:
        """Decode one image on the CPU to ``(S, S, 3)`` uint8 (see `prepare_image`)."""
        return prepare_image(
            data,
            self.spec.preprocess,
            max_pixels=self.settings.max_image_pixels,
            min_side=self.settings.min_image_side,
        )

    def prepare_batch(self, items: Sequence[bytes]) -> PreparedBatch:
        """The configured prepare stage over a batch (on its own stream on CUDA)."""
        if not self.cuda:
            return self.preparer(items)
        s = self._streams["prepare"]
        with torch.cuda.device(self.device), torch.cuda.stream(s):
            pb = self.preparer(items)
            pb.event = torch.cuda.Event()
            pb.event.record(s)
        return pb

    _prepare_stage = prepare_batch

    def _forward_tensor(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, 3, S, S) on the device -> (L2-normalised float32 (N, D), finite mask)."""
        cap = self.forward_cap
        if len(pixels) > cap:
            parts = [self._forward_tensor(pixels[i:i + cap]) for i in range(0, len(pixels), cap)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        try:
            with torch.inference_mode():
                x = (pixels.float() - self._mean) / self._std
                if self.cuda:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        y = self.tower(x.contiguous(memory_format=torch.channels_last))
                else:
                    y = self.tower(x.contiguous(memory_format=torch.channels_last))
                y = y.float()
                norms = torch.linalg.vector_norm(y, dim=1, keepdim=True)
                ok = torch.isfinite(y).all(dim=1) & (norms[:, 0] > 0)
                y = y / norms.clamp_min(1e-12)
        except torch.OutOfMemoryError:
            if len(pixels) <= 1:
                raise
            self.forward_cap = max(1, len(pixels) // 2)
            logger.warning("CUDA out of memory at batch %d: forward batches capped at %d",
                           len(pixels), self.forward_cap)
            torch.cuda.empty_cache()
            return self._forward_tensor(pixels)
        return y, ok

    def _forward_stage(self, pb: PreparedBatch) -> tuple[PreparedBatch, Any, Any, Any]:
        if pb.pixels is None:
            return pb, None, None, None
        with self._lock:
            self.images_forwarded += len(pb.rows)
            self.fallbacks += pb.fallbacks
        if not self.cuda:
            y, ok = self._forward_tensor(pb.pixels)
            return pb, y, ok, None
        fwd, copy = self._streams["forward"], self._streams["copy"]
        with torch.cuda.device(self.device), torch.cuda.stream(fwd):
            fwd.wait_event(pb.event)
            pb.pixels.record_stream(fwd)
            y, ok = self._forward_tensor(pb.pixels)
        copy.wait_stream(fwd)
        with torch.cuda.device(self.device), torch.cuda.stream(copy):
            host_y = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
            host_ok = torch.empty(ok.shape, dtype=torch.bool, pin_memory=True)
            host_y.copy_(y, non_blocking=True)
            host_ok.copy_(ok, non_blocking=True)
            y.record_stream(copy)
            ok.record_stream(copy)
            done = torch.cuda.Event()
            done.record(copy)
        pb.pixels = None  # the device batch can go back to the allocator
        return pb, host_y, host_ok, done

    def _finish_stage(self, payload: tuple[PreparedBatch, Any, Any, Any]) -> list[EncodeResult]:
        pb, y, ok, done = payload
        if done is not None:
            done.synchronize()
        results: list[EncodeResult | None] = [None] * pb.n
        for i, err in pb.errors.items():
            results[i] = err
        if y is not None:
            rows = _finish_rows(y.numpy(), ok.numpy())
            for i, res in zip(pb.rows, rows, strict=True):
                results[i] = res
        return [r if r is not None else ImageError(Reason.DECODE_FAILED, "no result")
                for r in results]

    # ---------------------------------------------------------- public API
    def forward(self, batch: np.ndarray) -> list[EncodeResult]:
        """Encode a ``(N, S, S, 3)`` uint8 batch synchronously (benchmarks, tools)."""
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
        y, ok = self._forward_tensor(x)
        with self._lock:
            self.images_forwarded += len(batch)
        return _finish_rows(y.cpu().numpy(), ok.cpu().numpy())

    @staticmethod
    def _finish(y: np.ndarray) -> list[EncodeResult]:
        """Unnormalised (N, D) float rows -> unit vectors, non-finite rows -> errors."""
        norms = np.linalg.norm(y, axis=1)
        ok = np.isfinite(y).all(axis=1) & (norms > 0)
        safe = np.where(ok[:, None], y / np.where(norms > 0, norms, 1.0)[:, None], 0.0)
        return _finish_rows(safe.astype(np.float32), ok)

    def encode_images(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """Run prepare -> forward -> finish over images; order is preserved.

        Each result is an L2-normalised float32 vector of length `dim`, or the
        `ImageError` that made that one image fail; other images are unaffected.
        Safe to call from several threads at once: their images share batches.

        Raises:
            Exception: whatever a stage raised for a whole batch (a CUDA error,
                say); the caller must not treat those images as done.
        """
        if not items:
            return []
        return self._pipeline.map(items)

    async def encode_images_async(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """`encode_images` off the event loop (submitting may block on backpressure)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._caller, self.encode_images, list(items))

    @property
    def on_batch(self) -> Any:
        """Called with ``(size, wait_s)`` for every dispatched batch (metrics hook)."""
        return self._pipeline._on_batch

    @on_batch.setter
    def on_batch(self, fn: Any) -> None:
        self._pipeline._on_batch = fn

    @property
    def pipeline_stats(self) -> Any:
        """Batch sizes, waits, time per stage and peak in-flight items."""
        return self._pipeline.stats

    def close(self) -> None:
        """Stop the pipeline threads and the decode pool."""
        self._pipeline.close(timeout=5.0)
        self._caller.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
