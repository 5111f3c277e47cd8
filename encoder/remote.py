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
* a feeder may then send a select frame, ``b"S"`` and the JSON of a registered
  version (`store.registry.VersionInfo`): the server loads that version on its
  device (once, however many feeders ask) and answers with that version's
  hello, or ``{"error": "..."}``; the connection then serves that version. The
  server unloads a version when its last connection closes. Feeders of a
  refresh write every version through the encoder processes this way and never
  load a model themselves;
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

Nothing waits for ever and no batch is too big: when requests wait on a
connection and the encoder sends nothing on it for ``request_timeout_s`` (a
hung GPU, or an encoder that stopped reading), the connection is dropped and
every call waiting on it fails with `EncoderUnavailable` (the next call
reconnects), including one still sending a request that the socket buffers
cannot hold; an encoder that is slow but answers keeps its connection. The
connect and the hello wait ``connect_timeout_s`` at most. A
call's items go out as several requests of at most ``max_request_bytes`` each
(one item over the cap goes alone), so a batch of large images is never
refused for its size; when one of them fails the others are cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoder.config import EncoderSettings
from encoder.errors import ConfigError, EncoderUnavailable, ImageError, Reason
from encoder.preprocess import DEFAULT_MAX_DECODE_BYTES, prepare_image, sniff_format
from encoder.types import EncodeResult, EncoderInfo, PreprocessSpec

logger = logging.getLogger(__name__)

KIND_BYTES = 0
KIND_PIXELS = 1
_HEAD = struct.Struct(">QI")  # request/response id, item count
_ITEM = struct.Struct(">BI")  # kind, length
_LEN = struct.Struct(">I")
#: Largest frame the encoder process accepts.
MAX_FRAME = 1 << 30
#: The most bytes of items a feeder puts in one request (`RemoteEncoder.max_request_bytes`).
MAX_REQUEST_BYTES = 64 << 20


def split_by_bytes(items: Sequence[tuple[int, bytes]], cap: int) -> list[list[int]]:
    """Indices of ``items`` in groups whose bodies sum to at most ``cap`` bytes.

    Groups are consecutive; an item over ``cap`` by itself is a group of its own.
    """
    groups: list[list[int]] = []
    size = 0
    for i, (_, body) in enumerate(items):
        if not groups or size + len(body) > cap:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(body)
    return groups


def frame(payload: bytes) -> bytes:
    """Length-prefix a payload."""
    return _LEN.pack(len(payload)) + payload


def encode_request(req_id: int, items: Sequence[tuple[int, bytes]]) -> list[bytes]:
    """The buffers of one request frame, for ``writelines``.

    asyncio may join them into one copy; the request cap bounds its size.
    """
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


