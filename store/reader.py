"""The read path used by ranking services, the API and the demo.

`EmbeddingReader.get_many` resolves the version once per call (the live one
unless given), reads Redis with one MGET and falls back to Milvus for the
misses. A result never mixes versions and always names its version. On one
Redis node the live pointer is read in the same MGET as the vectors (see
`RedisCache.get_live_vectors`): one round trip per read while live stays put.

Refills. The fallback read answers the request at Milvus's default (Bounded)
consistency: fast, possibly a few seconds behind. The cache is not filled
from that read. The pins found are queued, and a background task reads them
again at Strong consistency (every acknowledged write visible; batched, so
the wait for Milvus's time tick is paid once per batch, not per request) and
writes them with `RedisCache.refill`, which writes a pin only while it is
absent from Redis and not deleted at or after the record's version. A refill
can therefore never bring back a deleted pin or move a pin back to an older
version, whatever a worker does in between. The queue is bounded
(``refill_queue``); pins beyond it are dropped and counted, and the next
miss queues them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from encoder.errors import NoLiveVersion, PinNotFound
from store.base import SearchHit
from store.milvus import MilvusStore
from store.redis import RedisCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadResult:
    """Vectors for a list of pin ids, in request order.

    Attributes:
        version: the model version every vector came from.
        vectors: ``(n, dim)`` float32; rows of missing pins are zeros.
        found: ``(n,)`` bool mask.
        from_cache: how many rows came from Redis (the rest from Milvus).
    """

    version: str
    pin_ids: list[str]
    vectors: np.ndarray
    found: np.ndarray
    from_cache: int


class EmbeddingReader:
    """Redis-first, Milvus-fallback reader over one deployment (see module docstring)."""

    def __init__(self, milvus: MilvusStore, cache: RedisCache, *, refill: bool = True,
                 refill_queue: int = 10_000, refill_batch: int = 512) -> None:
        self.milvus = milvus
        self.cache = cache
        self.refill_enabled = refill
        self.refill_queue = refill_queue
        self.refill_batch = refill_batch
        #: pins refilled into Redis so far, and pins dropped because the queue was full
        self.refilled = 0
        self.refill_dropped = 0
        self._pending: dict[str, set[str]] = {}
        self._queued = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: the live version of the last read: the guess `RedisCache.get_live_vectors` checks
        self._live_seen: str | None = None

    def _schedule(self, version: str, pin_ids: Sequence[str]) -> None:
        if not self.refill_enabled or not pin_ids:
            return
        room = self.refill_queue - self._queued
        take = list(pin_ids)[:max(room, 0)]
        self.refill_dropped += len(pin_ids) - len(take)
        if take:
            pending = self._pending.setdefault(version, set())
            before = len(pending)
            pending.update(take)
            self._queued += len(pending) - before
            self._wake.set()
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._refiller())

    async def _refiller(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush_refills()

    async def flush_refills(self) -> int:
        """Refill every queued pin now (Strong read, conditional write); returns how many.

        Errors are logged, never raised: a refill is an optimisation.
        """
        done = 0
        while self._pending:
            version, pins = next(iter(self._pending.items()))
            ids = sorted(pins)[:self.refill_batch]
            pins.difference_update(ids)
            self._queued -= len(ids)
            if not pins:
                self._pending.pop(version, None)
            try:
                recs = await self.milvus.get_many(version, ids, consistency="Strong")
                if recs:
                    done += len(await self.cache.refill(version, list(recs.values())))
            except Exception as exc:  # noqa: BLE001 - an optimisation: log, keep the task alive
                logger.warning("cache refill of %d pins of %s failed: %r", len(ids), version,
                               exc)
        self.refilled += done
        return done

    async def close(self) -> None:
        """Stop the refill task, then finish the queued refills (at most 10 s)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush_refills(), 10.0)

    async def resolve_version(self, version: str | None = None) -> str:
        """Return ``version`` or the live one.

        Raises:
            UnknownVersion: no live version yet.
        """
        if version:
            return version
        live = await self.cache.get_live()
        if live is None:
            raise NoLiveVersion("no live model version yet: run a worker (`pinfresh worker`)")
        return live

    async def get_many(self, pin_ids: Sequence[str], version: str | None = None) -> ReadResult:
        """Vectors of ``pin_ids`` from one version (see module docstring)."""
        ids = list(pin_ids)
        if version:
            ver = version
            vectors, found = await self.cache.get_vectors(ver, ids)
        else:  # the live pointer and the vectors in one round trip while live stays put
            live, vectors, found = await self.cache.get_live_vectors(ids, self._live_seen)
            if live is None:
                raise NoLiveVersion("no live model version yet: run a worker "
                                    "(`pinfresh worker`)")
            ver = self._live_seen = live
        hits = int(found.sum())
        missing = [p for p, f in zip(ids, found, strict=True) if not f]
        if missing:
            recs = await self.milvus.get_many(ver, list(dict.fromkeys(missing)),
                                              consistency="Bounded")
            if recs:
                # every position of a pin asked for more than once gets its vector
                for i, pid in enumerate(ids):
                    rec = recs.get(pid)
                    if rec is not None and not found[i]:
                        vectors[i] = rec.vector
                        found[i] = True
                self._schedule(ver, list(recs))
        return ReadResult(ver, ids, vectors, found, hits)

    async def similar(
        self, *, pin_id: str | None = None, vector: np.ndarray | None = None, k: int = 10,
        version: str | None = None, exclude: Sequence[str] = (),
    ) -> tuple[str, list[SearchHit]]:
        """Nearest pins to a pin (itself excluded) or to a vector, from one version.

        ``exclude``: pins left out of the hits as well (up to ``k`` others still come back).

        Raises:
            PinNotFound: the pin is unknown.
        """
        ver = await self.resolve_version(version)
        skip = list(exclude)
        if pin_id is not None:
            res = await self.get_many([pin_id], ver)
            if not res.found[0]:
                raise PinNotFound(pin_id, ver)
            vector = res.vectors[0]
            skip.append(pin_id)
        if vector is None:
            raise ValueError("give pin_id or vector")
        return ver, await self.milvus.search(ver, vector, k, exclude=skip)
