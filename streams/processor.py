"""One micro-batch of pin events: validate, plan, fetch, encode, write, dead-letter.

`PinProcessor` holds the pipeline's rules and knows nothing about Faust, so
unit tests drive it with in-memory fakes and the Faust agent
(`streams.app`) only feeds it batches and acks them afterwards.

A batch runs in named steps:

1. **Parse**: every message is validated; a malformed one, or one whose Kafka
   key is not its pin id (``key_mismatch``), becomes a dead letter. Per pin
   only the newest event of the batch is kept.
2. **Look up**: tombstones, writer claims and every written model version's
   pin states in one Redis call; Milvus only for pins Redis may not know (see
   "Consistency" below).
3. **Plan**: `streams.plan.plan_batch`, pure: deletes to apply, images to
   fetch per version, cache entries to repair, skips.
4. **Delete**, **fetch and hash**, **encode or reuse** (`streams.plan.split_reuse`).
5. **Write** under the per-pin claim protocol (below): claim, Milvus, then
   Redis, then release; pins that an older writer may still overwrite are
   applied again once it is done.
6. **Dead-letter**: letters are written to the DLQ before `process` returns.

Guarantees of `PinProcessor.handle` (the agent acks a batch only after it
returns):

* it never raises (except on cancellation). Errors are sorted by kind
  (`encoder.errors`): an `Unavailable` (a store, the broker, the encoder) is
  retried for ever with capped backoff, so nothing is acknowledged that was
  not written; a `Rejected` event, image or row is dead-lettered with its
  reason and the rest of the batch goes on; anything else is a bug, isolated
  by bisection and dead-lettered as ``internal_error`` after
  ``internal_error_attempts`` tries;
* failures are tracked per message: one event's dead letter never stands in
  for another's, even of the same pin id;
* whichever of several writers of one pin finishes last (two workers after a
  rebalance, the backfill, a reader's cache refill), both stores end at the
  pin's highest version, and a deleted pin stays deleted.

Concurrent writers. Milvus has no conditional write, so every writer of a
pin registers in Redis before its Milvus write (`RedisCache.claim`, which
also refuses versions that are stale there, and is renewed before every
retry of the Milvus call), writes Milvus, writes Redis conditionally (never
below the stored version or the tombstone), and then releases its claim
(`RedisCache.release`). Two rules catch a Milvus write that lands after a
newer one: a writer that releases marks every other writer of the pin at its
version or above as possibly overwritten, and a writer's release reports
whether it was so marked or whether a writer at its version or below is
still in flight (or abandoned its claim, which then expires after
``redis.writer_ttl_s`` and marks the others). Either way it waits until no
such writer is in flight and writes the pin again under a new claim, which
refuses it if something newer has landed meanwhile. Deletes follow the same
protocol; their claim raises the tombstone first. Two writers of one version
(a redelivery racing a re-encode) settle the same way: the one that releases
last writes again, so both stores hold one writer's content. After
`MAX_WRITE_ROUNDS` rounds a pin still contended is logged (``store verify
--repair`` reconciles it).

Consistency. Redis holds the state (pin version, content hash) of every pin
written to Milvus: each writer writes Redis right after Milvus, nothing in
Redis expires but tombstones and claims, and Redis must run with
``maxmemory-policy noeviction``. A version's registry hash carries a mark,
``cache = complete``, set when the version starts empty in both stores
(`store.registry.mark_complete_if_empty`) or by ``store verify --repair``;
losing Redis's data loses the mark. The look-up of a batch therefore reads:

* Redis, for every pin (one script call per pin, one command per batch);
* Milvus at Eventually, only for pins that another writer has claimed (one
  in flight, or one that died between its two writes and whose claim has not
  expired): the redelivered event of a dead writer is then skipped and the
  cache repaired instead of encoding again. Eventually waits for no time tick;
* Milvus at Strong, every pin, for a version whose cache is not marked
  complete or when Redis may evict: until a repair, an older event must not
  overwrite what only Milvus still knows. Strong waits for the server's next
  time tick (``docs/benchmarks.md`` has the measured cost of each level),
  every batch.

A read at Session right after this process's own upsert waits for the tick
too, which is why the stream never uses it. The reuse of a stored vector reads
Milvus at Eventually (only a row of the same content hash is reused; a row the
read misses is encoded), repairs at Strong. None of these reads decides a
write on its own: every write is still checked by the claim and the
conditional write in Redis, so a lagging read can only cost a useless fetch
or encode.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import itertools
import logging
import os
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np

from encoder.errors import (
    ImageError,
    MalformedEvent,
    Reason,
    Rejected,
    StoreRejected,
    TransientRejection,
    Unavailable,
    UnknownVersion,
)
from store.base import CacheLookup, EmbeddingRecord, PinState
from store.registry import mark_complete_if_empty
from streams import metrics
from streams.events import DeadLetter, PinEvent, guess_pin_id, parse_event
from streams.fetch import FetchError
from streams.plan import BatchPlan, Lookups, plan_batch, split_reuse
from streams.retry import Backoff, retry
from streams.settings import WorkerSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")
_tokens = itertools.count()
#: Fingerprints of the dead letters written during the current `PinProcessor.handle` call.
_SENT: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("pinfresh_sent",
                                                                        default=None)
#: Rounds of writing again (another writer may have overwritten a pin in Milvus) before
#: giving up on a pin with an error (equal versions racing could flag each other again).
MAX_WRITE_ROUNDS = 8
#: How often a batch in flight renews its writer report (`store.registry.wait_writers`).
REPORT_EVERY_S = 10.0
#: An unchanged writer report is sent again after this long at the latest (a report
#: older than `store.registry.WRITER_REPORT_FRESH_S`, 60 s, counts for nothing).
REPORT_SAME_S = 5.0
#: This process's part of every writer token (a restarted container keeps host and pid).
_PROCESS_ID = uuid.uuid4().hex[:12]


class Encoder(Protocol):
    """What the processor needs from an encoder.

    `encoder.engine.ImageEncoder` (in process), `encoder.remote.RemoteEncoder`
    (a feeder's handle on the encoder process) or `encoder.null.NullEncoder`.
    """

    @property
    def version(self) -> str:
        """The model version id its vectors belong to."""
        ...

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        ...

    async def encode_images_async(self, items: Sequence[bytes]) -> list[np.ndarray | ImageError]:
        """Encode images; one vector or error per image, in order."""
        ...


class VersionSource(Protocol):
    """Which model versions to write, each with its encoder (live first)."""

    async def write_set(self) -> dict[str, Encoder]:
        """Encoders by version id; the first one is the primary (live) version."""
        ...

    def forget(self, version: str) -> None:
        """A version vanished (retired): leave it out until the registry says otherwise."""
        ...


class StaticVersions:
    """A fixed write set (a backfill, or a worker outside any registry)."""

    def __init__(self, *encoders: Encoder) -> None:
        self._write = {e.version: e for e in encoders}

    async def write_set(self) -> dict[str, Encoder]:
        """The encoders given at construction."""
        return self._write

    def forget(self, version: str) -> None:
        """Drop a version that vanished (never the first)."""
        if version != next(iter(self._write)):
            self._write.pop(version, None)


class Fetch(Protocol):
    """What the processor needs from a fetcher (`streams.fetch.Fetcher`)."""

    async def fetch(self, location: str) -> bytes:
        """Return image bytes or raise `FetchError`."""
        ...

    async def fetch_many(self, locations: Sequence[str]) -> list[bytes | FetchError]:
        """One result or `FetchError` per location (a batch's first attempt)."""
        ...


class DeadLetterSink(Protocol):
    """Where dead letters go (the ``pins.dlq`` topic in production, `streams.dlq`)."""

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Durably write the letters.

        Raises:
            Unavailable: retry later; if it has a ``sent`` attribute, those
                letters were written and are not sent again.
        """
        ...


class VectorStore(Protocol):
    """The Milvus-side calls the processor makes."""

    async def ensure_version(self, version: str, dim: int) -> None: ...  # noqa: D102
    async def set_live(self, version: str) -> None: ...  # noqa: D102
    async def upsert(self, version: str, records: Sequence[EmbeddingRecord]) -> None: ...  # noqa: D102
    async def delete(self, version: str, pin_ids: Sequence[str]) -> None: ...  # noqa: D102
    async def get_many(  # noqa: D102
        self, version: str, pin_ids: Sequence[str], *, consistency: Any = None,
    ) -> dict[str, EmbeddingRecord]: ...
    async def get_states(  # noqa: D102
        self, version: str, pin_ids: Sequence[str], *, consistency: Any = None,
    ) -> dict[str, PinState]: ...
    async def count(self, version: str) -> int: ...  # noqa: D102
    async def ensure_loaded(self, version: str) -> bool: ...  # noqa: D102


class WriteOutcome(Protocol):
    """What `Cache.write` returns (`store.redis.WriteResult`)."""

    @property
    def written_at(self) -> float: ...  # noqa: D102
    @property
    def written(self) -> frozenset[str]: ...  # noqa: D102


class Cache(Protocol):
    """The Redis-side calls the processor makes: conditional writes, claims, pointers."""

    async def ensure_version(self, version: str, dim: int, model: str = "") -> None: ...  # noqa: D102
    async def set_live_if_none(self, version: str) -> bool: ...  # noqa: D102
    async def versions(self) -> dict[str, dict[str, str]]: ...  # noqa: D102
    async def lookup(  # noqa: D102
        self, versions: Sequence[str], pin_ids: Sequence[str]
    ) -> CacheLookup: ...
    async def mark_complete(self, version: str) -> None: ...  # noqa: D102
    async def write(  # noqa: D102
        self, version: str, records: Sequence[EmbeddingRecord], *, mode: Any = "write",
        written_at: float | None = None,
    ) -> WriteOutcome: ...
    async def claim(  # noqa: D102
        self, op: Any, token: str, pins: Mapping[str, int], versions: Sequence[str]
    ) -> dict[str, dict[str, bool]]: ...
    async def release(self, token: str, pins: Mapping[str, int]) -> set[str]: ...  # noqa: D102
    async def renew(self, token: str, pins: Sequence[str]) -> set[str]: ...  # noqa: D102
    async def commit_deletes(  # noqa: D102
        self, token: str, pins: Mapping[str, int], versions: Sequence[str]
    ) -> set[str]: ...
    async def in_flight(self, pins: Mapping[str, int]) -> set[str]: ...  # noqa: D102
    async def registered(self, versions: Sequence[str]) -> set[str]: ...  # noqa: D102
    async def eviction_policy(self) -> str | None: ...  # noqa: D102
    async def report_writer(  # noqa: D102
        self, name: str, write_set: Sequence[str], batches: Sequence[Sequence[str]],
        extra: Mapping[str, Any] | None = None,
    ) -> None: ...
    async def record_batch_stats(  # noqa: D102
        self, freshness_s: Sequence[float], encoded: int, keep: int = 10_000
    ) -> None: ...


class ProcessorHooks:
    """Seams for fault-injection tests; every method does nothing here.

    Production never passes hooks. A test's own entry point
    (``tests/integration/fault_worker.py``) passes a subclass that, say,
    SIGKILLs the worker after its Milvus write.
    """

    def before_batch(self, events: Sequence[PinEvent]) -> None:
        """Called with a batch's valid events before any lookup."""

    def at(self, point: str) -> None:
        """Called at ``after_encode``, ``after_milvus`` and ``after_redis``."""


@dataclass(frozen=True, slots=True)
class Message:
    """One raw Kafka message (key and value bytes)."""

    key: bytes | None
    value: bytes | None


@dataclass
class BatchReport:
    """What one call of `PinProcessor.process` did."""

    received: int = 0
    encoded: int = 0
    reused: int = 0
    written: int = 0
    deleted: int = 0
    skipped: int = 0
    repaired: int = 0
    rewritten: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def merge(self, other: BatchReport) -> BatchReport:
        """Add up two reports (the halves of a batch split by isolation)."""
        out = BatchReport()
        for name in ("received", "encoded", "reused", "written", "deleted", "skipped",
                     "repaired", "rewritten"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.dead_letters = self.dead_letters + other.dead_letters
        out.freshness_s = self.freshness_s + other.freshness_s
        out.seconds = {k: self.seconds.get(k, 0.0) + other.seconds.get(k, 0.0)
                       for k in self.seconds.keys() | other.seconds.keys()}
        return out

    def add_time(self, stage: str, since: float) -> None:
        """Add the time since ``since`` (`time.perf_counter`) to a stage."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - since


@dataclass
class _Batch:
    """The state of one `process` call between its steps."""

    events: list[PinEvent]
    report: BatchReport
    #: index of the event (in ``events``) -> its dead letter; one per event at most
    failed: dict[int, DeadLetter] = field(default_factory=dict)
    #: pins whose primary-version entry this batch wrote to Redis (not refused as stale)
    written: set[str] = field(default_factory=set)
    primary: str = ""
    #: pin id -> the message value its event came in, byte for byte (for its dead letter)
    raw: dict[str, bytes | None] = field(default_factory=dict)
    #: pin id -> its event (a batch holds one event per pin)
    by_pin: dict[str, PinEvent] = field(init=False)

    def __post_init__(self) -> None:
        self.by_pin = {e.pin_id: e for e in self.events}

    def fail(self, ev: PinEvent, letter: DeadLetter) -> None:
        """Dead-letter one event (its first failure wins)."""
        i = next(k for k, e in enumerate(self.events) if e is ev)
        self.failed.setdefault(i, letter)

    def original(self, ev: PinEvent) -> bytes | None:
        """The message value ``ev`` was parsed from, as sent (not re-serialised)."""
        return self.raw[ev.pin_id] if ev.pin_id in self.raw else ev.to_bytes()

    def has_failed(self, ev: PinEvent) -> bool:
        """Whether this very event has a dead letter already."""
        return any(self.events[i] is ev for i in self.failed)


class PinProcessor:
    """Applies batches of pin events to the stores (see module docstring)."""

    def __init__(
        self, *, encoder: Encoder, milvus: VectorStore, cache: Cache, fetcher: Fetch,
        dlq: DeadLetterSink, settings: WorkerSettings, worker_name: str = "",
        versions: VersionSource | None = None, observe_freshness: bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        hooks: ProcessorHooks | None = None, writer_ttl_s: float = 60.0,
    ) -> None:
        self.encoder = encoder
        self.versions: VersionSource = versions or StaticVersions(encoder)
        self.observe_freshness = observe_freshness
        self.milvus = milvus
        self.cache = cache
        self.fetcher = fetcher
        self.dlq = dlq
        self.settings = settings
        self.worker_name = worker_name or f"pid{os.getpid()}"
        self.hooks = hooks or ProcessorHooks()
        #: how long to wait at most for an older writer of a pin (its claim expires then)
        self.writer_ttl_s = writer_ttl_s
        self._sleep = sleep
        self._fetch_sem = asyncio.Semaphore(settings.fetch_concurrency)
        #: write sets of the batches in flight (reported with `Cache.report_writer`)
        self._active: dict[int, frozenset[str]] = {}
        self._shown_versions: set[str] = set()  # labels of pinfresh_worker_model_info
        self._report_lock = asyncio.Lock()
        self._reported: tuple[Any, ...] = ()  # the last report sent, and when
        self._reported_at = 0.0
        #: what the worker adds to each writer report (partitions held, host, pid, ...)
        self.report_extra: Callable[[], Mapping[str, Any]] = dict
        #: whether Redis keeps every entry (maxmemory-policy noeviction; `start` checks)
        self._trust_cache = True
        self._shown_untrusted: set[str] = set()

    @property
    def version(self) -> str:
        """The model version this processor writes."""
        return self.encoder.version

    async def start(self) -> None:
        """Create the collections and namespaces of the write set; make the first live if none is.

        Called once before the first batch; retried while a store is down.
        """
        write = await self._retry("registry", self.versions.write_set)
        for ver, enc in write.items():
            await self._retry("milvus", partial(self.milvus.ensure_version, ver, enc.dim))
            await self._retry("redis", partial(self.cache.ensure_version, ver, enc.dim))
            await self._retry("redis", partial(mark_complete_if_empty, self.milvus,
                                               self.cache, ver))
        first = next(iter(write))
        if await self._retry("redis", partial(self.cache.set_live_if_none, first)):
            await self._retry("milvus", partial(self.milvus.set_live, first))
            logger.info("model version %s is now live (first version)", first)
        self._show_versions(write)
        policy = await self._retry("redis", self.cache.eviction_policy)
        if policy not in (None, "noeviction"):
            self._trust_cache = False
            logger.error("Redis maxmemory-policy is %s: it may evict tombstones and writer "
                         "claims (keys with a TTL) and cached vectors, and then a deleted pin "
                         "can come back and writers can race; every batch reads Milvus at "
                         "Strong consistency meanwhile; set it to noeviction "
                         "(docs/operations.md)", policy)

    def versions_in_flight(self) -> set[str]:
        """The versions that batches in flight write (their write sets, taken at start)."""
        return set().union(*self._active.values())

    async def refresh_write_set(self) -> None:
        """Read the write set now, batches or not (the worker calls it periodically).

        An idle worker thus opens a new version's encoder before its first event,
        releases a retired one's (`streams.refresh.RegistryVersions`) and keeps
        ``pinfresh_worker_model_info`` current. A store outage skips a round.
        """
        try:
            write = await self.versions.write_set()
        except Unavailable as exc:
            logger.warning("write set not refreshed (next try in the next batch or "
                           "interval): %s", exc)
            return
        self._show_versions(write)
        # an idle worker reports too: `status` tells a worker that stopped from one
        # with nothing to do by the age of its report
        with contextlib.suppress(Unavailable):
            await self._report(list(write), tick=True)

    # ------------------------------------------------------------------ retry
    def _backoff(self) -> Backoff:
        return Backoff(self.settings.retry_backoff_s, self.settings.retry_backoff_max_s,
                       sleep=self._sleep)

    async def _retry(self, stage: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` until it raises no `Unavailable`, for ever.

        Capped exponential backoff with jitter, at least the ``retry_after``
        the error asks for; nothing may be acknowledged unwritten.
        """
        def note(exc: BaseException, attempt: int, wait: float) -> None:
            metrics.RETRIES.labels(stage=stage).inc()
            metrics.note_outage()  # a stall now is the outage's, not a hang (liveness)
            logger.warning("%s unavailable (attempt %d, retry in %.1fs): %s",
                           stage, attempt, wait, exc)

        return await retry(fn, retry_on=(Unavailable,), backoff=self._backoff(), on_retry=note)

    # ---------------------------------------------------------------- process
    async def process(self, messages: Sequence[Message]) -> BatchReport:
        """Apply one micro-batch; see the module docstring for the steps and guarantees."""
        report = BatchReport(received=len(messages))
        t0 = time.perf_counter()
        # Step 1. Parse: one letter per bad message, the newest event per pin
        letters: list[DeadLetter] = []
        events: dict[str, PinEvent] = {}
        raws: dict[str, bytes | None] = {}
        for msg in messages:
            try:
                ev = parse_event(msg.value)
                key = msg.key.decode("utf-8", "replace") if msg.key is not None else None
                if key != ev.pin_id:
                    raise MalformedEvent(
                        f"event of pin {ev.pin_id!r} arrived keyed {key!r}: key every event by "
                        "its pin id, or the pin's events can land on different partitions and "
                        "be applied out of order (docs/integration.md)", Reason.KEY_MISMATCH)
            except MalformedEvent as exc:
                letters.append(self._letter(exc.reason, str(exc), msg.value,
                                            guess_pin_id(msg.value, msg.key)))
                continue
            cur = events.get(ev.pin_id)
            if cur is None or ev.version >= cur.version:
                events[ev.pin_id] = ev
                raws[ev.pin_id] = msg.value
            if cur is not None:
                report.skipped += 1
        batch = _Batch(list(events.values()), report, raw=raws)
        if batch.events:
            self.hooks.before_batch(batch.events)
            await self._apply(batch)
        report.dead_letters = letters + [batch.failed[i] for i in sorted(batch.failed)]
        # Step 6. Dead-letter
        if report.dead_letters:
            await self._send_letters(report.dead_letters)
        report.seconds["total"] = time.perf_counter() - t0
        self._observe(report)
        if self.observe_freshness and (report.freshness_s or report.encoded):
            try:
                await self.cache.record_batch_stats(report.freshness_s, report.encoded)
            except Unavailable as exc:  # statistics only: never hold the batch for them
                logger.warning("could not record batch statistics: %s", exc)
        return report

    async def _report(self, write: Sequence[str], *, tick: bool = False) -> None:
        """Report the write set and the batches' version sets (`Cache.report_writer`).

        One report at a time, each with the state when it is sent, so the last
        to land is the newest. `VersionRegistry.wait_writers` reads only which
        versions the batches hold, so each distinct set is reported once, and
        a report equal to the last one sent less than `REPORT_SAME_S` ago is
        skipped: a worker streaming batches of the same versions sent two
        identical reports a batch (two Redis round trips). ``tick``: the
        periodic refresh, always sent, not retried.
        """
        async with self._report_lock:
            batches = sorted({tuple(sorted(b)) for b in self._active.values()})
            extra = dict(self.report_extra())
            state = (tuple(write), tuple(batches), tuple(sorted(extra.items(), key=str)))
            now = time.monotonic()
            if not tick and state == self._reported and now - self._reported_at < REPORT_SAME_S:
                return
            send = partial(self.cache.report_writer, self.worker_name, list(write),
                           [list(b) for b in batches], extra)
            try:
                await (send() if tick else self._retry("redis", send))
            except BaseException:
                self._reported = ()  # it may have landed or not: the next one goes out
                raise
            self._reported, self._reported_at = state, now

    def _show_versions(self, write: Mapping[str, Any]) -> None:
        """``pinfresh_worker_model_info``: one series per version this worker writes now."""
        for ver in self._shown_versions - set(write):
            with contextlib.suppress(KeyError):
                metrics.MODEL_INFO.remove(ver)
        for ver in write:
            metrics.MODEL_INFO.labels(version=ver).set(1)
        self._shown_versions = set(write)

    async def _apply(self, batch: _Batch) -> None:
        write = dict(await self._retry("registry", self.versions.write_set))
        self._show_versions(write)
        key = id(batch)
        self._active[key] = frozenset(write)
        # reported before any write, and again while the batch runs (an outage can hold it
        # for long): `versions retire` waits until no batch holds a version
        await self._report(list(write))
        ticker = asyncio.create_task(self._keep_reporting(list(write)))
        try:
            await self._apply_steps(batch, write)
        finally:
            ticker.cancel()
            self._active.pop(key, None)
        await self._report(list(write))

    async def _keep_reporting(self, write: list[str]) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            with contextlib.suppress(Unavailable):
                await self._report(write, tick=True)

    async def _apply_steps(self, batch: _Batch, write: dict[str, Encoder]) -> None:
        report = batch.report
        primary = next(iter(write))
        ids = [e.pin_id for e in batch.events]
        # Step 2. Look up: Redis first, Milvus only where Redis may not know
        t = time.perf_counter()
        lookups = await self._look_up(ids, write, primary)
        report.add_time("lookup", t)
        # Step 3. Plan
        plan = plan_batch(batch.events, list(write), lookups)
        batch.primary = primary
        report.skipped += len(plan.skipped)
        # Step 4. Delete, fetch, encode
        if plan.deletes:
            await self._delete(plan, lookups, write, report)
        fetched = await self._fetch_all(plan.fetches(), batch) if plan.fetches() else {}
        records: dict[str, list[EmbeddingRecord]] = {}
        for ver, enc in write.items():
            work = plan.work[ver]
            recs = await self._build_records(ver, enc, list(work.fetch), fetched,
                                             lookups.milvus[ver], batch)
            if recs:
                records[ver] = recs
        if records:
            self.hooks.at("after_encode")
        # Step 5. Write
        if records:
            written_at = await self._write(records, batch, report)
            fresh = [r for r in records.get(primary, []) if r.pin_id in batch.written]
            report.written = len(fresh)
            # clock skew between producer and worker can make a sample negative: clamp it
            report.freshness_s = [max(0.0, written_at - r.event_time) for r in fresh]
        await self._repair(plan, write, report)

    async def _look_up(self, ids: list[str], write: dict[str, Encoder], primary: str
                       ) -> Lookups:
        """Tombstones and every written version's pin states (see "Consistency" above).

        One Redis call reads the tombstones, the claims and each version's
        states. A version whose cache is complete (`CacheLookup.complete`)
        reads Milvus only for pins that a writer has claimed (one may have died
        between its Milvus and its Redis write), at Eventually: no time tick is
        waited for. Any other version reads every pin from Milvus at Strong. A
        version gone from the registry (retired) leaves ``write``; the primary
        one never does.
        """
        versions = list(write)
        got = await self._retry("redis", partial(self.cache.lookup, versions, ids))
        for ver in versions:
            if ver != primary and ver not in got.registered:
                self._vanished(ver)
                write.pop(ver)
        trusted = {v for v in write if v in got.complete and self._trust_cache}
        ask = {v: ([p for p in ids if p in got.claimed] if v in trusted else ids) for v in write}
        found = await asyncio.gather(*(
            self._milvus_states(v, ask[v], "Eventually" if v in trusted else "Strong",
                                v == primary) for v in write))
        milvus: dict[str, dict[str, PinState]] = {}
        for ver, states in zip(list(write), found, strict=True):
            if states is None:
                write.pop(ver)
            elif ver in trusted:  # what Redis holds, Milvus was written first
                milvus[ver] = {**got.states[ver], **states}
            else:
                milvus[ver] = states
        self._untrusted(set(write) - trusted)
        return Lookups(got.tombs, milvus, {v: got.states[v] for v in write})

    async def _milvus_states(self, ver: str, ids: list[str], consistency: str, primary: bool
                             ) -> dict[str, PinState] | None:
        """Milvus states of one version's pins; None if a non-primary version vanished."""
        if not ids:
            return {}
        try:
            return await self._retry("milvus", partial(self.milvus.get_states, ver, ids,
                                                       consistency=consistency))
        except UnknownVersion:
            if primary:
                raise
            self._vanished(ver)
            return None

    def _vanished(self, ver: str) -> None:
        logger.warning("version %s vanished (retired?): no longer written", ver)
        self.versions.forget(ver)

    def _untrusted(self, versions: set[str]) -> None:
        """Log, once per change, the versions whose look-ups read Milvus at Strong."""
        if versions == self._shown_untrusted:
            return
        for ver in sorted(versions - self._shown_untrusted):
            why = ("Redis's maxmemory-policy may evict entries" if not self._trust_cache
                   else "Redis does not mark its cache complete (its data was lost, or "
                        "an older pinfresh wrote it)")
            logger.warning("version %s: every batch reads Milvus at Strong consistency, "
                           "waiting for its time tick, because %s; `pinfresh store verify "
                           "--repair` rebuilds the cache and marks it complete", ver, why)
        self._shown_untrusted = set(versions)

    # ----------------------------------------------------------------- writes
    def _token(self) -> str:
        return f"{self.worker_name}/{_PROCESS_ID}:{next(_tokens)}"

    async def _write(self, records: dict[str, list[EmbeddingRecord]], batch: _Batch,
                     report: BatchReport) -> float:
        """Write records under the claim protocol (see the module docstring).

        Claim, write Milvus then Redis per version, release; then write again
        the pins whose release says another writer may have overwritten them
        in Milvus. Returns the Redis write time of the first round.
        """
        written_at: float | None = None
        todo = records
        for rounds in range(MAX_WRITE_ROUNDS):
            pins = {r.pin_id: r.pin_version for recs in todo.values() for r in recs}
            at, again = await self._write_round(self._token(), todo, pins, batch)
            written_at = at if written_at is None else written_at
            if rounds:
                report.rewritten += len(pins)
            if not again:
                break
            logger.info("%d pin(s) may have been overwritten by another writer in Milvus: "
                        "waiting for older writers, then writing them again", len(again))
            await self._wait_for_older({p: pins[p] for p in again})
            todo = {v: [r for r in recs if r.pin_id in again] for v, recs in todo.items()}
            todo = {v: recs for v, recs in todo.items() if recs}
        else:
            logger.error("pins %s were still contended after %d rounds of writes; `pinfresh "
                         "store verify --repair` reconciles the cache with Milvus",
                         sorted(pins)[:10], MAX_WRITE_ROUNDS)
        return written_at if written_at is not None else time.time()

    async def _write_round(self, token: str, records: dict[str, list[EmbeddingRecord]],
                           pins: dict[str, int], batch: _Batch) -> tuple[float, set[str]]:
        versions = list(records)
        #: per version, the pins this round sent to Milvus (the only ones Redis may get)
        sent: dict[str, list[EmbeddingRecord]] = {v: [] for v in versions}
        claimed = False
        try:
            for ver in versions:
                async def milvus_write(ver: str = ver) -> None:
                    nonlocal claimed
                    await self.milvus.ensure_loaded(ver)  # a load holds no claim
                    # renews the claim and drops what turned stale meanwhile
                    allowed = await self.cache.claim("upsert", token, pins, versions)
                    claimed = True
                    recs = [r for r in records[ver] if allowed[r.pin_id][ver]
                            and not batch.has_failed(self._event(batch, r.pin_id))]
                    async with self._holding(token, pins):
                        sent[ver] = await self._upsert_rows(ver, recs, batch)

                t = time.perf_counter()
                try:
                    await self._retry("milvus", milvus_write)
                except UnknownVersion:
                    if ver == batch.primary:
                        raise
                    logger.warning("version %s vanished (retired?): no longer written", ver)
                    self.versions.forget(ver)
                    sent[ver] = []
                batch.report.add_time("milvus", t)
            self.hooks.at("after_milvus")
            t = time.perf_counter()
            written_at = time.time()
            # a version retired and dropped while this batch ran gets no keys recreated
            others = [v for v in versions if v != batch.primary and sent[v]]
            gone = set(others) - await self._retry("redis", partial(self.cache.registered,
                                                                    others))
            for ver in gone:
                logger.warning("version %s vanished (retired?): no longer written", ver)
                self.versions.forget(ver)
            for ver in versions:
                recs = [r for r in sent[ver] if not batch.has_failed(
                    self._event(batch, r.pin_id))]
                if not recs or ver in gone:
                    continue
                try:
                    res = await self._retry("redis", partial(self.cache.write, ver, recs,
                                                             written_at=written_at))
                except UnknownVersion:
                    if ver == batch.primary:
                        raise
                    self.versions.forget(ver)
                    continue
                if ver == batch.primary:
                    batch.written |= res.written
            batch.report.add_time("redis", t)
            self.hooks.at("after_redis")
        except asyncio.CancelledError:
            raise  # a Milvus call may still land from its thread: the claim expires instead
        except BaseException:
            if claimed:  # every Milvus call has returned: release, telling newer writers
                with contextlib.suppress(Exception):
                    await self.cache.release(token, pins)
            raise
        again = await self._retry("redis", partial(self.cache.release, token, pins))
        return written_at, again

    async def _upsert_rows(self, ver: str, recs: list[EmbeddingRecord], batch: _Batch
                           ) -> list[EmbeddingRecord]:
        """Milvus upsert; returns the rows written.

        A row the server refuses for its content is split off (the batch is
        bisected until it stands alone): in the primary version its event is
        dead-lettered; in another version (a building one) it is logged and
        left out there, so readers of the live version are not deprived of it.
        """
        if not recs:
            return []
        try:
            await self.milvus.upsert(ver, recs)
            return recs
        except StoreRejected as exc:
            if len(recs) == 1:
                ev = self._event(batch, recs[0].pin_id)
                if ver == batch.primary:
                    logger.error("Milvus refused pin %s: %s", ev.pin_id, exc)
                    batch.fail(ev, self._letter(exc.reason, str(exc), batch.original(ev),
                                                ev.pin_id))
                else:
                    logger.error("Milvus refused pin %s in version %s (not the live one): "
                                 "%s; left out of it", ev.pin_id, ver, exc)
                return []
            mid = len(recs) // 2
            return (await self._upsert_rows(ver, recs[:mid], batch)
                    + await self._upsert_rows(ver, recs[mid:], batch))

    @contextlib.asynccontextmanager
    async def _holding(self, token: str, pins: Mapping[str, int]) -> AsyncIterator[None]:
        """Renew ``token``'s claims every quarter of the writer ttl while a Milvus call runs.

        A claim that expired while its write was still on its way (a load, a slow
        server) would let a newer writer of the pin stop waiting and finish
        first; the older write would then land on top of it. A renewal that
        fails (Redis out) is tried again at the next tick.
        """
        async def renew() -> None:
            while True:
                await asyncio.sleep(self.writer_ttl_s / 4)
                try:
                    await self.cache.renew(token, list(pins))
                except Unavailable as exc:
                    logger.warning("could not renew the claims of a Milvus write in flight "
                                   "(trying again in %.0fs): %s", self.writer_ttl_s / 4, exc)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()

    async def _wait_for_older(self, pins: dict[str, int]) -> None:
        """Wait until no other writer of these pins at this or an older version is in flight.

        Claims expire after the writer ttl at worst.
        """
        backoff = Backoff(0.05, 1.0, sleep=self._sleep)
        deadline = time.monotonic() + self.writer_ttl_s + 5.0
        while time.monotonic() < deadline:
            if not await self._retry("redis", partial(self.cache.in_flight, pins)):
                return
            await backoff.wait()

    async def _delete(self, plan: BatchPlan, lookups: Lookups, write: Mapping[str, Encoder],
                      report: BatchReport) -> None:
        """Apply deletes to every known version under the claim protocol."""
        t = time.perf_counter()
        known = await self._retry("redis", self.cache.versions)
        versions = list(write) + sorted(set(known) - set(write))
        todo = {e.pin_id: e.version for e in plan.deletes}
        for ver in versions:  # loads hold no claim
            await self._retry("milvus", partial(self.milvus.ensure_loaded, ver))
        for _ in range(MAX_WRITE_ROUNDS):
            token = self._token()
            allowed = await self._retry("redis", partial(self.cache.claim, "delete", token,
                                                         todo, versions))
            try:
                for ver in versions:
                    # a version whose Milvus holds a newer upsert keeps it (Redis may have
                    # lost it)
                    ids = [p for p in todo if allowed[p][ver] and not (
                        p in lookups.milvus.get(ver, {})
                        and lookups.milvus[ver][p].pin_version > todo[p])]
                    if ids:
                        async with self._holding(token, todo):
                            await self._retry("milvus", partial(self.milvus.delete, ver, ids))
            except asyncio.CancelledError:
                raise
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.cache.release(token, todo)
                raise
            again = await self._retry("redis", partial(self.cache.commit_deletes, token,
                                                       todo, versions))
            if not again:
                break
            await self._wait_for_older({p: todo[p] for p in again})
            todo = {p: todo[p] for p in again}
        report.deleted = len(plan.deletes)
        report.add_time("delete", t)

    async def _repair(self, plan: BatchPlan, write: Mapping[str, Encoder],
                      report: BatchReport) -> None:
        """Rewrite Redis entries that differ from Milvus (conditional: never backwards)."""
        for ver in write:
            ids = list(plan.work[ver].repair)
            if not ids:
                continue
            recs = await self._retry("milvus", partial(self.milvus.get_many, ver, ids,
                                                       consistency="Strong"))
            if recs:
                res = await self._retry("redis", partial(self.cache.write, ver,
                                                         list(recs.values())))
                report.repaired += len(res.written)

    # ------------------------------------------------------------------ fetch
    async def _fetch_one(self, ev: PinEvent, raw: bytes | None, first: int = 1
                         ) -> bytes | DeadLetter:
        """Fetch with retries of transient errors, from attempt ``first`` on.

        ``raw``: the event's message as sent, for its dead letter.
        """
        assert ev.image is not None  # guaranteed by PinEvent validation
        image = ev.image
        backoff = self._backoff()
        backoff.attempt = first - 1
        tried = first - 1

        async def once() -> bytes:
            nonlocal tried
            tried += 1
            async with self._fetch_sem:
                return await self.fetcher.fetch(image)

        def note(_exc: BaseException, _attempt: int, _wait: float) -> None:
            metrics.RETRIES.labels(stage="fetch").inc()

        try:
            # the server's Retry-After (already capped by the fetcher) wins when longer
            return await retry(once, retry_on=(TransientRejection,), backoff=backoff,
                               attempts=self.settings.fetch_attempts - first + 1,
                               on_retry=note)
        except Rejected as exc:
            return self._letter(exc.reason, str(exc), raw, ev.pin_id, tried)
        except Exception as exc:  # noqa: BLE001 - never raise out of the agent
            return self._letter(Reason.FETCH_FAILED, f"unexpected: {exc!r}", raw,
                                ev.pin_id, tried)

    async def _retry_fetch(self, ev: PinEvent, raw: bytes | None, exc: FetchError
                           ) -> bytes | DeadLetter:
        """After a first attempt failed with ``exc``: give up, or wait and try again."""
        if not isinstance(exc, TransientRejection) or self.settings.fetch_attempts <= 1:
            return self._letter(exc.reason, str(exc), raw, ev.pin_id, 1)
        metrics.RETRIES.labels(stage="fetch").inc()
        await self._backoff().wait(exc.retry_after or 0.0)
        return await self._fetch_one(ev, raw, first=2)

    async def _fetch_all(self, events: list[PinEvent], batch: _Batch
                         ) -> dict[str, tuple[bytes, str]]:
        """Fetch each pin's image once (for every version); failures become dead letters.

        The first attempt goes out for the whole batch at once (`Fetcher.fetch_many`:
        local files in one thread hand-off, URLs concurrently); only transient
        failures are retried one by one. The content hashes are computed in a
        thread too (hashlib releases the GIL), one hand-off per batch.
        """
        t = time.perf_counter()
        try:
            first: list[bytes | FetchError] = await self.fetcher.fetch_many(
                [ev.image or "" for ev in events])
        except Exception as exc:  # noqa: BLE001 - never raise out of the agent
            first = [FetchError(Reason.FETCH_FAILED, f"unexpected: {exc!r}") for _ in events]
        got: list[bytes | DeadLetter | None] = [r if isinstance(r, bytes) else None
                                                for r in first]
        again_idx = [i for i, r in enumerate(first) if isinstance(r, FetchError)]
        if again_idx:
            again = await asyncio.gather(*(
                self._retry_fetch(events[i], batch.original(events[i]), first[i])  # type: ignore[arg-type]
                for i in again_idx))
            for i, later in zip(again_idx, again, strict=True):
                got[i] = later
        batch.report.add_time("fetch", t)
        ok = [(ev, res) for ev, res in zip(events, got, strict=True) if isinstance(res, bytes)]
        digests = await asyncio.to_thread(lambda: [hashlib.sha256(b).hexdigest()
                                                   for _, b in ok]) if ok else []
        for ev, item in zip(events, got, strict=True):
            if isinstance(item, DeadLetter):
                batch.fail(ev, item)
        return {ev.pin_id: (data, h) for (ev, data), h in zip(ok, digests, strict=True)}

    # ----------------------------------------------------------------- encode
    async def _build_records(
        self, ver: str, enc: Encoder, todo: list[PinEvent],
        fetched: dict[str, tuple[bytes, str]], m_states: Mapping[str, PinState],
        batch: _Batch,
    ) -> list[EmbeddingRecord]:
        todo = [ev for ev in todo if ev.pin_id in fetched and not batch.has_failed(ev)]
        encode, reuse = split_reuse(todo, {p: h for p, (_, h) in fetched.items()}, m_states)
        records: list[EmbeddingRecord] = []
        if reuse:
            # any consistency will do: only a row of these very bytes is reused, and one
            # that a lagging read misses is encoded instead
            old = await self._retry("milvus", partial(self.milvus.get_many, ver,
                                                      [e.pin_id for e in reuse],
                                                      consistency="Eventually"))
            for ev in reuse:
                # the row may have changed since the lookup (another writer): reuse only a
                # vector of these very bytes
                got = old.get(ev.pin_id)
                if got is not None and got.content_hash == fetched[ev.pin_id][1]:
                    records.append(self._record(ver, ev, old[ev.pin_id].vector,
                                                fetched[ev.pin_id][1],
                                                old[ev.pin_id].encode_time))
                    batch.report.reused += 1
                else:  # vanished in between: encode after all
                    encode.append(ev)
        if encode:
            t = time.perf_counter()
            blobs = [fetched[ev.pin_id][0] for ev in encode]
            # an encoder process that is down is an outage: pause and retry, write nothing
            results = await self._retry("encoder", partial(enc.encode_images_async, blobs))
            batch.report.add_time("encode", t)
            metrics.IMAGES_ENCODED.inc(len(encode))
            batch.report.encoded += len(encode)
            now = time.time()
            for ev, res in zip(encode, results, strict=True):
                if isinstance(res, ImageError):  # one dead letter per event, not per version
                    batch.fail(ev, self._letter(res.reason, str(res), batch.original(ev),
                                                ev.pin_id))
                else:
                    records.append(self._record(ver, ev, res, fetched[ev.pin_id][1], now))
        return records

    # ------------------------------------------------------------ dead letters
    async def _send_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Write dead letters once each per `handle` call, retrying while the DLQ is down."""
        sent = _SENT.get()
        if sent is None:  # outside `handle` (a direct `process` call): this call's own
            sent = set()
        todo = [dl for dl in letters if dl.fingerprint not in sent]

        async def attempt() -> None:
            nonlocal todo
            try:
                await self.dlq.send(todo)
            except Unavailable as exc:
                done = {dl.fingerprint for dl in getattr(exc, "sent", [])}
                sent.update(done)
                todo = [dl for dl in todo if dl.fingerprint not in done]
                raise
            sent.update(dl.fingerprint for dl in todo)
            for dl in todo:
                metrics.DEAD_LETTERS.labels(reason=dl.reason.value).inc()

        if todo:
            await self._retry("dlq", attempt)

    # ---------------------------------------------------------------- isolate
    async def handle(self, messages: Sequence[Message]) -> BatchReport:
        """Apply a batch so that it always completes; what the agent calls.

        Like `process`, but an unexpected exception (a bug, or a library
        error that no backend mapped to `Unavailable` or `Rejected`) never
        stalls the stream: the batch is bisected until the failing event
        stands alone; that event is tried ``internal_error_attempts`` times
        and then dead-lettered with reason ``internal_error``, its traceback
        and the attempt count, and the rest of the batch is applied. No dead
        letter is written twice within one call. Only cancellation propagates.
        """
        # per call (several batches are in flight at once, each in its own task)
        token = _SENT.set(set())
        try:
            return await self._isolate(list(messages))
        finally:
            _SENT.reset(token)

    async def _isolate(self, msgs: list[Message]) -> BatchReport:
        backoff = self._backoff()
        while True:
            try:
                return await self.process(msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - isolate whatever it is
                if len(msgs) > 1:
                    metrics.ISOLATED.inc()
                    logger.warning("batch of %d raised %r: splitting it to isolate the event",
                                   len(msgs), exc)
                    mid = len(msgs) // 2
                    first = await self._isolate(msgs[:mid])
                    return first.merge(await self._isolate(msgs[mid:]))
                if backoff.attempt + 1 < self.settings.internal_error_attempts:
                    delay = await backoff.wait()
                    logger.warning("event raised %r (attempt %d of %d); retried after %.1fs",
                                   exc, backoff.attempt, self.settings.internal_error_attempts,
                                   delay)
                    continue
                return await self._dead_letter_internal(msgs[0], exc, backoff.attempt + 1)

    async def _dead_letter_internal(self, msg: Message, exc: Exception,
                                    attempts: int) -> BatchReport:
        logger.error("event of pin %s dead-lettered as internal_error after %d attempts",
                     guess_pin_id(msg.value, msg.key), attempts, exc_info=exc)
        letter = self._letter(
            Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", msg.value,
            guess_pin_id(msg.value, msg.key), attempts,
            tb="".join(traceback.format_exception(exc)),
        )
        try:
            await self._send_letters([letter])
        except Exception:  # noqa: BLE001 - the sink itself is broken: log, never stall
            metrics.DEAD_LETTERS_DROPPED.inc()
            logger.exception("could not write the internal_error dead letter: %s",
                             letter.model_dump_json())
        report = BatchReport(received=1, dead_letters=[letter])
        metrics.EVENTS.labels(outcome="dead_letter").inc()
        return report

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _event(batch: _Batch, pin_id: str) -> PinEvent:
        return batch.by_pin[pin_id]

    def _record(
        self, ver: str, ev: PinEvent, vector: np.ndarray, digest: str, encode_time: float
    ) -> EmbeddingRecord:
        return EmbeddingRecord(
            pin_id=ev.pin_id, vector=vector, model_version=ver, content_hash=digest,
            pin_version=ev.version, event_time=ev.event_time, encode_time=encode_time,
            image_location=ev.image or "", caption=ev.caption, metadata=dict(ev.metadata),
        )

    def _letter(
        self, reason: Reason, error: str, raw: bytes | None, pin_id: str | None,
        attempts: int = 1, tb: str | None = None,
    ) -> DeadLetter:
        return DeadLetter.build(reason, error, raw, pin_id=pin_id, attempts=attempts,
                                worker=self.worker_name, traceback=tb)

    def _observe(self, report: BatchReport) -> None:
        metrics.BATCH_SIZE.observe(report.received)
        for stage, secs in report.seconds.items():
            metrics.STAGE_SECONDS.labels(stage=stage).observe(secs)
        if self.observe_freshness:
            for f in report.freshness_s:
                metrics.FRESHNESS.observe(max(f, 0.0))
        metrics.EVENTS.labels(outcome="written").inc(report.written)
        metrics.EVENTS.labels(outcome="deleted").inc(report.deleted)
        metrics.EVENTS.labels(outcome="skipped").inc(report.skipped)
        metrics.EVENTS.labels(outcome="dead_letter").inc(len(report.dead_letters))
        logger.info(
            "batch: %d events, %d encoded, %d reused, %d written, %d deleted, %d skipped, "
            "%d repaired, %d rewritten, %d dead letters in %.3fs (%s)",
            report.received, report.encoded, report.reused, report.written, report.deleted,
            report.skipped, report.repaired, report.rewritten, len(report.dead_letters),
            report.seconds.get("total", 0.0),
            " ".join(f"{k}={v:.3f}" for k, v in report.seconds.items() if k != "total"),
        )
