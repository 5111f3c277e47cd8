"""Prepare stages that produce a batch tensor: the GPU (nvjpeg) one and the CPU one.

Both return a `PreparedBatch`: ``(M, 3, S, S)`` uint8 pixels on the model's
device for the M images that decoded, which item each row belongs to, and an
`ImageError` for every item that did not. The forward stage normalises.

* `PilPreparer`: the CPU path. `prepare_image` (PIL, JPEG draft scaling) for
  every item, in a thread pool or a process pool.
* `TensorPreparer`: JPEGs go through ``torchvision.io.decode_jpeg`` as one
  batch (nvjpeg on CUDA, libjpeg-turbo on CPU), then a centre crop and an
  antialiased bicubic resize on the device, grouped by size so that a batch of
  equal-sized photos is one kernel per step. Everything else (PNG, GIF, WebP,
  CMYK or 12-bit JPEGs, JPEGs without an end marker, anything nvjpeg refuses)
  goes to the CPU `prepare_image` per image. Those fallbacks start first and
  run in the CPU pool while the device decodes the rest, so a PNG in a batch
  of JPEGs costs the batch no more than its own decode.

Header checks (pixel limit, minimum side) happen before any decode on either
path, so a decompression bomb never reaches nvjpeg. An item may also arrive
already decoded, as ``(S, S, 3)`` uint8 pixels (a feeder decoded it,
`encoder.remote`): it is stacked as is.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch convention

from encoder.errors import ImageError, Reason
from encoder.jpeg import read_header
from encoder.model import PreprocessSpec
from encoder.preprocess import DEFAULT_MAX_DECODE_BYTES, prepare_image, sniff_format

logger = logging.getLogger(__name__)

# decode_jpeg only reads the buffer; torchvision >= 0.29 marks its image IO as
# deprecated in favour of torchcodec, which this project does not ship.
warnings.filterwarnings("ignore", message="The given buffer is not writable")
warnings.filterwarnings("ignore", message=".*decod.*deprecated.*", category=UserWarning)
warnings.filterwarnings("ignore", message=".*TorchCodec.*")

@dataclass
class PreparedBatch:
    """Output of a prepare stage."""

    n: int
    pixels: torch.Tensor | None  # (M, 3, S, S) uint8 on the device
    rows: list[int]  # item index of each row of `pixels`
    errors: dict[int, ImageError] = field(default_factory=dict)
    #: Images decoded by the CPU fallback (TensorPreparer) -- a metric.
    fallbacks: int = 0
    #: CUDA event recorded after the last kernel of the stage (None on CPU).
    event: Any = None


def _pil(data: bytes, spec: PreprocessSpec, max_pixels: int, min_side: int,
         max_decode_bytes: int) -> np.ndarray:
    return prepare_image(data, spec, max_pixels=max_pixels, min_side=min_side,
                         max_decode_bytes=max_decode_bytes)


def _collect(fut: Future[np.ndarray]) -> np.ndarray | ImageError:
    try:
        return fut.result()
    except ImageError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - one bad image never fails the batch
        return ImageError(Reason.DECODE_FAILED, f"unexpected decoder error: {exc!r}")


def _stack_hwc(arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """(N, S, S, 3) uint8 arrays -> (N, 3, S, S) uint8 tensor (channels_last strides)."""
    t = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t


class _CpuDecoder:
    """Shared by both prepare stages: per-image `prepare_image` calls in ``pool``."""

    def __init__(self, spec: PreprocessSpec, device: torch.device, *, pool: Executor,
                 max_pixels: int, min_side: int,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> None:
        self.spec, self.device, self.pool = spec, device, pool
        self.max_pixels, self.min_side = max_pixels, min_side
        self.max_decode_bytes = max_decode_bytes

    def _submit(self, data: bytes | np.ndarray) -> Future[np.ndarray]:
        if isinstance(data, np.ndarray):  # decoded by a feeder already (encoder.remote)
            done: Future[np.ndarray] = Future()
            done.set_result(data)
            return done
        return self.pool.submit(_pil, data, self.spec, self.max_pixels, self.min_side,
                                self.max_decode_bytes)

    @staticmethod
    def _gather(futures: dict[int, Future[np.ndarray]], errors: dict[int, ImageError]
                ) -> tuple[list[int], list[np.ndarray]]:
        """Wait for ``futures`` in item order; failures go to ``errors``."""
        rows: list[int] = []
        arrays: list[np.ndarray] = []
        for i in sorted(futures):
            res = _collect(futures[i])
            if isinstance(res, ImageError):
                errors[i] = res
            else:
                rows.append(i)
                arrays.append(res)
        return rows, arrays


class PilPreparer(_CpuDecoder):
    """The CPU prepare stage: `prepare_image` for each item in ``pool``."""

    def __call__(self, items: Sequence[bytes]) -> PreparedBatch:
        """Decode every item in the pool; failures become per-item errors."""
        errors: dict[int, ImageError] = {}
        rows, arrays = self._gather({i: self._submit(d) for i, d in enumerate(items)}, errors)
        pixels = _stack_hwc(arrays, self.device) if arrays else None
        return PreparedBatch(len(items), pixels, rows, errors)


class TensorPreparer(_CpuDecoder):
    """Batched ``decode_jpeg`` on ``device`` with a per-image CPU fallback."""

    def __init__(self, spec: PreprocessSpec, device: torch.device, *, pool: Executor,
                 max_pixels: int, min_side: int,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> None:
        super().__init__(spec, device, pool=pool, max_pixels=max_pixels, min_side=min_side,
                         max_decode_bytes=max_decode_bytes)
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode = decode_jpeg
        self._rgb = ImageReadMode.RGB

    def route(self, data: bytes | np.ndarray) -> str | ImageError:
        """``"device"`` or ``"cpu"`` for one image, or the error its header proves."""
        if isinstance(data, np.ndarray):
            return "cpu"  # decoded pixels: stacked with the CPU fallbacks, no decode
        if sniff_format(data) != "JPEG":
            return "cpu"  # PNG/GIF/WebP/BMP, or not an image: PIL says which
        hdr = read_header(data)
        if hdr is None:
            return "cpu"
        if hdr.width * hdr.height > self.max_pixels:
            return ImageError(Reason.TOO_MANY_PIXELS, f"{hdr.width}x{hdr.height} = "
                              f"{hdr.width * hdr.height} pixels > limit {self.max_pixels}")
        if min(hdr.width, hdr.height) < self.min_side:
            return ImageError(Reason.IMAGE_TOO_SMALL,
                              f"{hdr.width}x{hdr.height} is below {self.min_side} px")
        if hdr.width * hdr.height * 3 > self.max_decode_bytes:  # decoded at full size
            mib = 2 ** 20
            return ImageError(Reason.TOO_MANY_PIXELS, f"{hdr.width}x{hdr.height} JPEG would take "
                              f"about {hdr.width * hdr.height * 3 / mib:.0f} MiB to decode > "
                              f"limit {self.max_decode_bytes / mib:.0f} MiB")
        if not hdr.gpu_decodable:
            return "cpu"  # CMYK/YCCK, 12-bit, arithmetic or lossless coding
        if data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
            return "cpu"  # no end marker: truncated; PIL refuses it with a reason
        return "device"

    def __call__(self, items: Sequence[bytes]) -> PreparedBatch:
        """Route, decode (device batch + CPU fallbacks in parallel), resize, stack."""
        errors: dict[int, ImageError] = {}
        fallback: dict[int, Future[np.ndarray]] = {}
        on_device: list[int] = []
        for i, data in enumerate(items):
            r = self.route(data)
            if isinstance(r, ImageError):
                errors[i] = r
            elif r == "cpu":
                fallback[i] = self._submit(data)
            else:
                on_device.append(i)
        decoded, failed = self._decode_batch([items[i] for i in on_device])
        for j in failed:  # nvjpeg refused it: the CPU decoder gets a go
            fallback[on_device[j]] = self._submit(items[on_device[j]])
        rows = [on_device[j] for j in range(len(on_device)) if j not in failed]
        parts = [self._resize(decoded)] if decoded else []
        cpu_rows, cpu_arrays = self._gather(fallback, errors)
        if cpu_arrays:
            parts.append(_stack_hwc(cpu_arrays, self.device))
            rows.extend(cpu_rows)
        pixels = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
        return PreparedBatch(len(items), pixels, rows, errors, fallbacks=len(fallback))

    def _decode_batch(self, blobs: list[bytes]) -> tuple[list[torch.Tensor], set[int]]:
        """Decode JPEGs to (3, H, W) uint8 on the device; indexes that failed."""
        if not blobs:
            return [], set()
        tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]
        try:
            out = self._decode(tensors, mode=self._rgb, device=self.device)
            return list(out), set()
        except RuntimeError as exc:
            # one bad bitstream fails the whole batched call: find it
            logger.debug("batched decode failed (%s); decoding one by one", exc)
        good: list[torch.Tensor] = []
        failed: set[int] = set()
        for j, t in enumerate(tensors):
            try:
                good.append(self._decode(t, mode=self._rgb, device=self.device))
            except RuntimeError:
                failed.add(j)
        return good, failed

    def _resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Centre square crop + antialiased bicubic resize, grouped by input size."""
        size = self.spec.image_size
        out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=self.device)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for k, img in enumerate(images):
            groups[(img.shape[1], img.shape[2])].append(k)
        for (h, w), idx in groups.items():
            # one kernel per same-size group: a batch of equal-sized photos is one call
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            x = torch.stack([images[k][:, top:top + side, left:left + side] for k in idx])
            out[idx] = resize_square(x, size)
        return out


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, s, s) uint8 -> (N, 3, size, size) uint8, antialiased bicubic (PIL-like)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True,
                      align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)
