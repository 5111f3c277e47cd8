"""Many feeders, one encoder: the wire protocol and the feeder's client.

One encoder process per GPU (`encoder.server.EncoderServer`) owns the model
and batches across every feeder connected to it; the feeders (stream
workers: consume, validate, fetch, hash, write, commit) talk to it over a
local Unix socket with `RemoteEncoder`, which looks to the stream exactly
like an in-process encoder (`version`, `dim`, `encode_images_async`).

Frames are a 4-byte big-endian length and a payload:

* on connect the server sends a JSON hello: ``version``, ``dim``, ``model``,
  ``checkpoint``, ``preprocess``, ``decode`` (``"server"``: send JPEG bytes,
  the server's device decodes them; ``"client"``: decode everything here, the
  server is a CPU encoder whose cores belong to the forward pass; ``"none"``:
  the null encoder, send bytes as they are);
* a request is ``b"Q"``, an 8-byte id, a 4-byte count, then per item a kind
  byte (0 = encoded image bytes, 1 = decoded ``S x S x 3`` uint8 pixels) and a
  4-byte length, then the item bodies;
* a response is ``b"A"``, the id, the count, a 4-byte length and a JSON
  object of per-item errors (``{"3": ["decode_failed", "..."]}``), then
  ``count x dim`` little-endian float32 (rows of failed items are zero).

Feeders decode non-JPEG images themselves (PIL, in a thread) and send pixels,
so the encoder process spends its CPU on the GPU's work only. A lost
connection fails the calls in flight with `EncoderUnavailable`, which the
stream treats as an outage (pause and retry, nothing acknowledged), and the
next call reconnects.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoder.errors import EncoderUnavailable, ImageError, Reason
from encoder.preprocess import prepare_image, sniff_format
from encoder.types import EncodeResult, EncoderInfo, PreprocessSpec

logger = logging.getLogger(__name__)

KIND_BYTES = 0
KIND_PIXELS = 1
_HEAD = struct.Struct(">QI")  # request/response id, item count
_ITEM = struct.Struct(">BI")  # kind, length
_LEN = struct.Struct(">I")
#: Largest frame accepted (a batch of 20 MiB images would be refused upstream anyway).
MAX_FRAME = 1 << 30


def frame(payload: bytes) -> bytes:
    """Length-prefix a payload."""
    return _LEN.pack(len(payload)) + payload


def encode_request(req_id: int, items: Sequence[tuple[int, bytes]]) -> list[bytes]:
    """The buffers of one request frame (written with ``writelines``, no big copy)."""
    head = b"Q" + _HEAD.pack(req_id, len(items)) + b"".join(
        _ITEM.pack(kind, len(body)) for kind, body in items)
    size = len(head) + sum(len(body) for _, body in items)
    return [_LEN.pack(size), head, *(body for _, body in items)]


def decode_request(payload: memoryview) -> tuple[int, list[tuple[int, memoryview]]]:
    """``(id, [(kind, body), ...])`` of a request payload."""
    if bytes(payload[:1]) != b"Q":
        raise ValueError("not a request frame")
    req_id, n = _HEAD.unpack_from(payload, 1)
    pos = 1 + _HEAD.size
    kinds = []
    for _ in range(n):
        kinds.append(_ITEM.unpack_from(payload, pos))
        pos += _ITEM.size
    items = []
    for kind, length in kinds:
        items.append((kind, payload[pos:pos + length]))
        pos += length
    return req_id, items


def encode_response(req_id: int, vectors: np.ndarray, errors: dict[int, ImageError],
                    failed: BaseException | None = None) -> bytes:
    """One response payload (unframed); ``failed``: the request as a whole failed."""
    out: dict[str, Any] = {str(i): [e.reason.value, str(e)] for i, e in errors.items()}
    if failed is not None:
        out["*"] = repr(failed)[:500]
    err = json.dumps(out).encode()
    return (b"A" + _HEAD.pack(req_id, len(vectors)) + _LEN.pack(len(err)) + err
            + np.ascontiguousarray(vectors, dtype="<f4").tobytes())


def decode_response(payload: bytes, dim: int
                    ) -> tuple[int, list[EncodeResult] | EncoderUnavailable]:
    """``(id, one vector or ImageError per item)`` of a response payload.

    A request that failed as a whole (the encoder's batch raised) comes back
    as an `EncoderUnavailable` instead of the list.
    """
    if payload[:1] != b"A":
        raise ValueError("not a response frame")
    req_id, n = _HEAD.unpack_from(payload, 1)
    pos = 1 + _HEAD.size
    (elen,) = _LEN.unpack_from(payload, pos)
    pos += _LEN.size
    errors = json.loads(payload[pos:pos + elen])
    pos += elen
    if "*" in errors:
        return req_id, EncoderUnavailable(f"the encoder failed this batch: {errors['*']}")
    vecs = np.frombuffer(payload, dtype="<f4", count=n * dim, offset=pos).reshape(n, dim)
    out: list[EncodeResult] = []
    for i in range(n):
        e = errors.get(str(i))
        out.append(ImageError(Reason(e[0]), e[1]) if e
                   else np.array(vecs[i], dtype=np.float32))
    return req_id, out


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One frame's payload; raises `asyncio.IncompleteReadError` at EOF."""
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME} limit")
    return await reader.readexactly(size)


