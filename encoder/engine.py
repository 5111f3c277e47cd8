"""The staged image encoder: prepare -> forward -> finish, overlapped.

`ImageEncoder` wires three stage functions into an `encoder.pipeline.StagedPipeline`
(one thread per stage, bounded queues, a batch dispatched when full or after
``max_wait_s``):

* prepare: image bytes to a ``(M, 3, S, S)`` uint8 batch on the model's device
  (`encoder.prepare_tensor`): PIL on CPU, or batched ``decode_jpeg`` (nvjpeg on
  CUDA) with a per-image PIL fallback. A per-image `ImageError` never fails
  the batch.
* forward: the only code that touches the model. Normalises the batch on the
  device, runs the tower under `torch.inference_mode` (channels_last; on CUDA
  with the weights cast once at load to the model's inference dtype, float16
  or bfloat16, see `encoder.model.ModelSpec`), L2-normalises in float32 and
  flags non-finite rows.
  A CUDA out-of-memory error halves the batch and retries.
* finish: copy-back (on CUDA: a separate stream into pinned host memory,
  waited for here, so the forward stage is already on the next batch) and one
  float32 vector or `ImageError` per item.

On CUDA each stage runs on its own stream and hands over with events, so the
decode of batch n+1, the forward of batch n and the copy-back of batch n-1
overlap on the device as well as on the host. The prepare stage runs in
``decode_lanes`` threads (two on CUDA), each with its own stream, so two
batches decode at once.

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
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from encoder.config import EncoderSettings
from encoder.errors import ConfigError, EncoderUnavailable, ImageError, Reason
from encoder.model import ModelSpec, build_image_tower, model_spec, version_id
from encoder.pipeline import StagedPipeline
from encoder.prepare_tensor import PilPreparer, PreparedBatch, TensorPreparer
from encoder.preprocess import prepare_image
from encoder.types import EncodeResult, EncoderInfo

logger = logging.getLogger(__name__)


#: Batch size on CPU when the settings say 0 (auto).
CPU_BATCH = 32
#: Largest automatic batch on CUDA (the forward rate is flat beyond it for
#: the towers measured, and latency is not).
MAX_AUTO_BATCH = 256


def resolve_device(name: str) -> torch.device:
    """Map ``auto``/``cpu``/``cuda[:N]`` to a torch device, with a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available: use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(name: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """The weights dtype: ``name``; for ``auto`` the model's own on CUDA, float32 on CPU.

    An explicit dtype is honoured on the CPU too (slowly), so precision can be
    measured anywhere (`encoder.precision`).
    """
    if name == "auto":
        chosen = spec.cuda_dtype if device.type == "cuda" else "float32"
    else:
        chosen = name
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[chosen]


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
        # the version names the weights, whatever dtype and device they run in
        self.version = version_id(spec, tower)
        self.dtype = resolve_dtype(settings.dtype, spec, self.device)
        if not self.cuda:
            threads = settings.torch_threads or (os.cpu_count() or 1)
            torch.set_num_threads(threads)
            tower = tower.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # weights cast once here, not autocast per call: measured on an H200, ViT-B-32
        # ran 33,262 img/s with bf16 weights against 22,187 under bf16 autocast
        self.tower = tower.to(self.device, dtype=self.dtype).eval()
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
                            min_side=settings.min_image_side,
                            max_decode_bytes=settings.max_decode_mib << 20)
        if self.cuda:
            self._streams = {k: torch.cuda.Stream(self.device) for k in ("forward", "copy")}
        #: Each prepare lane's own CUDA stream, created by the lane's thread on first use.
        self._lane = threading.local()
        self.decode_lanes = settings.decode_lanes or (2 if self.cuda else 1)
        self.batch_size = settings.batch_size or self._auto_batch()
        self._pipeline: StagedPipeline[bytes, EncodeResult] = StagedPipeline(
            self._prepare_stage, self._forward_stage, self._finish_stage,
            batch_size=self.batch_size, max_wait_s=settings.max_wait_s,
            depth=settings.queue_depth, prepare_lanes=self.decode_lanes,
        )
        self._caller = ThreadPoolExecutor(4, thread_name_prefix="encode-call")
        self._decode_pipe: StagedPipeline[bytes, int] | None = None

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
            "encoder %s loaded: model=%s dim=%d device=%s dtype=%s prepare=%s/%s x%d lanes=%d "
            "batch=%d", enc.version, spec.name, enc.dim, enc.device,
            str(enc.dtype).removeprefix("torch."), enc.prepare_kind, settings.prepare_pool,
            enc.prepare_workers, enc.decode_lanes, enc.batch_size,
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
        self.forward_pixels(x)
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
            max_decode_bytes=self.settings.max_decode_mib << 20,
        )

    def prepare_batch(self, items: Sequence[bytes]) -> PreparedBatch:
        """The configured prepare stage over a batch (on its own stream on CUDA)."""
        if not self.cuda:
            return self.preparer(items)
        s = getattr(self._lane, "stream", None)
        if s is None:
            s = self._lane.stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(s):
            pb = self.preparer(items)
            pb.event = torch.cuda.Event()
            pb.event.record(s)
        return pb

    _prepare_stage = prepare_batch

    def forward_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, 3, S, S) on the device -> (L2-normalised float32 (N, D), finite mask).

        The forward stage's own computation, on the caller's stream (benchmarks
        measure the bare-forward ceiling with it).
        """
        cap = self.forward_cap
        if len(pixels) > cap:
            parts = [self.forward_pixels(pixels[i:i + cap]) for i in range(0, len(pixels), cap)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        try:
            with torch.inference_mode():
                x = ((pixels.float() - self._mean) / self._std).to(self.dtype)
                y = self.tower(x.contiguous(memory_format=torch.channels_last)).float()
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
            return self.forward_pixels(pixels)
        return y, ok

    def _forward_stage(self, pb: PreparedBatch) -> tuple[PreparedBatch, Any, Any, Any]:
        if pb.pixels is None:
            return pb, None, None, None
        with self._lock:
            self.images_forwarded += len(pb.rows)
            self.fallbacks += pb.fallbacks
        if not self.cuda:
            y, ok = self.forward_pixels(pb.pixels)
            return pb, y, ok, None
        fwd, copy = self._streams["forward"], self._streams["copy"]
        with torch.cuda.device(self.device), torch.cuda.stream(fwd):
            fwd.wait_event(pb.event)
            pb.pixels.record_stream(fwd)
            y, ok = self.forward_pixels(pb.pixels)
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
        y, ok = self.forward_pixels(x)
        with self._lock:
            self.images_forwarded += len(batch)
        return _finish_rows(y.cpu().numpy(), ok.cpu().numpy())

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

    def submit(self, items: Sequence[bytes | np.ndarray]) -> list[Future[EncodeResult]]:
        """Queue items (image bytes, or decoded ``(S, S, 3)`` uint8 pixels) without flushing.

        They share batches with everything else submitted, from any thread
        (the encoder process batches across feeders this way); a batch leaves
        when it is full or after ``max_wait_s``. Blocks while the pipeline is full.
        """
        return [self._pipeline.submit(it) for it in items]  # type: ignore[arg-type]

    async def encode_images_async(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """`encode_images` off the event loop (submitting may block on backpressure).

        A stage that fails a whole batch with a device or runtime error (a CUDA
        error or out-of-memory is a `RuntimeError`; one bad image is an
        `ImageError` in the results instead) is an outage of the encoder, as the
        encoder process's is: `EncoderUnavailable`, so the stream retries
        instead of dead-lettering every event of the batch. Any other exception
        is a bug and propagates (the stream isolates the event behind it).
        """
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._caller, self.encode_images, list(items))
        except (NotImplementedError, RecursionError):
            raise
        except (RuntimeError, OSError, MemoryError) as exc:
            raise EncoderUnavailable(
                f"the encoder failed a whole batch ({type(exc).__name__}: {exc}); retried as "
                "an outage: a device that keeps failing needs the worker restarted",
                retry_after=1.0) from exc

    @property
    def on_batch(self) -> Any:
        """Called with ``(size, wait_s)`` for every dispatched batch (metrics hook)."""
        return self._pipeline.on_batch

    @on_batch.setter
    def on_batch(self, fn: Any) -> None:
        self._pipeline.on_batch = fn

    @property
    def pipeline_stats(self) -> Any:
        """Batch sizes, waits, time per stage and peak in-flight items."""
        return self._pipeline.stats

    def decode_only(self, items: Sequence[bytes]) -> int:
        """Run only the prepare stage over ``items``, as the encode pipeline runs it.

        Same batcher, same ``decode_lanes`` (each with its own stream), same
        queues; the forward stage just waits for each batch's decode to
        finish. This is the decode ceiling a benchmark compares the pipeline
        with. Returns how many images decoded.
        """
        if self._decode_pipe is None:
            def wait(pb: PreparedBatch) -> tuple[int, int]:
                if pb.event is not None:
                    pb.event.synchronize()
                return pb.n, len(pb.rows)

            def count(done: tuple[int, int]) -> list[int]:
                n, decoded = done  # one result per item: the batch's count, then zeros
                return [decoded] + [0] * (n - 1)

            self._decode_pipe = StagedPipeline(
                self._prepare_stage, wait, count,
                batch_size=self.batch_size, max_wait_s=self.settings.max_wait_s,
                depth=self.settings.queue_depth, prepare_lanes=self.decode_lanes,
                name="decode-only")
        pipe = self._decode_pipe
        futures = [pipe.submit(it) for it in items]
        pipe.flush()
        return sum(f.result() for f in futures)

    def close(self) -> None:
        """Stop the pipeline threads and the decode pool."""
        if self._decode_pipe is not None:
            self._decode_pipe.close(timeout=5.0)
        self._pipeline.close(timeout=5.0)
        self._caller.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
