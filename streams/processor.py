"""One micro-batch of pin events: validate, fetch, decode, encode, write, dead-letter.

`PinProcessor` holds the pipeline's rules and knows nothing about Faust, so
unit tests drive it with in-memory fakes and the Faust agent
(`streams.app`) only feeds it batches and acks them afterwards.

Guarantees of `PinProcessor.process` (the agent acks a batch only after it
returns):

* it never raises (except on cancellation): transient store errors are
  retried with capped exponential backoff until they pass, so nothing is
  acknowledged that was not written; permanent per-pin problems become dead
  letters, written to the DLQ before it returns;
* per pin, only the highest-version event of the batch is applied; an event
  older than what Milvus holds, or not newer than the pin's last delete, is
  skipped;
* an event whose version is already stored is not fetched or encoded again
  (a redelivery); if Redis lost it, the cache is repaired from Milvus;
* a newer version whose image bytes hash the same as the stored one reuses the
  stored vector instead of encoding;
* vectors are written to Milvus first, then Redis; deletes remove the pin from
  every known version in both stores.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np

from encoder.errors import EncoderUnavailable, ImageError, Reason
from store.base import EmbeddingRecord, PinState
from store.errors import StoreUnavailable
from streams import metrics
from streams.events import DeadLetter, MalformedEvent, PinEvent, guess_pin_id, parse_event
from streams.fetch import FetchError
from streams.retry import Backoff, retry
from streams.settings import WorkerSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")


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


class StaticVersions:
    """A fixed write set (a backfill, or a worker outside any registry)."""

    def __init__(self, *encoders: Encoder) -> None:
        self._write = {e.version: e for e in encoders}

    async def write_set(self) -> dict[str, Encoder]:
        """The encoders given at construction."""
        return self._write


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
            StoreUnavailable: retry later; if it has a ``sent`` attribute, those
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
        self, version: str, pin_ids: Sequence[str]
    ) -> dict[str, EmbeddingRecord]: ...
    async def get_states(  # noqa: D102
        self, version: str, pin_ids: Sequence[str]
    ) -> dict[str, PinState]: ...


class Cache(VectorStore, Protocol):
    """The Redis-side calls the processor makes (adds pointers and tombstones)."""

    async def ensure_version(self, version: str, dim: int, model: str = "") -> None: ...  # noqa: D102
    async def upsert(  # type: ignore[override]  # noqa: D102
        self, version: str, records: Sequence[EmbeddingRecord], written_at: float | None = None
    ) -> float: ...
    async def set_live_if_none(self, version: str) -> bool: ...  # noqa: D102
    async def versions(self) -> dict[str, dict[str, str]]: ...  # noqa: D102
    async def set_tombstones(self, versions: dict[str, int]) -> None: ...  # noqa: D102
    async def get_tombstones(self, pin_ids: Sequence[str]) -> dict[str, int]: ...  # noqa: D102
    async def record_batch_stats(  # noqa: D102
        self, freshness_s: Sequence[float], encoded: int, keep: int = 10_000
    ) -> None: ...


class _TransientFetch(Exception):  # noqa: N818 - internal marker, never leaves the module
    """A transient `FetchError`, the only kind worth another try."""

    def __init__(self, error: FetchError) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = error.retry_after


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
    dead_letters: list[DeadLetter] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def merge(self, other: BatchReport) -> BatchReport:
        """Add up two reports (the halves of a batch split by isolation)."""
        out = BatchReport()
        for name in ("received", "encoded", "reused", "written", "deleted", "skipped",
                     "repaired"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.dead_letters = self.dead_letters + other.dead_letters
        out.freshness_s = self.freshness_s + other.freshness_s
        out.seconds = {k: self.seconds.get(k, 0.0) + other.seconds.get(k, 0.0)
                       for k in self.seconds.keys() | other.seconds.keys()}
        return out


class PinProcessor:
    """Applies batches of pin events to the stores (see module docstring)."""

    def __init__(
        self, *, encoder: Encoder, milvus: VectorStore, cache: Cache, fetcher: Fetch,
        dlq: DeadLetterSink, settings: WorkerSettings, worker_name: str = "",
        versions: VersionSource | None = None, observe_freshness: bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.encoder = encoder
        self.versions: VersionSource = versions or StaticVersions(encoder)
        self.observe_freshness = observe_freshness
        self.milvus = milvus
        self.cache = cache
        self.fetcher = fetcher
        self.dlq = dlq
        self.settings = settings
        self.worker_name = worker_name
        self._sleep = sleep
        self._fetch_sem = asyncio.Semaphore(settings.fetch_concurrency)
        #: Fingerprints of the dead letters written during the current `handle` call.
        self._sent: set[str] = set()

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
        first = next(iter(write))
        if await self._retry("redis", partial(self.cache.set_live_if_none, first)):
            await self._retry("milvus", partial(self.milvus.set_live, first))
            logger.info("model version %s is now live (first version)", first)
        for ver in write:
            metrics.MODEL_INFO.labels(version=ver).set(1)

    # ------------------------------------------------------------------ retry
    def _backoff(self) -> Backoff:
        return Backoff(self.settings.retry_backoff_s, self.settings.retry_backoff_max_s,
                       sleep=self._sleep)

    async def _retry(self, stage: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` until it raises no outage (`StoreUnavailable`, `EncoderUnavailable`).

        Capped exponential backoff with jitter, at least the ``retry_after``
        the error asks for; for ever, since nothing may be acknowledged unwritten.
        """
        def note(exc: BaseException, attempt: int, wait: float) -> None:
            metrics.RETRIES.labels(stage=stage).inc()
            logger.warning("%s unavailable (attempt %d, retry in %.1fs): %s",
                           stage, attempt, wait, exc)

        return await retry(fn, retry_on=(StoreUnavailable, EncoderUnavailable),
                           backoff=self._backoff(), on_retry=note)

    # ---------------------------------------------------------------- process
    async def process(self, messages: Sequence[Message]) -> BatchReport:
        """Apply one micro-batch; see the module docstring for the guarantees."""
        report = BatchReport(received=len(messages))
        t0 = time.perf_counter()
        events: dict[str, PinEvent] = {}
        for msg in messages:
            try:
                ev = parse_event(msg.value)
            except MalformedEvent as exc:
                report.dead_letters.append(self._letter(
                    Reason.MALFORMED_EVENT, str(exc), msg.value, guess_pin_id(msg.value, msg.key)
                ))
                continue
            cur = events.get(ev.pin_id)
            if cur is None or ev.version >= cur.version:
                events[ev.pin_id] = ev
            if cur is not None:
                report.skipped += 1

        if events:
            await self._apply(list(events.values()), report)
        if report.dead_letters:
            await self._send_letters(report.dead_letters)
        report.seconds["total"] = time.perf_counter() - t0
        self._observe(report)
        if self.observe_freshness and (report.freshness_s or report.encoded):
            try:
                await self.cache.record_batch_stats(report.freshness_s, report.encoded)
            except StoreUnavailable as exc:  # statistics only: never hold the batch for them
                logger.warning("could not record batch statistics: %s", exc)
        return report

    async def _send_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Write dead letters once each per `handle` call, retrying while the DLQ is down."""
        todo = [dl for dl in letters if dl.fingerprint not in self._sent]

        async def attempt() -> None:
            nonlocal todo
            try:
                await self.dlq.send(todo)
            except StoreUnavailable as exc:
                done = {dl.fingerprint for dl in getattr(exc, "sent", [])}
                self._sent |= done
                todo = [dl for dl in todo if dl.fingerprint not in done]
                raise
            self._sent |= {dl.fingerprint for dl in todo}
            for dl in todo:
                metrics.DEAD_LETTERS.labels(reason=dl.reason.value).inc()

        if todo:
            await self._retry("dlq", attempt)

    # ---------------------------------------------------------------- isolate
    async def handle(self, messages: Sequence[Message]) -> BatchReport:
        """Apply a batch so that it always completes; what the agent calls.

        Like `process`, but an unexpected exception (a bug, a library error
        that is not a `StoreUnavailable`) never stalls the stream: the batch is
        bisected until the failing event stands alone; that event is tried
        ``internal_error_attempts`` times and then dead-lettered with reason
        ``internal_error``, its traceback and the attempt count, and the rest
        of the batch is applied. No dead letter is written twice within one
        call. Only cancellation propagates.
        """
        self._sent = set()
        try:
            return await self._isolate(list(messages))
        finally:
            self._sent = set()

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

    async def _apply(self, events: list[PinEvent], report: BatchReport) -> None:
        bad = self.settings.fault_raise_for_pin
        if bad and any(e.pin_id == bad for e in events):
            raise RuntimeError(f"fault injection: processing pin {bad} raises")
        write = await self._retry("registry", self.versions.write_set)
        primary = next(iter(write))
        ids = [e.pin_id for e in events]
        t = time.perf_counter()
        # every lookup of the batch at once: tombstones, then each version in both stores
        lookups: list[Awaitable[Any]] = [
            self._retry("redis", partial(self.cache.get_tombstones, ids))]
        for ver in write:
            lookups.append(self._retry("milvus", partial(self.milvus.get_states, ver, ids)))
            lookups.append(self._retry("redis", partial(self.cache.get_states, ver, ids)))
        found: list[Any] = await asyncio.gather(*lookups)
        tombs: dict[str, int] = found[0]
        states: dict[str, tuple[dict[str, PinState], dict[str, PinState]]] = {
            ver: (found[1 + 2 * k], found[2 + 2 * k]) for k, ver in enumerate(write)}
        report.seconds["lookup"] = time.perf_counter() - t

        # deletes: stale only if a newer state or delete is already applied in the primary
        m_primary = states[primary][0]
        deletes = [ev for ev in events if ev.op == "delete"
                   and tombs.get(ev.pin_id, -1) < ev.version
                   and not (ev.pin_id in m_primary
                            and m_primary[ev.pin_id].pin_version > ev.version)]
        report.skipped += sum(1 for ev in events if ev.op == "delete") - len(deletes)
        if deletes:
            await self._delete(deletes, report)

        plans: dict[str, tuple[list[PinEvent], list[str]]] = {}
        for ver in write:
            m_states, r_states = states[ver]
            todo: list[PinEvent] = []
            repair: list[str] = []
            for ev in events:
                if ev.op == "delete":
                    continue
                ms, rs = m_states.get(ev.pin_id), r_states.get(ev.pin_id)
                if tombs.get(ev.pin_id, -1) >= ev.version or (ms and ms.pin_version > ev.version):
                    if ver == primary:
                        report.skipped += 1  # stale: a newer state or delete already applied
                    if ms and rs != ms:
                        repair.append(ev.pin_id)
                elif ms and ms.pin_version == ev.version and not ev.reencode:
                    if ver == primary:
                        report.skipped += 1  # redelivery of what is stored
                    if rs != ms:
                        repair.append(ev.pin_id)
                else:
                    todo.append(ev)
            plans[ver] = (todo, repair)

        wanted = {ev.pin_id: ev for todo, _ in plans.values() for ev in todo}
        fetched = await self._fetch_all(list(wanted.values()), report) if wanted else {}
        failed: set[str] = {dl.pin_id for dl in report.dead_letters if dl.pin_id}
        for ver, enc in write.items():
            todo, repair = plans[ver]
            todo = [ev for ev in todo if ev.pin_id in fetched]
            records = await self._build_records(ver, enc, todo, fetched, states[ver][0], report,
                                                failed)
            if repair:
                recs = await self._retry("milvus", partial(self.milvus.get_many, ver, repair))
                records.extend(recs.values())
                report.repaired += len(recs)
            if not records:
                continue
            fresh = [r for r in records if r.pin_id not in repair]
            self._fault("after_encode")
            t = time.perf_counter()
            await self._retry("milvus", partial(self.milvus.upsert, ver, fresh))
            report.seconds["milvus"] = report.seconds.get("milvus", 0.0) + time.perf_counter() - t
            self._fault("after_milvus")
            t = time.perf_counter()
            written_at = await self._retry("redis", partial(self.cache.upsert, ver, records))
            report.seconds["redis"] = report.seconds.get("redis", 0.0) + time.perf_counter() - t
            self._fault("after_redis")
            if ver == primary:
                report.written = len(fresh)
                # clock skew between producer and worker can make a sample negative: clamp it
                report.freshness_s = [max(0.0, written_at - r.event_time) for r in fresh]

    async def _delete(self, deletes: list[PinEvent], report: BatchReport) -> None:
        ids = [e.pin_id for e in deletes]
        # tombstones first: a concurrent writer (a backfill) that checks them after its
        # own write then sees the delete, whichever of the two writes lands last
        await self._retry(
            "redis", lambda: self.cache.set_tombstones({e.pin_id: e.version for e in deletes})
        )
        known = await self._retry("redis", self.cache.versions)
        write = await self._retry("registry", self.versions.write_set)
        versions = set(known) | set(write)
        for v in sorted(versions):
            await self._retry("milvus", partial(self.milvus.delete, v, ids))
            await self._retry("redis", partial(self.cache.delete, v, ids))
        report.deleted = len(ids)

    async def _fetch_one(self, ev: PinEvent, first: int = 1) -> bytes | DeadLetter:
        """Fetch with retries of transient errors, from attempt ``first`` on."""
        assert ev.image is not None  # guaranteed by PinEvent validation
        image = ev.image
        backoff = self._backoff()
        backoff.attempt = first - 1
        tried = first - 1

        async def once() -> bytes:
            nonlocal tried
            tried += 1
            async with self._fetch_sem:
                try:
                    return await self.fetcher.fetch(image)
                except FetchError as exc:
                    if exc.transient:
                        raise _TransientFetch(exc) from exc
                    raise

        def note(_exc: BaseException, _attempt: int, _wait: float) -> None:
            metrics.RETRIES.labels(stage="fetch").inc()

        try:
            # the server's Retry-After (already capped by the fetcher) wins when longer
            return await retry(once, retry_on=(_TransientFetch,), backoff=backoff,
                               attempts=self.settings.fetch_attempts - first + 1,
                               on_retry=note)
        except _TransientFetch as exc:
            return self._letter(exc.error.reason, str(exc.error), ev.to_bytes(), ev.pin_id,
                                tried)
        except FetchError as exc:
            return self._letter(exc.reason, str(exc), ev.to_bytes(), ev.pin_id, tried)
        except Exception as exc:  # noqa: BLE001 - never raise out of the agent
            return self._letter(Reason.FETCH_FAILED, f"unexpected: {exc!r}", ev.to_bytes(),
                                ev.pin_id, tried)

    async def _retry_fetch(self, ev: PinEvent, exc: FetchError) -> bytes | DeadLetter:
        """After a first attempt failed with ``exc``: give up, or wait and try again."""
        if not exc.transient or self.settings.fetch_attempts <= 1:
            return self._letter(exc.reason, str(exc), ev.to_bytes(), ev.pin_id, 1)
        metrics.RETRIES.labels(stage="fetch").inc()
        await self._backoff().wait(exc.retry_after or 0.0)
        return await self._fetch_one(ev, first=2)

    async def _fetch_all(self, events: list[PinEvent], report: BatchReport
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
            first = [FetchError(Reason.FETCH_FAILED, f"unexpected: {exc!r}", transient=True)
                     for _ in events]
        got: list[bytes | DeadLetter | None] = [r if isinstance(r, bytes) else None
                                                for r in first]
        retry = [i for i, r in enumerate(first) if isinstance(r, FetchError)]
        if retry:
            again = await asyncio.gather(*(self._retry_fetch(events[i], first[i])  # type: ignore[arg-type]
                                           for i in retry))
            for i, later in zip(retry, again, strict=True):
                got[i] = later
        report.seconds["fetch"] = time.perf_counter() - t
        ok = [(ev, res) for ev, res in zip(events, got, strict=True) if isinstance(res, bytes)]
        digests = await asyncio.to_thread(lambda: [hashlib.sha256(b).hexdigest()
                                                   for _, b in ok]) if ok else []
        for item in got:
            if isinstance(item, DeadLetter):
                report.dead_letters.append(item)
        return {ev.pin_id: (data, h) for (ev, data), h in zip(ok, digests, strict=True)}

    async def _build_records(
        self, ver: str, enc: Encoder, todo: list[PinEvent],
        fetched: dict[str, tuple[bytes, str]], m_states: dict[str, PinState],
        report: BatchReport, failed: set[str],
    ) -> list[EmbeddingRecord]:
        ready: list[tuple[PinEvent, bytes, str]] = []
        reuse: dict[str, tuple[PinEvent, str]] = {}
        for ev in todo:
            data, digest = fetched[ev.pin_id]
            ms = m_states.get(ev.pin_id)
            if ms is not None and ms.content_hash == digest and not ev.reencode:
                reuse[ev.pin_id] = (ev, digest)
            else:
                ready.append((ev, data, digest))

        records: list[EmbeddingRecord] = []
        if reuse:
            old = await self._retry("milvus", partial(self.milvus.get_many, ver, list(reuse)))
            for pid, (ev, digest) in reuse.items():
                if pid in old:
                    records.append(self._record(ver, ev, old[pid].vector, digest,
                                                old[pid].encode_time))
                    report.reused += 1
                else:  # vanished in between: encode after all
                    ready.append((ev, fetched[pid][0], digest))
        if ready:
            t = time.perf_counter()
            blobs = [b for _, b, _ in ready]
            # an encoder process that is down is an outage: pause and retry, write nothing
            results = await self._retry("encoder", partial(enc.encode_images_async, blobs))
            report.seconds["encode"] = report.seconds.get("encode", 0.0) + time.perf_counter() - t
            metrics.IMAGES_ENCODED.inc(len(ready))
            report.encoded += len(ready)
            now = time.time()
            for (ev, _, digest), res in zip(ready, results, strict=True):
                if isinstance(res, ImageError):
                    if ev.pin_id not in failed:  # one dead letter per pin, not per version
                        failed.add(ev.pin_id)
                        report.dead_letters.append(self._letter(
                            res.reason, str(res), ev.to_bytes(), ev.pin_id))
                else:
                    records.append(self._record(ver, ev, res, digest, now))
        return records

    def _fault(self, point: str) -> None:
        """Fault injection for the crash tests: die here, as a SIGKILL would."""
        if self.settings.fault_crash_at == point:
            logger.warning("fault injection: killing this worker %s", point)
            os.kill(os.getpid(), signal.SIGKILL)

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
            "%d repaired, %d dead letters in %.3fs (%s)",
            report.received, report.encoded, report.reused, report.written, report.deleted,
            report.skipped, report.repaired, len(report.dead_letters),
            report.seconds.get("total", 0.0),
            " ".join(f"{k}={v:.3f}" for k, v in report.seconds.items() if k != "total"),
        )
