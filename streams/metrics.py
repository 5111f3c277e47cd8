"""Every Prometheus metric of the workers and encoder processes, declared in one place.

Workers expose them on ``PINFRESH_WORKER__METRICS_PORT`` (off by default), beside
``/healthz``: the worker's liveness (`Liveness`), for the pod's probe. An encoder
process (``pinfresh encoder serve``) serves the ``pinfresh_encoder_*`` ones the
same way (the pool gives it the port after its stream processes').
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

EVENTS = Counter("pinfresh_events_total", "Events consumed, by outcome", ["outcome"])
IMAGES_ENCODED = Counter("pinfresh_images_encoded_total", "Images run through the encoder")
DEAD_LETTERS = Counter("pinfresh_dead_letters_total", "Dead letters written, by reason", ["reason"])
DEAD_LETTERS_DROPPED = Counter(
    "pinfresh_dead_letters_dropped_total",
    "Dead letters the broker refused even without their original (logged instead)",
)
ISOLATED = Counter(
    "pinfresh_batches_isolated_total",
    "Batches split to isolate an event that raised an unexpected error",
)
RETRIES = Counter("pinfresh_retries_total", "Retries after transient errors", ["stage"])
BATCH_SIZE = Histogram(
    "pinfresh_batch_size", "Events per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
STAGE_SECONDS = Histogram(
    "pinfresh_stage_seconds", "Time per batch in each stage", ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FRESHNESS = Histogram(
    "pinfresh_freshness_seconds", "Event time to vector readable in Redis",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
ENCODER_BATCH = Histogram(
    "pinfresh_encoder_batch_size", "Images per batch dispatched to the encoder pipeline",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
ENCODER_BATCH_WAIT = Histogram(
    "pinfresh_encoder_batch_wait_seconds", "First image in a batch to the batch's dispatch",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
ENCODER_QUEUE = Gauge(
    "pinfresh_encoder_queue_depth",
    "Images an encoder process holds: received from feeders, not yet answered")
ENCODER_IMAGES = Counter(
    "pinfresh_encoder_images_total",
    "Images an encoder process answered (a vector or a per-image error)")
ENCODER_FAILED_BATCHES = Counter(
    "pinfresh_encoder_failed_batches_total",
    "Batches that failed as a whole in an encoder process (a device error), each once")
ENCODER_LAST_BATCH = Gauge(
    "pinfresh_encoder_last_batch_timestamp_seconds",
    "Unix time an encoder process last finished a request (its start time until the first)")
ENCODER_FEEDERS = Gauge("pinfresh_encoder_feeders", "Feeder connections an encoder process has")
ENCODER_INFO = Gauge("pinfresh_encoder_info", "The version and device an encoder process serves",
                     ["version", "device"])
MODEL_INFO = Gauge("pinfresh_worker_model_info", "Model version the worker writes", ["version"])
CONSUMER_LAG = Gauge(
    "pinfresh_consumer_lag", "Events not yet committed, per partition this worker holds",
    ["partition"])
PARTITION_STALLED = Gauge(
    "pinfresh_partition_stalled_seconds",
    "Seconds a held partition's committed offset has not moved while it has lag (0: no lag)",
    ["partition"])


_last_outage: list[float] = []


def note_outage(clock: Callable[[], float] = time.monotonic) -> None:
    """The stream is waiting out an outage now (a store, the broker, the encoder)."""
    _last_outage[:] = [clock()]


def last_outage() -> float | None:
    """When `note_outage` was last called (monotonic), or None."""
    return _last_outage[0] if _last_outage else None


class Liveness:
    """Whether this worker's pipeline moves: what the pod's liveness probe asks.

    The progress loop calls `beat` every report with the longest time a held
    partition with lag has not moved. `check` fails when a partition has been
    stuck for ``stall_s`` (a hung encoder, a wedged batch) or the loop itself
    stopped beating for ``beat_s`` (the event loop is blocked). Before the
    first beat (start-up: loading the model, joining the group) it passes. A
    stall while the stream waits out an outage (it retried within ``beat_s``)
    passes too: a restart would not end the outage.
    """

    def __init__(self, stall_s: float, beat_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 outage: Callable[[], float | None] = last_outage) -> None:
        self.stall_s, self.beat_s, self.clock, self.outage = stall_s, beat_s, clock, outage
        self.last_beat: float | None = None
        self.worst_stall = 0.0
        self.stuck = 0.0
        #: how long a worker may hold no partition while partitions with lag have no
        #: live worker (its group's join does not finish) before this fails
        self.stuck_limit_s = float("inf")

    def beat(self, worst_stall_s: float, stuck_s: float = 0.0) -> None:
        """A progress report ran.

        ``worst_stall_s``: its longest stalled partition; ``stuck_s``: how long
        the worker has been stuck outside its group (`streams.app.Membership`).
        """
        self.last_beat, self.worst_stall, self.stuck = self.clock(), worst_stall_s, stuck_s

    def check(self) -> tuple[bool, str]:
        """``(alive, one line why)``."""
        if self.last_beat is None:
            return True, "starting"
        quiet = self.clock() - self.last_beat
        if quiet > self.beat_s:
            return False, f"no progress report for {quiet:.0f} s (the event loop is stuck)"
        if self.stuck > self.stuck_limit_s:
            return False, (f"held no partition for {self.stuck:.0f} s while partitions with "
                           "lag had no live worker (the group's join does not finish)")
        if self.worst_stall > self.stall_s:
            outage = self.outage()
            if outage is not None and self.clock() - outage < self.beat_s:
                return True, f"stalled {self.worst_stall:.0f} s, waiting out an outage"
            return False, (f"a partition with lag has not moved for {self.worst_stall:.0f} s "
                           f"(> {self.stall_s:.0f} s)")
        return True, "ok"


class _Checks(Protocol):
    def check(self) -> tuple[bool, str]: ...


def serve_metrics(host: str, port: int, liveness: _Checks | None = None) -> int:
    """Serve ``/metrics`` and ``/healthz`` from a background thread; port 0 = off.

    ``/healthz`` answers 200, or 503 when ``liveness`` fails, with one line why.
    Returns the port bound (0: off).
    """
    if not port:
        return 0
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            alive, why = liveness.check() if liveness is not None else (True, "ok")
            start_response("200 OK" if alive else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [why.encode() + b"\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class: type[_ThreadingServer] = type(
        "_Server", (_ThreadingServer,), {"address_family": family})
    httpd: WSGIServer = make_server(host, port, app, server_class,
                                    handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics").start()
    return int(httpd.server_port)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass
