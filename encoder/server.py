"""The encoder process: one per GPU, serving many feeders over a Unix socket.

`EncoderServer` owns one `ImageEncoder` and accepts any number of feeder
connections (`encoder.remote.RemoteEncoder`). Every connection has a reader
thread that submits each request's items to the encoder's staged pipeline,
where they share batches with every other feeder's items (dynamic batching
across feeders), and a writer thread that sends the responses as their
batches finish. Back-pressure runs end to end: a full pipeline blocks the
reader's ``submit``, the reader stops reading, the socket buffer fills and
the feeder's ``drain`` waits.

Run with ``pinfresh encoder serve --socket PATH`` (the ``--feeders`` pool
starts it). A killed encoder process loses nothing: its feeders' calls fail
with `EncoderUnavailable`, they pause without acknowledging, and retry when
the pool has restarted it. An encoder whose batches fail
``max_failed_batches`` times in a row (``PINFRESH_ENCODER__MAX_FAILED_BATCHES``;
a device error, e.g. a sticky CUDA error) stops and its command exits with
status 3, so that its pool restarts it.

Besides the version it was started with, it serves any registered version a
feeder selects (`encoder.remote`'s select frame): loaded once through
``loader`` on this process's device, shared by every connection that selects
it, unloaded when the last of them closes. A refresh's versions are encoded on
the GPU, and no feeder loads a model.

What it does is counted (`EncoderServer.snapshot`): images held and answered,
batches and their sizes, the last answer's time, feeders connected. The command
serves these as ``pinfresh_encoder_*`` Prometheus metrics with a ``/healthz``
(`EncoderServer.check`: 503 once it is stopping as unhealthy, or when it holds
images and has answered none for ``stall_s``) and reports them to Redis every
few seconds for ``pinfresh status``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from encoder.engine import EncodeResult, ImageEncoder
from encoder.errors import ConfigError, ImageError
from encoder.null import NullEncoder
from encoder.remote import KIND_PIXELS, MAX_FRAME, decode_request, encode_response, frame
from streams import metrics
from streams.runtime.stackstate import proc_started

logger = logging.getLogger(__name__)
_LEN = struct.Struct(">I")

Encoder = ImageEncoder | NullEncoder


def _recv_exactly(sock: socket.socket, n: int) -> memoryview | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None
        got += k
    return view


class EncoderServer:
    """Serves one loaded encoder at a Unix socket (see the module docstring)."""

    def __init__(self, encoder: ImageEncoder | NullEncoder, path: Path,
                 max_failed_batches: int = 3, device: str = "cpu",
                 stall_s: float = 900.0,
                 loader: Callable[[dict[str, Any]], Encoder] | None = None) -> None:
        self.encoder = encoder
        #: loads a registered version from its info (None: serve ``encoder`` only)
        self.loader = loader
        # other versions loaded for feeders that selected them: version -> [encoder, refs]
        self._loaded: dict[str, list[Any]] = {}
        self._busy: dict[str, threading.Event] = {}  # versions being loaded or unloaded
        self._load_lock = threading.Lock()
        #: every version this process loaded (the started one first), for tests and logs
        self.loads: list[str] = [encoder.version]
        self.device = device
        self.stall_s = stall_s
        self.path = path
        self.max_failed_batches = max_failed_batches
        #: set when this process should be replaced (batches kept failing); it stops
        self.unhealthy: str | None = None
        self.failed_in_row = 0
        self._health = threading.Lock()
        # a failed batch puts one exception on every future of it, which may be several
        # requests' (feeders share batches): each failure object counts once
        self._counted: collections.deque[BaseException] = collections.deque(maxlen=256)
        # tensor prepare: JPEGs decode on this device; pil: the feeders decode (this
        # process's CPU runs the forward); the null encoder decodes nothing
        self.decode = {"tensor": "server", "pil": "client"}.get(encoder.prepare_kind, "none")
        self.size = (encoder.spec.preprocess.image_size
                     if isinstance(encoder, ImageEncoder) else 0)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self.connections = 0
        # what `snapshot` reports (under _health)
        self.started_at = time.time()
        self.open_feeders = 0
        self.queued = 0  # images received and not yet answered
        self.images = 0
        self.requests = 0
        self.batches = 0
        self.failed_requests = 0
        self.last_answer_at: float | None = None
        self._waiting_since: float | None = None  # the oldest time queued went above 0
        metrics.ENCODER_INFO.labels(version=encoder.version, device=device).set(1)
        metrics.ENCODER_LAST_BATCH.set(self.started_at)  # "since start" until the first answer
        encoder.on_batch = self._on_batch

    # ------------------------------------------------------------ versions
    def _acquire(self, request: dict[str, Any]) -> Encoder:
        """The encoder of the selected version, loaded on first use; counts a user.

        Loading runs outside the lock: other selects, unloads and the status
        snapshot go on meanwhile; a second select of the same version waits for
        the first one's load (or for an unload of it to finish) instead of
        loading a second copy.

        Raises:
            ConfigError (or any loading error): the version cannot be served here.
        """
        version = str(request["version"])
        if version == self.encoder.version:
            return self.encoder
        while True:
            with self._load_lock:
                held = self._loaded.get(version)
                if held is not None:
                    held[1] += 1
                    return held[0]  # type: ignore[no-any-return]
                busy = self._busy.get(version)
                if busy is None:
                    if self.loader is None:
                        raise ConfigError(
                            f"this encoder process serves {self.encoder.version} only")
                    busy = self._busy[version] = threading.Event()
                    break  # this thread loads it
            busy.wait()  # loading or unloading elsewhere: look again when it is done
        try:
            logger.info("loading version %s on %s for a feeder", version, self.device)
            enc = self.loader(request)
            if enc.version != version:
                enc.close()
                raise ConfigError(f"{version} rebuilds as {enc.version} here")
            enc.on_batch = self._on_batch
            with self._load_lock:
                self._loaded[version] = [enc, 1]
                self.loads.append(version)
                metrics.ENCODER_INFO.labels(version=version, device=self.device).set(1)
            return enc
        finally:
            with self._load_lock:
                self._busy.pop(version, None)
            busy.set()

    def _release(self, enc: Encoder) -> None:
        """A connection that selected ``enc`` closed: unload it after its last user."""
        if enc is self.encoder:
            return
        with self._load_lock:
            held = self._loaded.get(enc.version)
            if held is None or held[0] is not enc:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del self._loaded[enc.version]
            with contextlib.suppress(KeyError):
                metrics.ENCODER_INFO.remove(enc.version, self.device)
            busy = self._busy[enc.version] = threading.Event()  # a select now waits
        logger.info("unloading version %s (no feeder writes it any more)", enc.version)
        try:
            enc.close()
        except Exception:  # noqa: BLE001 - the connection is gone either way
            logger.exception("closing version %s failed", enc.version)
        finally:
            with self._load_lock:
                self._busy.pop(enc.version, None)
            busy.set()

    def versions(self) -> list[str]:
        """The versions loaded now: the started one, then the selected ones."""
        with self._load_lock:
            return [self.encoder.version, *self._loaded]

    def _on_batch(self, size: int, wait_s: float) -> None:
        metrics.ENCODER_BATCH.observe(size)
        metrics.ENCODER_BATCH_WAIT.observe(wait_s)
        with self._health:
            self.batches += 1

    def snapshot(self) -> dict[str, Any]:
        """What this process has done, for ``pinfresh status`` (JSON-ready)."""
        versions = self.versions()
        with self._health:
            return {"version": self.encoder.version, "versions": versions,
                    "device": self.device, "pid": os.getpid(),
                    "proc_started": proc_started(os.getpid()),
                    "socket": str(self.path), "started_at": self.started_at,
                    "feeders": self.open_feeders, "queue_depth": self.queued,
                    "images_total": self.images, "requests_total": self.requests,
                    "batches_total": self.batches, "failed_requests_total": self.failed_requests,
                    "failed_in_row": self.failed_in_row, "last_answer_at": self.last_answer_at,
                    "unhealthy": self.unhealthy}

    def check(self, now: float | None = None) -> tuple[bool, str]:
        """``(alive, one line why)`` for ``/healthz``: the pod's liveness probe."""
        now = time.time() if now is None else now
        with self._health:
            if self.unhealthy:
                return False, f"stopping: {self.unhealthy}"
            since = self._waiting_since
            if self.queued and since is not None:
                last = max(since, self.last_answer_at or 0.0)
                if now - last > self.stall_s:
                    return False, (f"{self.queued} images held and none answered for "
                                   f"{now - last:.0f} s (> {self.stall_s:.0f} s)")
        return True, "ok"

    def hello(self, enc: Encoder | None = None) -> bytes:
        """The JSON hello a feeder reads on connect (or after selecting ``enc``'s version)."""
        enc = enc or self.encoder
        info = enc.info
        decode = {"tensor": "server", "pil": "client"}.get(enc.prepare_kind, "none")
        return json.dumps({"version": info.version, "dim": info.dim, "model": info.model,
                           "checkpoint": info.checkpoint, "preprocess": info.preprocess,
                           "decode": decode}).encode()

    def serve_forever(self, ready: threading.Event | None = None) -> None:
        """Listen and serve until `stop` (or the process ends)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)  # only this user's feeders
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock = sock
        logger.info("encoder %s serving feeders at %s (decode on the %s)",
                    self.encoder.version, self.path, self.decode)
        if ready is not None:
            ready.set()
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                conn.settimeout(None)
                self.connections += 1
                threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name=f"feeder-{self.connections}").start()
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def stop(self) -> None:
        """Stop accepting; open connections end with the process."""
        self._stop.set()

    # --------------------------------------------------------- connection
    def _serve(self, conn: socket.socket) -> None:
        out: queue.Queue[Any] = queue.Queue()
        writer = threading.Thread(target=self._write, args=(conn, out), daemon=True)
        writer.start()
        out.put(frame(self.hello()))
        with self._health:
            self.open_feeders += 1
            metrics.ENCODER_FEEDERS.set(self.open_feeders)
        enc: Encoder = self.encoder
        requests = 0
        try:
            while True:
                head = _recv_exactly(conn, _LEN.size)
                if head is None:
                    break
                (size,) = _LEN.unpack(head)
                if size > MAX_FRAME:
                    raise ValueError(f"frame of {size} bytes")
                payload = _recv_exactly(conn, size)
                if payload is None:
                    break
                if bytes(payload[:1]) == b"S":  # select a version (before any request)
                    if requests:
                        out.put(frame(json.dumps({"error": "select comes before any request "
                                                            "on a connection"}).encode()))
                        continue
                    try:
                        picked = self._acquire(json.loads(bytes(payload[1:])))
                    except Exception as exc:  # noqa: BLE001 - told to the feeder, not raised
                        logger.error("cannot serve a selected version: %s", exc)
                        out.put(frame(json.dumps({"error": str(exc)[:2000]}).encode()))
                        continue
                    old, enc = enc, picked
                    out.put(frame(self.hello(enc)))
                    self._release(old)
                    continue
                requests += 1
                self._request(payload, out, enc)
        except (OSError, ValueError, struct.error) as exc:
            logger.warning("feeder connection dropped: %r", exc)
        finally:
            out.put(None)
            writer.join(timeout=30)
            conn.close()
            self._release(enc)
            with self._health:
                self.open_feeders -= 1
                metrics.ENCODER_FEEDERS.set(self.open_feeders)

    def _request(self, payload: memoryview, out: queue.Queue[Any],
                 enc: Encoder | None = None) -> None:
        enc = enc or self.encoder
        req_id, raw = decode_request(payload)
        size = enc.spec.preprocess.image_size if isinstance(enc, ImageEncoder) else 0
        items: list[Any] = []
        for kind, body in raw:
            if kind == KIND_PIXELS:
                items.append(np.frombuffer(body, dtype=np.uint8).reshape(size, size, 3))
            else:
                items.append(bytes(body))
        self._hold(len(items))
        try:
            futures = enc.submit(items)  # blocks while the pipeline is full
        except BaseException:
            self._answered(len(items), failed=True)  # nothing will answer them: let go
            raise
        n = len(futures)
        lock = threading.Lock()
        left = [n]

        def done(_f: Future[EncodeResult]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                # counted here, not when sent: a feeder gone meanwhile must not leave
                # its images counted as held (the health check would fail for ever)
                self._answered(n, any(f.cancelled() or f.exception() is not None
                                      for f in futures))
                out.put((req_id, futures, enc.dim))

        for f in futures:
            f.add_done_callback(done)

    def _hold(self, n: int) -> None:
        with self._health:
            if not self.queued:
                self._waiting_since = time.time()
            self.queued += n
            metrics.ENCODER_QUEUE.set(self.queued)

    def _answered(self, n: int, failed: bool) -> None:
        now = time.time()
        with self._health:
            self.queued -= n
            self.images += n
            self.requests += 1
            self.failed_requests += int(failed)
            self.last_answer_at = now
            if not self.queued:
                self._waiting_since = None
            metrics.ENCODER_QUEUE.set(self.queued)
        metrics.ENCODER_IMAGES.inc(n)
        metrics.ENCODER_LAST_BATCH.set(now)

    def _count(self, failed: BaseException | None) -> None:
        """Count batches that failed as a whole (a device error), once each.

        After ``max_failed_batches`` in a row the device is taken as broken (a
        sticky CUDA error fails every batch until the process restarts): stop.
        """
        with self._health:
            if failed is None:
                self.failed_in_row = 0
                return
            if any(failed is seen for seen in self._counted):
                return  # another request of the same failed batch
            self._counted.append(failed)
            metrics.ENCODER_FAILED_BATCHES.inc()
            self.failed_in_row += 1
            if self.failed_in_row >= self.max_failed_batches and self.unhealthy is None:
                self.unhealthy = (f"{self.failed_in_row} batches in a row failed (last: "
                                  f"{failed!r})"[:500])
                logger.error("encoder %s: %s; exiting so that the pool restarts it",
                             self.encoder.version, self.unhealthy)
                self.stop()

    def _write(self, conn: socket.socket, out: queue.Queue[Any]) -> None:
        while True:
            msg = out.get()
            if msg is None:
                return
            if isinstance(msg, bytes):
                data = msg
            else:
                req_id, futures, dim = msg
                vecs = np.zeros((len(futures), dim), dtype=np.float32)
                errors: dict[int, ImageError] = {}
                failed: Exception | None = None
                for i, f in enumerate(futures):
                    exc = f.exception()
                    if exc is not None:  # a whole batch failed (a CUDA error): not the image's
                        failed = exc  # fault, so the feeder treats it as an outage
                        continue
                    res = f.result()
                    if isinstance(res, ImageError):
                        errors[i] = res
                    else:
                        vecs[i] = res
                self._count(failed)
                data = frame(encode_response(req_id, vecs, errors, failed=failed))
            try:
                conn.sendall(data)
            except OSError:
                return