@dataclass(eq=False)
class _Link:
    """One connection to the encoder process and the requests waiting on it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: dict[int, asyncio.Future[list[EncodeResult]]] = field(default_factory=dict)
    recv: asyncio.Task[None] | None = None
    watch: asyncio.Task[None] | None = None
    #: when the encoder last sent a frame, or requests started waiting (loop time)
    heard: float = 0.0


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
    ``request_timeout_s``: how long the encoder may send nothing while
    requests wait; ``max_request_bytes`` caps the items' bytes in one request
    (see the module docstring).
    """

    def __init__(self, path: Path, *, max_pixels: int = 40_000_000, min_side: int = 8,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
                 connect_timeout_s: float = 5.0, request_timeout_s: float = 300.0,
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 select: dict[str, Any] | None = None, load_timeout_s: float = 900.0) -> None:
        self.path = path
        self.load_timeout_s = load_timeout_s
        #: a registered version's info (JSON-ready): the encoder process serves this
        #: connection with that version, loaded there (None: the one it was started with)
        self.select = select
        self.max_pixels, self.min_side = max_pixels, min_side
        self.max_decode_bytes = max_decode_bytes
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_request_bytes = max_request_bytes
        self.hello: Hello | None = None
        self.images_sent = 0
        self.requests_sent = 0
        self.on_batch: Any = None
        self._link: _Link | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, es: EncoderSettings, select: dict[str, Any] | None = None
                      ) -> RemoteEncoder:
        """A client of the encoder process at ``es.remote`` with ``es``'s limits."""
        assert es.remote is not None
        return cls(es.remote, max_pixels=es.max_image_pixels, min_side=es.min_image_side,
                   max_decode_bytes=es.max_decode_mib << 20,
                   request_timeout_s=es.remote_timeout_s,
                   max_request_bytes=int(es.remote_max_request_mib * (1 << 20)), select=select)

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

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (on the current connection)."""
        return len(self._link.pending) if self._link is not None else 0

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
                async with self._lock:
                    if self._link is not None and self.hello is not None:
                        return self.hello  # connected already
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
        except (OSError, TimeoutError) as exc:
            raise EncoderUnavailable(f"encoder at {self.path} unreachable: {exc!r}") from exc
        try:
            hello = Hello(**json.loads(await asyncio.wait_for(read_frame(reader),
                                                              self.connect_timeout_s)))
            if self.select is not None:
                hello = await self._select(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError,
                TypeError) as exc:
            writer.close()
            raise EncoderUnavailable(f"encoder at {self.path} unreachable: {exc!r}") from exc
        except ConfigError as exc:
            writer.close()
            if self.hello is not None:
                # it served this version before (the encoder process restarted, say):
                # an outage to wait out, not a version to give up on mid-batch
                raise EncoderUnavailable(f"encoder at {self.path}: {exc}") from exc
            raise
        except BaseException:  # cancelled while connecting: leave no half-open connection
            writer.close()
            raise
        if self.hello is not None and hello.version != self.hello.version:
            writer.close()
            raise EncoderUnavailable(
                f"the encoder at {self.path} now serves {hello.version}, not "
                f"{self.hello.version}: restart this feeder to follow it")
        self.hello = hello
        link = _Link(reader, writer, heard=asyncio.get_running_loop().time())
        link.recv = asyncio.create_task(self._receive(link, hello.dim))
        link.watch = asyncio.create_task(self._watch(link))
        self._link = link
        logger.info("connected to encoder %s at %s (decode on the %s)", hello.version,
                    self.path, hello.decode)
        return hello

    async def _select(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> Hello:
        """Ask for ``self.select``'s version; its hello (loading may take a while).

        Raises:
            ConfigError: the encoder process cannot load that version.
        """
        assert self.select is not None
        writer.write(frame(b"S" + json.dumps(self.select).encode()))
        await writer.drain()
        # loading a model can take minutes on a busy host: its own, longer deadline
        reply = json.loads(await asyncio.wait_for(read_frame(reader), self.load_timeout_s))
        want = self.select["version"]
        if "error" in reply:
            raise ConfigError(f"the encoder process at {self.path} cannot serve {want}: "
                              f"{reply['error']}")
        hello = Hello(**reply)
        if hello.version != want:
            raise ConfigError(f"the encoder process at {self.path} answered {hello.version} "
                              f"for {want}")
        return hello

    async def _receive(self, link: _Link, dim: int) -> None:
        error = EncoderUnavailable(f"encoder at {self.path} closed the connection")
        loop = asyncio.get_running_loop()
        try:
            while True:
                payload = await read_frame(link.reader)
                link.heard = loop.time()
                req_id, results = decode_response(payload, dim)
                fut = link.pending.pop(req_id, None)
                if fut is None or fut.done():
                    continue  # answered after its caller gave up
                if isinstance(results, EncoderUnavailable):
                    fut.set_exception(results)
                else:
                    fut.set_result(results)
        except Exception as exc:  # noqa: BLE001 - EOF, a reset, or a frame it cannot read
            error = EncoderUnavailable(f"encoder at {self.path} lost: {exc!r}")
        finally:
            self._drop(link, error)

    async def _watch(self, link: _Link) -> None:
        """Drop ``link`` when requests wait and the encoder is silent.

        Silent: nothing received for ``request_timeout_s`` since the last frame
        or since requests started waiting (a hung device, or an encoder that
        stopped reading).
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.request_timeout_s / 4, 5.0))
            quiet = loop.time() - link.heard
            if link.pending and quiet > self.request_timeout_s:
                self._drop(link, EncoderUnavailable(
                    f"encoder at {self.path} sent nothing for {self.request_timeout_s:g} s "
                    f"while {len(link.pending)} requests waited "
                    "(PINFRESH_ENCODER__REMOTE_TIMEOUT_S): dropping the connection"))
                return

    def _drop(self, link: _Link, exc: BaseException) -> None:
        """Close ``link`` and fail every request waiting on it; the next call reconnects."""
        if self._link is link:
            self._link = None
        # abort, not close: close waits to flush what is buffered, which an encoder that
        # stopped reading never takes (nothing on a dropped link is wanted any more)
        link.writer.transport.abort()
        pending, link.pending = link.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
        for task in (link.recv, link.watch):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

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
                                   min_side=self.min_side,
                                   max_decode_bytes=self.max_decode_bytes)
            except ImageError as exc:
                errors[i] = exc
                continue
            send.append((KIND_PIXELS, px.tobytes()))
            rows.append(i)
        return send, errors, rows

    async def encode_images_async(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """Encode in the encoder process; one vector or `ImageError` per item, in order.

        Raises:
            EncoderUnavailable: the encoder process is down, went away or gave
                no answer in time (the caller retries; nothing was written).
        """
        if not items:
            return []
        async with self._lock:
            if self._link is None:
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
            groups = split_by_bytes(send, self.max_request_bytes)
            tasks = [asyncio.ensure_future(self._request([send[j] for j in g]))
                     for g in groups]
            try:
                # one failed request fails the call: its siblings are cancelled, not encoded
                # for nothing (the caller retries the whole call)
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in tasks:
                    t.cancel()
            errors_ = [t.exception() for t in tasks if t.done() and not t.cancelled()]
            first = next((e for e in errors_ if e is not None), None)
            if first is not None:
                raise first
            for g, task in zip(groups, tasks, strict=True):
                for j, res in zip(g, task.result(), strict=True):
                    results[rows[j]] = res
        return [r if r is not None else ImageError(Reason.DECODE_FAILED, "no result")
                for r in results]

    async def _request(self, send: list[tuple[int, bytes]]) -> list[EncodeResult]:
        """One request on the current connection (the link's watchdog bounds the wait)."""
        link = self._link
        if link is None:
            raise EncoderUnavailable(f"encoder at {self.path} went away")
        req_id = next(self._ids)
        fut: asyncio.Future[list[EncodeResult]] = asyncio.get_running_loop().create_future()
        if not link.pending:  # the silence that counts starts when something waits
            link.heard = asyncio.get_running_loop().time()
        link.pending[req_id] = fut
        try:
            link.writer.writelines(encode_request(req_id, send))
            # back-pressure: the encoder is behind. An encoder that stopped reading never
            # lets a request larger than the socket buffers flush, so the drain is raced
            # against the answer, which the watchdog fails when it drops the link
            drain: asyncio.Future[Any] = asyncio.ensure_future(link.writer.drain())
            try:
                await asyncio.wait([drain, fut], return_when=asyncio.FIRST_COMPLETED)
            finally:
                drain.cancel()
            failed = None if drain.cancelled() else drain.exception()
            if failed is not None and not fut.done():
                raise failed
            self.requests_sent += 1
            self.images_sent += len(send)
            return await fut
        except (OSError, RuntimeError) as exc:
            lost = EncoderUnavailable(f"encoder at {self.path} lost: {exc!r}")
            link.pending.pop(req_id, None)
            self._drop(link, lost)
            raise lost from exc
        finally:
            link.pending.pop(req_id, None)  # answered, failed, dropped or cancelled

    async def close(self) -> None:
        """Close the connection (calls in flight fail with `EncoderUnavailable`)."""
        if self._link is not None:
            self._drop(self._link, EncoderUnavailable("closed"))
