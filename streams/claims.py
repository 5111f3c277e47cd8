"""Step 5 of the write path: writes and deletes under the per-pin claim protocol.

Read this module beside ``docs/integration.md``, "Concurrent writers": it is
that protocol, and nothing else decides how a pin is written.

Milvus has no conditional write, so every writer of a pin (two workers after
a rebalance, the backfill beside the stream, a reader refilling the cache)
goes through Redis, where every write is a conditional script
(``store/redis/lua``):

1. **Claim** (`Cache.claim`): register as a writer of the pin at its version.
   The claim refuses a version that is stale in Redis (an older version than
   stored, or not newer than the tombstone); a delete's claim raises the
   tombstone first. It is renewed before every retry of the Milvus call, and
   every quarter of the writer ttl while the call runs (`ClaimWriter.holding`),
   so a slow write never outlives its claim. Collections are loaded before
   the claim (a load after an outage can take minutes).
2. **Milvus**: upsert (or delete) what the claim allowed.
3. **Redis**: the conditional write (`Cache.write`: never below the stored
   version or the tombstone); a delete removes the pin where it is not newer.
4. **Release** (`Cache.release`, a delete's `Cache.commit_deletes`): a writer
   that releases marks every other writer of the pin at its version or above as
   possibly overwritten in Milvus, and is told to write again when it was so
   marked or when a writer at its version or below is still in flight (or
   abandoned its claim, which then expires after the writer ttl and marks the
   others). It then waits until no such writer is in flight and writes the pin
   again under a new claim, which refuses it if something newer has landed
   meanwhile. A release is idempotent: run again after a lost reply, it
   answers the same.

Two writers of one version (a redelivery racing a re-encode) settle the same
way: the one that releases last writes again, so both stores hold one writer's
content. After `MAX_WRITE_ROUNDS` rounds a pin still contended is logged
(``store verify --repair`` reconciles it). Whichever writer finishes last,
both stores end at the pin's highest version, and a deleted pin stays deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from functools import partial

from encoder.errors import StoreRejected, Unavailable, UnknownVersion
from store.base import EmbeddingRecord
from streams.batch import Batch, BatchReport
from streams.plan import BatchPlan, Lookups
from streams.retry import Backoff
from streams.steps import Context

__all__ = ["MAX_WRITE_ROUNDS", "ClaimWriter"]

logger = logging.getLogger(__name__)
_tokens = itertools.count()
#: Rounds of writing again (another writer may have overwritten a pin in Milvus) before
#: giving up on a pin with an error (equal versions racing could flag each other again).
MAX_WRITE_ROUNDS = 8
#: This process's part of every writer token (a restarted container keeps host and pid).
_PROCESS_ID = uuid.uuid4().hex[:12]


class ClaimWriter:
    """Writes records and applies deletes under the claim protocol (module docstring)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def token(self) -> str:
        """A new writer token: one per round of writes."""
        return f"{self.ctx.worker_name}/{_PROCESS_ID}:{next(_tokens)}"

    # ----------------------------------------------------------------- upserts
    async def write(self, records: dict[str, list[EmbeddingRecord]], batch: Batch,
                    report: BatchReport) -> float:
        """Write records: claim, Milvus then Redis per version, release; again if told.

        Returns the Redis write time of the first round.
        """
        written_at: float | None = None
        todo = records
        for rounds in range(MAX_WRITE_ROUNDS):
            pins = {r.pin_id: r.pin_version for recs in todo.values() for r in recs}
            at, again = await self._round(self.token(), todo, pins, batch)
            written_at = at if written_at is None else written_at
            if rounds:
                report.rewritten += len(pins)
            if not again:
                break
            logger.info("%d pin(s) may have been overwritten by another writer in Milvus: "
                        "waiting for older writers, then writing them again", len(again))
            await self.wait_for_older({p: pins[p] for p in again})
            todo = {v: [r for r in recs if r.pin_id in again] for v, recs in todo.items()}
            todo = {v: recs for v, recs in todo.items() if recs}
        else:
            logger.error("pins %s were still contended after %d rounds of writes; `pinfresh "
                         "store verify --repair` reconciles the cache with Milvus",
                         sorted(pins)[:10], MAX_WRITE_ROUNDS)
        return written_at if written_at is not None else time.time()

    async def _round(self, token: str, records: dict[str, list[EmbeddingRecord]],
                     pins: dict[str, int], batch: Batch) -> tuple[float, set[str]]:
        """One round: claim and write Milvus per version, then Redis, then release."""
        #: per version, the records this round sent to Milvus (the only ones Redis may get)
        sent: dict[str, list[EmbeddingRecord]] = {v: [] for v in records}
        claimed = [False]  # set once a claim went through (then an error releases it)
        try:
            for ver in records:
                t = time.perf_counter()
                try:
                    sent[ver] = await self.ctx.retry("milvus", partial(
                        self._claim_and_upsert, token, ver, records, pins, batch, claimed))
                except UnknownVersion:
                    if ver == batch.primary:
                        raise
                    self.ctx.vanished(ver)
                batch.report.add_time("milvus", t)
            self.ctx.hooks.at("after_milvus")
            t = time.perf_counter()
            written_at = time.time()
            await self._write_redis(sent, batch, written_at)
            batch.report.add_time("redis", t)
            self.ctx.hooks.at("after_redis")
        except asyncio.CancelledError:
            raise  # a Milvus call may still land from its thread: the claim expires instead
        except BaseException:
            if claimed[0]:  # every Milvus call has returned: release, telling newer writers
                with contextlib.suppress(Exception):
                    await self.ctx.cache.release(token, pins)
            raise
        again = await self.ctx.retry("redis", partial(self.ctx.cache.release, token, pins))
        return written_at, again

    async def _claim_and_upsert(self, token: str, ver: str,
                                records: dict[str, list[EmbeddingRecord]],
                                pins: dict[str, int], batch: Batch, claimed: list[bool],
                                ) -> list[EmbeddingRecord]:
        """Load (no claim held), claim (renewed on every retry), upsert what it allows."""
        await self.ctx.milvus.ensure_loaded(ver)
        # renews the claim and drops what turned stale meanwhile
        allowed = await self.ctx.cache.claim("upsert", token, pins, list(records))
        claimed[0] = True
        recs = [r for r in records[ver] if allowed[r.pin_id][ver]
                and not batch.has_failed(batch.by_pin[r.pin_id])]
        async with self.holding(token, pins):
            return await self._upsert_rows(ver, recs, batch)

    async def _write_redis(self, sent: dict[str, list[EmbeddingRecord]], batch: Batch,
                           written_at: float) -> None:
        """Step 3: the conditional Redis writes of what Milvus got."""
        # a version retired and dropped while this batch ran gets no keys recreated
        others = [v for v in sent if v != batch.primary and sent[v]]
        gone = set(others) - await self.ctx.retry("redis", partial(
            self.ctx.cache.registered, others))
        for ver in gone:
            self.ctx.vanished(ver)
        for ver, recs in sent.items():
            recs = [r for r in recs if not batch.has_failed(batch.by_pin[r.pin_id])]
            if not recs or ver in gone:
                continue
            try:
                res = await self.ctx.retry("redis", partial(self.ctx.cache.write, ver, recs,
                                                            written_at=written_at))
            except UnknownVersion:
                if ver == batch.primary:
                    raise
                self.ctx.versions.forget(ver)
                continue
            if ver == batch.primary:
                batch.written |= res.written

    async def _upsert_rows(self, ver: str, recs: list[EmbeddingRecord], batch: Batch
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
            await self.ctx.milvus.upsert(ver, recs)
            return recs
        except StoreRejected as exc:
            if len(recs) == 1:
                ev = batch.by_pin[recs[0].pin_id]
                if ver == batch.primary:
                    logger.error("Milvus refused pin %s: %s", ev.pin_id, exc)
                    batch.fail(ev, self.ctx.letter(exc.reason, str(exc), batch.original(ev),
                                                   ev.pin_id))
                else:
                    logger.error("Milvus refused pin %s in version %s (not the live one): "
                                 "%s; left out of it", ev.pin_id, ver, exc)
                return []
            mid = len(recs) // 2
            return (await self._upsert_rows(ver, recs[:mid], batch)
                    + await self._upsert_rows(ver, recs[mid:], batch))

    # ----------------------------------------------------------------- claims
    @contextlib.asynccontextmanager
    async def holding(self, token: str, pins: Mapping[str, int]) -> AsyncIterator[None]:
        """Renew ``token``'s claims every quarter of the writer ttl while a Milvus call runs.

        A claim that expired while its write was still on its way (a load, a slow
        server) would let a newer writer of the pin stop waiting and finish
        first; the older write would then land on top of it. A renewal that
        fails (Redis out) is tried again at the next tick.
        """
        every = self.ctx.writer_ttl_s / 4

        async def renew() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await self.ctx.cache.renew(token, list(pins))
                except Unavailable as exc:
                    logger.warning("could not renew the claims of a Milvus write in flight "
                                   "(trying again in %.0fs): %s", every, exc)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()

    async def wait_for_older(self, pins: dict[str, int]) -> None:
        """Wait until no other writer of these pins at this or an older version is in flight.

        Claims expire after the writer ttl at worst.
        """
        backoff = Backoff(0.05, 1.0, sleep=self.ctx.sleep)
        deadline = time.monotonic() + self.ctx.writer_ttl_s + 5.0
        while time.monotonic() < deadline:
            if not await self.ctx.retry("redis", partial(self.ctx.cache.in_flight, pins)):
                return
            await backoff.wait()

    # ----------------------------------------------------------------- deletes
    async def delete(self, plan: BatchPlan, lookups: Lookups, write: Mapping[str, object],
                     report: BatchReport) -> None:
        """Apply deletes to every known version under the claim protocol."""
        t = time.perf_counter()
        known = await self.ctx.retry("redis", self.ctx.cache.versions)
        versions = list(write) + sorted(set(known) - set(write))
        todo = {e.pin_id: e.version for e in plan.deletes}
        for ver in versions:  # loads hold no claim
            await self.ctx.retry("milvus", partial(self.ctx.milvus.ensure_loaded, ver))
        for _ in range(MAX_WRITE_ROUNDS):
            token = self.token()
            allowed = await self.ctx.retry("redis", partial(
                self.ctx.cache.claim, "delete", token, todo, versions))
            try:
                for ver in versions:
                    # a version whose Milvus holds a newer upsert keeps it (Redis may have
                    # lost it)
                    ids = [p for p in todo if allowed[p][ver] and not (
                        p in lookups.milvus.get(ver, {})
                        and lookups.milvus[ver][p].pin_version > todo[p])]
                    if ids:
                        async with self.holding(token, todo):
                            await self.ctx.retry("milvus", partial(
                                self.ctx.milvus.delete, ver, ids))
            except asyncio.CancelledError:
                raise
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.ctx.cache.release(token, todo)
                raise
            again = await self.ctx.retry("redis", partial(
                self.ctx.cache.commit_deletes, token, todo, versions))
            if not again:
                break
            await self.wait_for_older({p: todo[p] for p in again})
            todo = {p: todo[p] for p in again}
        report.deleted = len(plan.deletes)
        report.add_time("delete", t)

    async def repair(self, plan: BatchPlan, write: Mapping[str, object],
                     report: BatchReport) -> None:
        """Rewrite Redis entries that differ from Milvus, from Milvus's record.

        No claim: the conditional write never moves a pin backwards, and the
        record is read at Strong, Milvus's latest.
        """
        for ver in write:
            ids = list(plan.work[ver].repair)
            if not ids:
                continue
            recs = await self.ctx.retry("milvus", partial(
                self.ctx.milvus.get_many, ver, ids, consistency="Strong"))
            if recs:
                res = await self.ctx.retry("redis", partial(self.ctx.cache.write, ver,
                                                            list(recs.values())))
                report.repaired += len(res.written)
