"""A staged batch pipeline: batcher -> prepare -> forward -> finish.

Each stage runs in its own thread and hands work to the next through a bounded
queue, so while batch n+1 is being decoded, batch n runs through the model and
batch n-1 is copied back and finished. Backpressure is by construction: when a
stage is slow, the queue in front of it fills, the stage before it blocks on
``put``, and in the end `submit` blocks. At most
``batch_size * (3 * depth + 5 + lanes)`` items are ever inside the pipeline
(the inbox holds two batches, the batcher one, each queue ``depth``, each
stage thread one).

A batch is dispatched when it is full or when its first item has waited
``max_wait_s``; `flush` dispatches a partial batch at once (a caller that
submitted everything it has calls it, so the tail does not wait).

The prepare stage may run in several lanes (threads taking batches from the
same queue, e.g. one CUDA stream each for the JPEG decoder): batches then
reach the forward stage in the order their prepare finished, which is fine
because every batch carries its own futures.

The pipeline knows nothing about images or devices: the three stage functions
do. ``prepare(items) -> P``, ``forward(P) -> F`` and ``finish(F) -> list[R]``
(one result per item, in order). A stage that raises fails the futures of
that batch only; the pipeline keeps running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()
_RECENT = 4096
_FLUSH = object()


@dataclass
class _Job:
    items: list[Any]
    futures: list[Future[Any]]
    first_at: float
    dispatched_at: float = 0.0
    payload: Any = None


@dataclass
class PipelineStats:
    """Counters a benchmark or a metrics exporter reads (updated under a lock)."""

    batches: int = 0
    items: int = 0
    full_batches: int = 0
    #: Largest number of items inside the pipeline at once (submitted, not finished).
    max_in_flight: int = 0
    #: The last `_RECENT` batches' sizes (bounded: a worker runs for weeks).
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=_RECENT))
    #: Seconds between a batch's first item arriving and its dispatch (last `_RECENT`).
    waits_s: deque[float] = field(default_factory=lambda: deque(maxlen=_RECENT))
    stage_s: dict[str, float] = field(
        default_factory=lambda: {"prepare": 0.0, "forward": 0.0, "finish": 0.0})


class StagedPipeline(Generic[T, R]):
    """Run ``finish(forward(prepare(batch)))`` over submitted items, stages overlapped.

    Args:
        prepare, forward, finish: the stage functions (see module docstring).
        batch_size: items per batch.
        max_wait_s: longest an item waits for its batch to fill.
        depth: capacity, in batches, of each queue between stages.
        name: thread-name prefix.
        on_batch: called with ``(size, wait_s)`` per dispatched batch (metrics).
    """

    def __init__(
        self,
        prepare: Callable[[list[T]], Any],
        forward: Callable[[Any], Any],
        finish: Callable[[Any], Sequence[R]],
        *,
        batch_size: int,
        max_wait_s: float,
        depth: int = 2,
        name: str = "encode",
        on_batch: Callable[[int, float], None] | None = None,
        prepare_lanes: int = 1,
    ) -> None:
        if batch_size < 1 or depth < 1 or max_wait_s < 0 or prepare_lanes < 1:
            raise ValueError("batch_size, depth and prepare_lanes must be >= 1 and "
                             "max_wait_s >= 0")
        self.prepare_lanes = prepare_lanes
        self._lanes_left = prepare_lanes
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.stats = PipelineStats()
        self._stages = {"prepare": prepare, "forward": forward, "finish": finish}
        self.on_batch = on_batch
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False
        # submit -> batcher: bounded too, so a producer far ahead of the GPU blocks
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=2 * batch_size)
        self._queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=depth) for _ in range(3)]
        self._threads = [
            threading.Thread(target=self._batcher, name=f"{name}-batch", daemon=True),
            *(threading.Thread(target=self._stage, args=("prepare", 0, 1),
                               name=f"{name}-prepare-{lane}", daemon=True)
              for lane in range(prepare_lanes)),
            threading.Thread(target=self._stage, args=("forward", 1, 2),
                             name=f"{name}-forward", daemon=True),
            threading.Thread(target=self._stage, args=("finish", 2, None),
                             name=f"{name}-finish", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ public API
    def submit(self, item: T) -> Future[R]:
        """Queue one item; blocks while the pipeline is full."""
        if self._closed:
            raise RuntimeError("pipeline is closed")
        fut: Future[R] = Future()
        with self._lock:
            self._in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self._in_flight)
        fut.add_done_callback(self._done)
        self._inbox.put((item, fut, time.monotonic()))
        return fut

    def flush(self) -> None:
        """Dispatch what was submitted before this call now, not after `max_wait_s`."""
        self._inbox.put(_FLUSH)

    def map(self, items: Iterable[T]) -> list[R]:
        """Submit all items, flush, and return their results in order.

        A stage failure re-raises here (for the first failed item).
        """
        futures = [self.submit(it) for it in items]
        self.flush()
        return [f.result() for f in futures]

    def close(self, timeout: float = 10.0) -> None:
        """Finish what was submitted, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_STOP)
        for t in self._threads:
            t.join(timeout)

    # -------------------------------------------------------------- threads
    def _done(self, _fut: Future[Any]) -> None:
        with self._lock:
            self._in_flight -= 1

    def _batcher(self) -> None:
        out = self._queues[0]
        items: list[Any] = []
        futures: list[Future[Any]] = []
        first_at = 0.0
        stopping = flush = False

        def take(msg: Any) -> None:
            nonlocal first_at, stopping, flush
            if msg is _STOP:
                stopping = True
            elif msg is _FLUSH:
                flush = True
            elif msg is not None:
                item, fut, at = msg
                if not items:
                    first_at = at
                items.append(item)
                futures.append(fut)

        while not stopping:
            timeout = (max(0.0, first_at + self.max_wait_s - time.monotonic())
                       if items else None)
            try:
                take(self._inbox.get(timeout=timeout))
            except queue.Empty:
                pass
            # take what is already queued, up to a full batch: items that sat in
            # the inbox behind a busy stage are past their wait, but they must
            # still travel together, not one by one
            while not (stopping or flush) and len(items) < self.batch_size:
                try:
                    take(self._inbox.get_nowait())
                except queue.Empty:
                    break
            full = len(items) >= self.batch_size
            expired = bool(items) and time.monotonic() - first_at >= self.max_wait_s
            if items and (full or expired or stopping or flush):
                self._dispatch(out, _Job(items, futures, first_at), full)
                items, futures = [], []
            flush = False
        out.put(_STOP)

    def _dispatch(self, out: queue.Queue[Any], job: _Job, full: bool) -> None:
        job.dispatched_at = time.monotonic()
        wait = job.dispatched_at - job.first_at
        with self._lock:
            self.stats.batches += 1
            self.stats.items += len(job.items)
            self.stats.full_batches += int(full)
            self.stats.batch_sizes.append(len(job.items))
            self.stats.waits_s.append(wait)
        if self.on_batch is not None:
            self.on_batch(len(job.items), wait)
        out.put(job)  # blocks while the prepare stage is `depth` batches behind

    def _stage(self, name: str, src: int, dst: int | None) -> None:
        fn = self._stages[name]
        inq = self._queues[src]
        outq = self._queues[dst] if dst is not None else None
        while True:
            job = inq.get()
            if job is _STOP:
                if name == "prepare":  # several lanes: the last one to stop tells forward
                    with self._lock:
                        self._lanes_left -= 1
                        last = self._lanes_left == 0
                    if not last:
                        inq.put(_STOP)  # for the sibling lanes
                        return
                if outq is not None:
                    outq.put(_STOP)
                return
            if all(f.done() for f in job.futures):  # failed upstream
                continue
            t = time.perf_counter()
            try:
                job.payload = fn(job.items if name == "prepare" else job.payload)
            except BaseException as exc:  # noqa: BLE001 - fail this batch, keep the pipeline
                logger.exception("%s stage failed for a batch of %d", name, len(job.items))
                for f in job.futures:
                    if not f.done():
                        f.set_exception(exc)
                continue
            finally:
                with self._lock:
                    self.stats.stage_s[name] += time.perf_counter() - t
            if outq is not None:
                outq.put(job)
                continue
            results = list(job.payload)
            if len(results) != len(job.futures):
                err = RuntimeError(f"finish returned {len(results)} results "
                                   f"for {len(job.futures)} items")
                for f in job.futures:
                    f.set_exception(err)
                continue
            for f, r in zip(job.futures, results, strict=True):
                if not f.done():
                    f.set_result(r)
