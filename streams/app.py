"""The Faust app: one agent that feeds micro-batches to `PinProcessor`.

The agent reads with ``noack_take`` and acks a batch's events only after
`PinProcessor.process` returned, i.e. after Milvus, Redis and the DLQ were
written; Faust then commits the acked offsets every
``kafka.commit_interval_s``. A worker killed at any point therefore re-reads
what it had not finished, and the processor's idempotence makes the replay
harmless. If the agent is cancelled mid-batch (shutdown), nothing of that
batch is acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

import faust
from aiokafka import TopicPartition
from faust.types import TP

from encoder.errors import Unavailable
from encoder.loading import load_encoder
from encoder.null import NullEncoder
from encoder.remote import RemoteEncoder
from store.lifecycle import open_stores
from store.redis import RedisCache
from streams import metrics
from streams.dlq import KafkaDeadLetters
from streams.fetch import Fetcher
from streams.kafka import faust_kwargs
from streams.processor import Message, PinProcessor, ProcessorHooks
from streams.producer import committed_offsets, consumer_lag, ensure_topics, partition_offsets
from streams.refresh import RegistryVersions
from streams.retry import Backoff, retry
from streams.runtime.stackstate import proc_started
from streams.settings import KafkaSettings, Settings

if TYPE_CHECKING:  # a feeder never imports torch: the model stack loads only where it runs
    from encoder.engine import ImageEncoder

logger = logging.getLogger(__name__)


class DrainState:
    """Shared between the agent and the signal handler of `DrainingWorker`.

    Attributes:
        draining: set by the signal; the agent takes no new batch after it.
        idle: set while no batch is in flight.
        acked: per partition, the offset after the last event the agent
            acknowledged (what a commit must reach for the drain to be clean).
    """

    def __init__(self) -> None:
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.acked: dict[TP, int] = {}
        #: run before a drained worker exits (it removes its reports for `status`)
        self.farewell: list[Callable[[], Awaitable[None]]] = []


class Membership:
    """This worker's place in its consumer group, for `status` and ``/healthz``.

    The progress loop calls `observe` every interval with the partitions the
    worker holds and whether partitions with lag have no live worker (as the
    workers' reports in Redis say). A worker that holds none while such
    partitions exist, for longer than ``limit_s`` (a join takes seconds),
    is stuck outside its group: it logs that once, ``/healthz`` fails and
    its report says since when.
    """

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.time) -> None:
        self.limit_s, self.clock = limit_s, clock
        self.held: list[int] = []
        self.unassigned_since: float | None = None
        self.started_at = clock()
        self._logged = False

    def observe(self, held: set[int], orphaned: set[int]) -> None:
        """One progress round: ``orphaned``: partitions with lag that no live worker holds."""
        self.held = sorted(held)
        if held or not orphaned:
            self.unassigned_since, self._logged = None, False
            return
        now = self.clock()
        if self.unassigned_since is None:
            self.unassigned_since = now
        if now - self.unassigned_since > self.limit_s and not self._logged:
            self._logged = True
            logger.error("this worker has held no partition for %.0f s while partitions %s "
                         "have lag and no live worker: its consumer group does not finish "
                         "its join; /healthz now fails so that it is restarted",
                         now - self.unassigned_since, sorted(orphaned)[:16])

    def stuck_s(self) -> float:
        """How long it has been stuck outside its group (0: it is not)."""
        if self.unassigned_since is None:
            return 0.0
        return max(0.0, self.clock() - self.unassigned_since)

    def report(self) -> dict[str, Any]:
        """What the worker's report carries for `status`."""
        return {"partitions": self.held, "unassigned_since": self.unassigned_since,
                "started_at": self.started_at, "host": socket.gethostname(),
                "pid": os.getpid(), "proc_started": proc_started(os.getpid())}


def _pin_id(value: bytes | None) -> bytes | None:
    """The ``pin_id`` of a message value, as bytes (None if it has none)."""
    try:
        data = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        return None
    pid = data.get("pin_id") if isinstance(data, dict) else None
    return pid.encode() if isinstance(pid, str) else None


class BatchesInFlight:
    """Up to ``limit`` micro-batches processed at once, acknowledged strictly in order.

    One Python process otherwise spends most of a batch waiting (on Milvus,
    Redis, image servers) with nothing else to do. Batch n+1 starts while
    batch n writes, unless the two share a pin id (the event's ``pin_id``, and
    its Kafka key, which a valid event has equal to it): then n+1 waits for n,
    so one process never races itself on a pin and never does one pin's work
    twice at once. (Writers in other processes are serialised per pin by the
    processor's claims in Redis.) The acker acknowledges batch n only after
    batch n finished, and never before batch n-1, so the committed offset
    only covers written events.
    """

    def __init__(self, processor: PinProcessor, stream: Any, drain: DrainState,
                 limit: int) -> None:
        self.processor, self.stream, self.drain = processor, stream, drain
        self._slots = asyncio.Semaphore(limit)
        self._queue: asyncio.Queue[tuple[asyncio.Task[Any], list[Any]]] = asyncio.Queue()
        self._pins: dict[asyncio.Task[Any], set[bytes]] = {}
        self._acker: asyncio.Task[None] | None = None

    async def submit(self, events: list[Any]) -> None:
        """Start a batch once no batch in flight holds one of its pins (blocks at the limit)."""
        if self._acker is None:
            self._acker = asyncio.create_task(self._ack_in_order())
        pins = {p for e in events for p in (e.message.key, _pin_id(e.message.value))
                if p is not None}
        clash = [t for t, held in self._pins.items() if held & pins]
        if clash:
            await asyncio.wait(clash)
        await self._slots.acquire()
        self.drain.idle.clear()
        msgs = [Message(e.message.key, e.message.value) for e in events]
        task = asyncio.create_task(self.processor.handle(msgs))  # never raises but cancelled
        self._pins[task] = pins
        self._queue.put_nowait((task, events))

    async def _ack_in_order(self) -> None:
        while True:
            task, events = await self._queue.get()
            try:
                await asyncio.shield(task)
            finally:
                self._pins.pop(task, None)
            for e in events:
                await self.stream.ack(e)
                tp, nxt = e.message.tp, e.message.offset + 1
                if nxt > self.drain.acked.get(tp, 0):
                    self.drain.acked[tp] = nxt
            self._slots.release()
            if self._queue.empty() and not self._pins:
                self.drain.idle.set()

    async def cancel(self) -> None:
        """Stop: batches in flight are cancelled and never acknowledged."""
        for t in list(self._pins):
            t.cancel()
        if self._acker is not None:
            self._acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acker


class DrainingWorker(faust.Worker):
    """A Faust worker whose SIGTERM/SIGINT drains instead of Faust's own shutdown.

    Faust's shutdown suspends flow control, and the stream then acknowledges the
    buffered events it skips, so its final commit would cover events that were
    never written. This worker instead stops taking batches, lets the in-flight
    batch finish and acknowledge, waits for a periodic commit already in
    flight, commits the acknowledged offsets, reads the group's committed
    offsets back from the broker and checks that they reach every offset the
    agent acknowledged. It logs the committed offset of every partition,
    leaves the consumer group unless it is the group's leader (`_leave_group`:
    so its partitions move at once, not after the
    session timeout) and exits 0 only when the in-flight batch finished and
    the commit is confirmed; otherwise it exits 1 (the unconfirmed events are redelivered to
    the next owner, which the processor's idempotence makes harmless).
    """

    def __init__(self, app: faust.App, drain: DrainState, timeout_s: float,
                 kafka: KafkaSettings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        # Faust's terminal spinner writes cursor escapes (ESC[?25h) into log files
        self.spinner = None
        self._drain = drain
        self._drain_timeout = timeout_s
        self._kafka = kafka
        self._pinfresh_app = app
        self._drain_task: asyncio.Task[None] | None = None
        self.on_exit: list[Any] = []

    def install_signal_handlers(self) -> None:
        """Mode's handlers, with SIGTERM and SIGINT replaced by the drain."""
        super().install_signal_handlers()
        self.loop.add_signal_handler(signal.SIGTERM, self._start_drain, "SIGTERM")
        self.loop.add_signal_handler(signal.SIGINT, self._start_drain, "SIGINT")

    def _start_drain(self, name: str) -> None:
        if self._drain.draining:
            return
        self._drain.draining = True
        # keep a reference: the event loop holds tasks only weakly
        self._drain_task = asyncio.ensure_future(self._drain_and_exit(name))

    async def _drain_and_exit(self, name: str) -> None:
        logger.info("%s: draining (finishing the in-flight batch, then commit)", name)
        clean = True
        try:
            await asyncio.wait_for(self._drain.idle.wait(), self._drain_timeout)
        except TimeoutError:
            clean = False
            logger.warning("drain timed out after %.0fs: the in-flight batch is not "
                           "acknowledged and will be redelivered", self._drain_timeout)
        try:
            confirmed = await asyncio.wait_for(self._commit_acked(), self._drain_timeout)
        except Exception:  # noqa: BLE001 - reported, and the exit code says so
            logger.exception("final commit failed; uncommitted events will be redelivered")
            confirmed = False
        code = 0 if clean and confirmed else 1
        await self._leave_group()
        for fn in self._drain.farewell:
            try:
                await asyncio.wait_for(fn(), 5.0)
            except Exception as exc:  # noqa: BLE001 - best effort before exiting
                logger.warning("drain: clean-up step failed (%r)", exc)
        logger.info("exiting with code %d", code)
        for fn in self.on_exit:
            fn()
        logging.shutdown()
        os._exit(code)

    async def _leave_group(self) -> None:
        """Leave the consumer group, so its partitions move to the other members now.

        Without it they sit idle until the broker's session timeout expires.
        The group's leader does not leave: the embedded broker (Tansu 0.6.0,
        ``Forming::leave`` in its group administrator) keeps a leader that
        leaves a group in the middle of a rebalance as the group's leader for
        good, and no later member then finishes its join (a restarted pool sat
        idle: 5 of 8 restarts). A leader that stops heartbeating is evicted
        after ``PINFRESH_KAFKA__SESSION_TIMEOUT_S``, which clears it, so its
        partitions move then. Best effort, through Faust's consumer thread to
        aiokafka's coordinator (their internals: anything missing is logged and
        the exit goes on).
        """
        try:
            thread = self._pinfresh_app.consumer._thread  # type: ignore[attr-defined]
            coordinator = thread._consumer._coordinator
            # the leader ran the assignment of the current generation (aiokafka keeps its
            # group's subscription then; Faust gives it the leader topic's partition)
            leader = (getattr(coordinator, "_group_subscription", None) is not None
                      or self._pinfresh_app.is_leader())
            if leader:
                logger.info("drain: the group's leader does not leave %s; its partitions "
                            "move after the session timeout (%.0f s)", self._kafka.group_id,
                            self._kafka.session_timeout_s)
                return
            # close, not a bare leave: close stops the coordination loop first. After a
            # bare LeaveGroup that loop (still subscribed) sends a JoinGroup at once, and
            # the process exits during it, leaving a member that never syncs
            fut = asyncio.run_coroutine_threadsafe(coordinator.close(), thread.thread_loop)
            await asyncio.wait_for(asyncio.wrap_future(fut), 5.0)
            logger.info("drain: left consumer group %s", self._kafka.group_id)
        except Exception as exc:  # noqa: BLE001 - best effort before exiting
            logger.warning("drain: could not leave consumer group %s (%r): its partitions "
                           "move to the others after the session timeout",
                           self._kafka.group_id, exc)

    async def _commit_acked(self) -> bool:
        """Commit what the agent acknowledged and confirm it on the broker."""
        consumer = self._pinfresh_app.consumer
        # a periodic commit in flight: its offsets were picked before the last batch's acks
        # (public on faust's Consumer, missing from its ConsumerT protocol)
        await consumer.maybe_wait_for_commit_to_finish()  # type: ignore[attr-defined]
        await consumer.commit()  # False also when that one already covered everything
        want = dict(self._drain.acked)
        if not want:
            logger.info("drain: nothing was acknowledged, nothing to commit")
            return True
        got = await committed_offsets(self._kafka, self._kafka.group_id,
                                      [TopicPartition(tp.topic, tp.partition) for tp in want])
        short = {tp: (off, got.get(tp.partition)) for tp, off in want.items()
                 if (got.get(tp.partition) or 0) < off}
        if short:
            logger.error("drain: commit NOT confirmed for group %s (partition: acknowledged "
                         "offset vs committed): %s; those events will be redelivered",
                         self._kafka.group_id,
                         " ".join(f"{tp.topic}[{tp.partition}]={a}/{c}"
                                  for tp, (a, c) in sorted(short.items())))
            return False
        logger.info("drain: commit confirmed for group %s: %s", self._kafka.group_id,
                    " ".join(f"{tp.topic}[{tp.partition}]={got[tp.partition]}"
                             for tp in sorted(want)))
        return True


WorkerEncoder: TypeAlias = "ImageEncoder | NullEncoder | RemoteEncoder"


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _refresh_write_set(processor: PinProcessor, interval_s: float) -> None:
    """`PinProcessor.refresh_write_set` every ``interval_s``, while batches come or not."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await processor.refresh_write_set()
        except Exception:  # noqa: BLE001 - the next batch reads it anyway
            logger.exception("write set refresh failed")


async def _orphaned(k: KafkaSettings, cache: RedisCache, worker: str, fresh_s: float
                    ) -> set[int]:
    """Partitions with lag that no live worker holds, by the workers' reports in Redis."""
    lagging = {p for p, lag in (await consumer_lag(k)).items() if lag > 0}
    if not lagging:
        return set()
    now = time.time()
    held: set[int] = set()
    for name, rep in (await cache.writers()).items():
        if name != worker and now - float(rep.get("at", 0)) <= fresh_s:
            held.update(int(p) for p in rep.get("partitions") or [])
    return lagging - held


async def _report_progress(app: faust.App, cache: RedisCache, k: KafkaSettings, worker: str,
                           interval_s: float, liveness: metrics.Liveness | None = None,
                           membership: Membership | None = None) -> None:
    """Report the committed offset and lag of each held partition every ``interval_s``.

    To Redis (`pinfresh status` marks partitions that stopped moving) and to the
    ``pinfresh_consumer_lag`` and ``pinfresh_partition_stalled_seconds`` gauges.
    A worker that holds no partition checks whether partitions with lag have no
    live worker (`Membership`).

    A view only: a failed report is logged and tried again, never stops the stream.
    """
    seen: dict[int, tuple[int, float]] = {}  # partition -> (committed, moved_at)
    worst = 0.0
    while True:
        if liveness is not None:  # the loop runs (a slow broker below must not hide that)
            liveness.beat(worst, membership.stuck_s() if membership else 0.0)
        try:
            held = {tp.partition for tp in app.consumer.assignment() if tp.topic == k.topic}
            if membership is not None:
                membership.observe(held, set() if held else await _orphaned(
                    k, cache, worker, 3 * interval_s + 10))
            offsets = await partition_offsets(k, partitions=held) if held else {}
            now = time.time()
            for part in set(seen) - set(offsets):
                for gauge in (metrics.CONSUMER_LAG, metrics.PARTITION_STALLED):
                    with contextlib.suppress(KeyError):
                        gauge.remove(str(part))
            moved = {}
            for part, (committed, lag) in offsets.items():
                before = seen.get(part)
                # moving: the offset changed, or nothing is behind (an idle partition
                # that gets one event starts its clock then, not when it last moved)
                moved[part] = now if before is None or before[0] != committed or lag == 0 \
                    else before[1]
                metrics.CONSUMER_LAG.labels(partition=str(part)).set(lag)
                metrics.PARTITION_STALLED.labels(partition=str(part)).set(
                    now - moved[part] if lag else 0.0)
            seen = {part: (offsets[part][0], moved[part]) for part in offsets}
            worst = max((now - moved[p] for p, (_, lag) in offsets.items() if lag), default=0.0)
            # the gauges first: a Redis outage must not freeze them
            if liveness is not None:
                liveness.beat(worst, membership.stuck_s() if membership else 0.0)
            await cache.report_progress(worker, offsets, moved, now)
        except Exception as exc:  # noqa: BLE001 - a view; the stream goes on
            logger.warning("progress report failed (retried in %.0fs): %s", interval_s, exc)
        await asyncio.sleep(interval_s)


def create_app(settings: Settings, encoder: WorkerEncoder,
               drain: DrainState | None = None, hooks: ProcessorHooks | None = None,
               liveness: metrics.Liveness | None = None,
               membership: Membership | None = None) -> faust.App:
    """Build the Faust app with the encode agent bound to ``encoder``.

    The encoder is loaded before the app starts, so the worker joins the
    consumer group ready to encode.
    """
    drain = drain or DrainState()
    k = settings.kafka
    settings.worker_state_dir().mkdir(parents=True, exist_ok=True)
    app = faust.App(
        k.group_id,
        **faust_kwargs(k),
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication_factor,
        topic_allow_declare=True,
        broker_rebalance_timeout=k.rebalance_timeout_s,
        broker_session_timeout=k.session_timeout_s,
        broker_heartbeat_interval=k.heartbeat_interval_s,
        broker_commit_interval=k.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        store="memory://",
        web_enabled=False,
        # Faust's own state folder, under the data dir instead of the working directory
        datadir=str(settings.worker_state_dir() / "{conf.name}-data"),
    )
    topic = app.topic(k.topic, key_type=bytes, value_type=bytes, partitions=k.partitions)
    app.topic(k.dlq_topic, key_type=bytes, value_type=bytes, partitions=k.partitions)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    w = settings.worker
    membership = membership or Membership(w.unassigned_stall_s)

    @app.agent(topic, name="encode_pins")
    async def encode_pins(stream: Any) -> None:
        async with contextlib.AsyncExitStack() as resources:  # closed in reverse, always
            stores = await resources.enter_async_context(open_stores(settings))
            fetcher = Fetcher(settings.fetch)
            resources.push_async_callback(fetcher.close)
            dlq = KafkaDeadLetters(k)
            resources.push_async_callback(dlq.close)
            if isinstance(encoder, RemoteEncoder):  # a feeder: its encoder process names it
                await encoder.connect(wait_s=settings.encoder.remote_wait_s)
            info = encoder.info
            registry = stores.registry
            # a store that is down at start-up delays the worker, never kills it
            # workers follow the registry: their own version is registered only as the
            # first of a new deployment, never again once retired
            await retry(partial(registry.join, info.version, info.dim, info.model,
                                info.checkpoint, settings.encoder.seed),
                        retry_on=(Unavailable,), backoff=Backoff(1.0, 10.0),
                        on_retry=lambda exc, n, wait: logger.warning(
                            "stores unavailable at start-up (%s); retry %d in %.1fs",
                            exc, n, wait))
            versions = RegistryVersions(registry, encoder, settings.encoder,
                                        release_after_s=w.version_release_s)
            resources.push_async_callback(versions.close)
            processor = PinProcessor(
                encoder=encoder, milvus=stores.milvus, cache=stores.cache, fetcher=fetcher,
                dlq=dlq, settings=w, worker_name=worker_name,
                versions=versions,
                hooks=hooks, writer_ttl_s=settings.redis.writer_ttl_s,
            )
            versions.in_use = processor.versions_in_flight
            processor.report_extra = membership.report

            async def farewell() -> None:  # a drained worker leaves no report behind
                await stores.cache.forget_writers([worker_name])
                await stores.cache.forget_progress(worker_name)

            drain.farewell.append(farewell)
            await processor.start()
            refresher = asyncio.create_task(_refresh_write_set(processor,
                                                               w.progress_interval_s))
            resources.push_async_callback(_cancel, refresher)
            reporter = asyncio.create_task(_report_progress(
                app, stores.cache, k, worker_name, w.progress_interval_s, liveness,
                membership))
            resources.push_async_callback(_cancel, reporter)
            flight = BatchesInFlight(processor, stream, drain, w.batches_in_flight)
            resources.push_async_callback(flight.cancel)
            async for events in stream.noack_take(w.batch_size, within=w.batch_wait_s):
                if drain.draining:  # taken after SIGTERM: leave unacked for the next owner
                    await asyncio.Event().wait()
                await flight.submit(events)

    return app


def run_worker(settings: Settings, on_exit: Callable[[], None] | None = None,
               hooks: ProcessorHooks | None = None) -> None:
    """Check the broker, create missing topics, load the encoder, then run until SIGTERM/SIGINT.

    Called by ``pinfresh worker``; blocks. ``on_exit`` runs before the process
    exits after a drain (which ends with ``os._exit``, so atexit hooks do not run).
    ``hooks`` are fault-injection seams, passed only by a test's own entry point.

    Raises:
        KafkaUnavailable: the broker does not answer (checked before the
            encoder is loaded, which takes seconds).
    """
    from streams.metrics import ENCODER_BATCH, ENCODER_BATCH_WAIT, serve_metrics

    def stop_during_start_up(signum: int, _frame: object) -> None:
        # nothing consumed yet: leave at once (the drain handler replaces this one later)
        logger.info("%s during start-up: exiting", signal.Signals(signum).name)
        if on_exit is not None:
            on_exit()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_during_start_up)
    signal.signal(signal.SIGINT, stop_during_start_up)
    # topics get the configured partition count whoever touches them first; Faust's
    # subscription would otherwise let the broker auto-create them with its own default
    created = asyncio.run(ensure_topics(settings.kafka))
    if created:
        logger.info("created topics %s with %d partitions", ", ".join(created),
                    settings.kafka.partitions)
    encoder: WorkerEncoder
    if settings.encoder.remote is not None:
        encoder = RemoteEncoder.from_settings(settings.encoder)
        logger.info("feeder of the encoder process at %s", settings.encoder.remote)
    else:
        encoder = load_encoder(settings.encoder)

    def on_batch(size: int, wait_s: float) -> None:
        ENCODER_BATCH.observe(size)
        ENCODER_BATCH_WAIT.observe(wait_s)

    encoder.on_batch = on_batch
    w = settings.worker
    # beats: every report, and before each (a report may wait 40 s on a slow broker)
    liveness = metrics.Liveness(w.liveness_stall_s, 3 * w.progress_interval_s + 60)
    liveness.stuck_limit_s = w.unassigned_stall_s
    serve_metrics(w.metrics_host, w.metrics_port, liveness)
    drain = DrainState()
    app = create_app(settings, encoder, drain, hooks, liveness,
                     Membership(w.unassigned_stall_s))
    worker = DrainingWorker(app, drain, settings.worker.drain_timeout_s, settings.kafka,
                            loglevel=settings.log_level.lower(), quiet=True,
                            redirect_stdouts=False, override_logging=False)
    if on_exit is not None:
        worker.on_exit.append(on_exit)
    worker.execute_from_commandline()
