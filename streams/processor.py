"""One micro-batch of pin events: parse, look up, plan, delete, fetch and encode, write, letters.

`PinProcessor` holds the pipeline's rules and knows nothing about Faust, so
unit tests drive it with in-memory fakes (`streams.ports` says what it needs)
and the Faust agent (`streams.app`) only feeds it batches and acks them
afterwards. `PinProcessor.process` is a short orchestration of named steps,
each in a module of its own:

1. **Parse** (`streams.batch.parse`): every message is validated; a malformed
   one, or one whose Kafka key is not its pin id (``key_mismatch``), becomes a
   dead letter. Per pin only the newest event of the batch is kept.
2. **Look up** (`streams.lookup`): tombstones, writer claims and every written
   version's pin states, from Redis; Milvus only for pins Redis may not know
   (the consistency of each read, and why, is in that module).
3. **Plan** (`streams.plan.plan_batch`, pure): deletes to apply, images to
   fetch per version, cache entries to repair, skips.
4. **Delete** (`streams.claims`), **fetch and encode or reuse** (`streams.gather`).
5. **Write** (`streams.claims`): under the per-pin claim protocol (claim,
   Milvus, then Redis, then release; again when another writer may have
   overwritten a pin), which docs/integration.md, "Concurrent writers",
   states; then repairs.
6. **Dead-letter** (`streams.letters`): letters are written to the DLQ before
   `process` returns; the batch's metrics and statistics after.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any

from encoder.errors import Unavailable
from store.base import EmbeddingRecord
from store.registry import mark_complete_if_empty
from streams import metrics
from streams.batch import Batch, BatchReport, Message, parse
from streams.claims import MAX_WRITE_ROUNDS, ClaimWriter
from streams.gather import Gather
from streams.letters import REPORT_EVERY_S, REPORT_SAME_S, Letters, Reporter
from streams.lookup import LookUp
from streams.plan import plan_batch
from streams.ports import (
    Cache,
    DeadLetterSink,
    Encoder,
    Fetch,
    ProcessorHooks,
    StaticVersions,
    VectorStore,
    VersionSource,
)
from streams.settings import WorkerSettings
from streams.steps import Context

__all__ = ["MAX_WRITE_ROUNDS", "REPORT_EVERY_S", "REPORT_SAME_S", "BatchReport", "Encoder",
           "Message", "PinProcessor", "ProcessorHooks", "StaticVersions"]

logger = logging.getLogger(__name__)


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
        self.ctx = Context(milvus=milvus, cache=cache, settings=settings,
                           versions=versions or StaticVersions(encoder),
                           worker_name=worker_name or f"pid{os.getpid()}",
                           hooks=hooks or ProcessorHooks(), sleep=sleep,
                           writer_ttl_s=writer_ttl_s)
        self.lookup = LookUp(self.ctx)
        self.gather = Gather(self.ctx, fetcher)
        self.claims = ClaimWriter(self.ctx)
        self.letters = Letters(self.ctx, dlq)
        self.reporter = Reporter(self.ctx, observe_freshness)

    # the parts a caller or a test sets or reads
    @property
    def version(self) -> str:
        """The model version this processor writes."""
        return self.encoder.version

    @property
    def versions(self) -> VersionSource:
        """Where the write set comes from."""
        return self.ctx.versions

    @property
    def worker_name(self) -> str:
        """This writer's name in reports, tokens and letters."""
        return self.ctx.worker_name

    @property
    def hooks(self) -> ProcessorHooks:
        """Fault-injection seams (a test's own entry point sets them)."""
        return self.ctx.hooks

    @hooks.setter
    def hooks(self, hooks: ProcessorHooks) -> None:
        self.ctx.hooks = hooks

    @property
    def dlq(self) -> DeadLetterSink:
        """Where dead letters go."""
        return self.letters.dlq

    @dlq.setter
    def dlq(self, dlq: DeadLetterSink) -> None:
        self.letters.dlq = dlq

    @property
    def report_extra(self) -> Callable[[], Mapping[str, Any]]:
        """What the worker adds to each writer report (partitions held, host, pid, ...)."""
        return self.reporter.extra

    @report_extra.setter
    def report_extra(self, fn: Callable[[], Mapping[str, Any]]) -> None:
        self.reporter.extra = fn

    async def start(self) -> None:
        """Create the collections and namespaces of the write set; make the first live if none is.

        Called once before the first batch; retried while a store is down.
        """
        ctx = self.ctx
        write = await ctx.retry("registry", ctx.versions.write_set)
        for ver, enc in write.items():
            await ctx.retry("milvus", partial(ctx.milvus.ensure_version, ver, enc.dim))
            await ctx.retry("redis", partial(ctx.cache.ensure_version, ver, enc.dim))
            await ctx.retry("redis", partial(mark_complete_if_empty, ctx.milvus, ctx.cache, ver))
        first = next(iter(write))
        if await ctx.retry("redis", partial(ctx.cache.set_live_if_none, first)):
            await ctx.retry("milvus", partial(ctx.milvus.set_live, first))
            logger.info("model version %s is now live (first version)", first)
        self.reporter.show_versions(write)
        policy = await ctx.retry("redis", ctx.cache.eviction_policy)
        if policy not in (None, "noeviction"):
            self.lookup.trust_cache = False
            logger.error("Redis maxmemory-policy is %s: it may evict tombstones and writer "
                         "claims (keys with a TTL) and cached vectors, and then a deleted pin "
                         "can come back and writers can race; every batch reads Milvus at "
                         "Strong consistency meanwhile; set it to noeviction "
                         "(docs/operations.md)", policy)

    def versions_in_flight(self) -> set[str]:
        """The versions that batches in flight write (their write sets, taken at start)."""
        return set().union(*self.reporter.active.values())

    async def refresh_write_set(self) -> None:
        """Read the write set now, batches or not (the worker calls it periodically).

        An idle worker thus opens a new version's encoder before its first event,
        releases a retired one's (`streams.refresh.RegistryVersions`), keeps
        ``pinfresh_worker_model_info`` current and reports, so `status` tells a
        worker that stopped from one with nothing to do. A store outage skips a
        round.
        """
        try:
            write = await self.ctx.versions.write_set()
        except Unavailable as exc:
            logger.warning("write set not refreshed (next try in the next batch or "
                           "interval): %s", exc)
            return
        self.reporter.show_versions(write)
        with contextlib.suppress(Unavailable):
            await self.reporter.report(list(write), tick=True)

    # ---------------------------------------------------------------- process
    async def process(self, messages: Sequence[Message]) -> BatchReport:
        """Apply one micro-batch; see the module docstring for the steps and guarantees."""
        report = BatchReport(received=len(messages))
        t0 = time.perf_counter()
        batch, letters = parse(messages, report, self.ctx.letter)  # step 1
        if batch.events:
            self.ctx.hooks.before_batch(batch.events)
            await self._apply(batch)
        report.dead_letters = letters + batch.letters()
        if report.dead_letters:  # step 6
            await self.letters.send(report.dead_letters)
        report.seconds["total"] = time.perf_counter() - t0
        await self.reporter.observe(report)
        return report

    async def _apply(self, batch: Batch) -> None:
        """Steps 2 to 5 with the write set taken now, reported while the batch runs."""
        write = dict(await self.ctx.retry("registry", self.ctx.versions.write_set))
        self.reporter.show_versions(write)
        key = id(batch)
        self.reporter.active[key] = frozenset(write)
        # reported before any write, and again while the batch runs (an outage can hold it
        # for long): `versions retire` waits until no batch holds a version
        await self.reporter.report(list(write))
        ticker = asyncio.create_task(self.reporter.keep_reporting(list(write)))
        try:
            await self._steps(batch, write)
        finally:
            ticker.cancel()
            self.reporter.active.pop(key, None)
        await self.reporter.report(list(write))

    async def _steps(self, batch: Batch, write: dict[str, Encoder]) -> None:
        report = batch.report
        primary = next(iter(write))
        t = time.perf_counter()
        lookups = await self.lookup.run([e.pin_id for e in batch.events], write,  # step 2
                                        primary)
        report.add_time("lookup", t)
        plan = plan_batch(batch.events, list(write), lookups)  # step 3
        batch.primary = primary
        report.skipped += len(plan.skipped)
        if plan.deletes:  # step 4
            await self.claims.delete(plan, lookups, write, report)
        fetched = await self.gather.fetch_all(plan.fetches(), batch) if plan.fetches() else {}
        records: dict[str, list[EmbeddingRecord]] = {}
        for ver, enc in write.items():
            recs = await self.gather.records(ver, enc, list(plan.work[ver].fetch), fetched,
                                             lookups.milvus[ver], batch)
            if recs:
                records[ver] = recs
        if records:  # step 5
            self.ctx.hooks.at("after_encode")
            written_at = await self.claims.write(records, batch, report)
            fresh = [r for r in records.get(primary, []) if r.pin_id in batch.written]
            report.written = len(fresh)
            # clock skew between producer and worker can make a sample negative: clamp it
            report.freshness_s = [max(0.0, written_at - r.event_time) for r in fresh]
        await self.claims.repair(plan, write, report)

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
        with self.letters.once_per_call():
            return await self._isolate(list(messages))

    async def _isolate(self, msgs: list[Message]) -> BatchReport:
        backoff = self.ctx.backoff()
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
                if backoff.attempt + 1 < self.ctx.settings.internal_error_attempts:
                    delay = await backoff.wait()
                    logger.warning("event raised %r (attempt %d of %d); retried after %.1fs",
                                   exc, backoff.attempt,
                                   self.ctx.settings.internal_error_attempts, delay)
                    continue
                return await self.letters.internal_error(msgs[0], exc, backoff.attempt + 1)