@dataclass(frozen=True)
class Hello:
    """What the encoder process tells a feeder on connect."""

    version: str
    dim: int
    model: str
    checkpoint: str | None
    preprocess: dict[str, Any]
    decode: str  # "server" or "client"

    @property
    def info(self) -> EncoderInfo:
        """As the store's registry wants it."""
        return EncoderInfo(self.version, self.dim, self.model, self.checkpoint, self.preprocess)


class RemoteEncoder:
    """A feeder's handle on the encoder process at a Unix socket ``path``.

    Call `connect` once before use (it waits for the encoder process, which
    may still be loading its model); later calls reconnect by themselves.
    """

    def __init__(self, path: Path, *, max_pixels: int = 40_000_000, min_side: int = 8,
                 connect_timeout_s: float = 5.0) -> None:
        self.path = path
        self.max_pixels, self.min_side = max_pixels, min_side
        self.connect_timeout_s = connect_timeout_s
        self.hello: Hello | None = None
        self.images_sent = 0
        self.on_batch: Any = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[list[EncodeResult]]] = {}
        self._ids = itertools.count(1)
        self._recv: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ identity
    def _need_hello(self) -> Hello:
        if self.hello is None:
            raise EncoderUnavailable(f"not connected to the encoder at {self.path}")
        return self.hello

    @property
    def version(self) -> str:
        """The model version the encoder process serves."""
        return self._need_hello().version

    @property
    def dim(self) -> int:
        """Its embedding dimension."""
        return self._need_hello().dim

    @property
    def info(self) -> EncoderInfo:
        """Version, dimension and provenance, as the encoder process reported them."""
        return self._need_hello().info

    # ---------------------------------------------------------- connection
    async def connect(self, wait_s: float = 0.0) -> Hello:
        """Connect (retrying for up to ``wait_s`` while the socket is not there yet).

        Raises:
            EncoderUnavailable: no encoder answered in time, or it serves
                another model version than this client saw before.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                return await self._connect_once()
            except EncoderUnavailable:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _connect_once(self) -> Hello:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=1 << 20),
                self.connect_timeout_s)
            hello = Hello(**json.loads(await asyncio.wait_for(read_frame(reader),
                                                              self.connect_timeout_s)))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            raise EncoderUnavailable(f"encoder at {self.path} unreachable: {exc!r}") from exc
        if self.hello is not None and hello.version != self.hello.version:
            writer.close()
            raise EncoderUnavailable(
                f"the encoder at {self.path} now serves {hello.version}, not "
                f"{self.hello.version}: restart this feeder to follow it")
        self.hello, self._reader, self._writer = hello, reader, writer
        self._recv = asyncio.create_task(self._receive(reader))
        logger.info("connected to encoder %s at %s (decode on the %s)", hello.version,
                    self.path, hello.decode)
        return hello

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        dim = self._need_hello().dim
        error: BaseException = EncoderUnavailable(f"encoder at {self.path} closed the connection")
        try:
            while True:
                req_id, results = decode_response(await read_frame(reader), dim)
                fut = self._pending.pop(req_id, None)
                if fut is None or fut.done():
                    continue
                if isinstance(results, EncoderUnavailable):
                    fut.set_exception(results)
                else:
                    fut.set_result(results)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            error = EncoderUnavailable(f"encoder at {self.path} lost: {exc!r}")
        finally:
            self._fail_pending(error)

    def _fail_pending(self, exc: BaseException) -> None:
        self._writer, self._reader = None, None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    # ------------------------------------------------------------- encode
    def _local_items(self, items: Sequence[bytes], hello: Hello
                     ) -> tuple[list[tuple[int, bytes]], dict[int, ImageError], list[int]]:
        """What to send: JPEG bytes for a decoding server, pixels for everything else."""
        if hello.decode == "none":  # the null encoder: bytes as they are
            return [(KIND_BYTES, data) for data in items], {}, list(range(len(items)))
        spec = PreprocessSpec.from_dict(hello.preprocess)
        send: list[tuple[int, bytes]] = []
        errors: dict[int, ImageError] = {}
        rows: list[int] = []
        for i, data in enumerate(items):
            if hello.decode == "server" and sniff_format(data) == "JPEG":
                send.append((KIND_BYTES, data))
                rows.append(i)
                continue
            try:
                px = prepare_image(data, spec, max_pixels=self.max_pixels,
                                   min_side=self.min_side)
            except ImageError as exc:
                errors[i] = exc
                continue
            send.append((KIND_PIXELS, px.tobytes()))
            rows.append(i)
        return send, errors, rows

    async def encode_images_async(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """Encode in the encoder process; one vector or `ImageError` per item, in order.

        Raises:
            EncoderUnavailable: the encoder process is down or went away
                mid-call (the caller retries; nothing was written).
        """
        if not items:
            return []
        async with self._lock:
            if self._writer is None:
                await self._connect_once()
        hello = self._need_hello()
        if hello.decode == "none":  # nothing to decode: no thread hand-off either
            send, errors, rows = self._local_items(items, hello)
        else:
            send, errors, rows = await asyncio.to_thread(self._local_items, items, hello)
        results: list[EncodeResult | None] = [None] * len(items)
        for i, e in errors.items():
            results[i] = e
        if send:
            req_id = next(self._ids)
            fut: asyncio.Future[list[EncodeResult]] = asyncio.get_running_loop().create_future()
            self._pending[req_id] = fut
            writer = self._writer
            if writer is None:
                self._pending.pop(req_id, None)
                raise EncoderUnavailable(f"encoder at {self.path} went away")
            try:
                writer.writelines(encode_request(req_id, send))
                await writer.drain()  # back-pressure: the encoder is behind
            except (OSError, RuntimeError) as exc:
                self._pending.pop(req_id, None)
                raise EncoderUnavailable(f"encoder at {self.path} lost: {exc!r}") from exc
            self.images_sent += len(send)
            for i, res in zip(rows, await fut, strict=True):
                results[i] = res
        return [r if r is not None else ImageError(Reason.DECODE_FAILED, "no result")
                for r in results]

    async def close(self) -> None:
        """Close the connection (calls in flight fail with `EncoderUnavailable`)."""
        if self._writer is not None:
            self._writer.close()
        if self._recv is not None:
            self._recv.cancel()
        self._fail_pending(EncoderUnavailable("closed"))
