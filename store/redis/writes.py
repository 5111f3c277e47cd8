"""The write part of the Redis cache: conditional writes and the writers' claims.

Each write of a pin is one Lua script (`store.redis.scripts`), atomic on the
pin's slot: a batch of pins is one EVALSHA of the script's batch form on a
single node, one EVALSHA per pin pipelined per node on a cluster. The claim
protocol these serve is in `streams.processor` and docs/integration.md
("Concurrent writers").
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from store.base import EmbeddingRecord
from store.redis import scripts
from store.redis.client import Client
from store.redis.keys import pin_slot


@dataclass(frozen=True)
class WriteResult:
    """What one conditional `RedisCache.write` did.

    Attributes:
        written_at: the time recorded as the records' ``written_at``.
        written: pins whose entry this call wrote (the others were stale).
    """

    written_at: float
    written: frozenset[str]


class WriteOps(Client):
    """Conditional writes, claims, deletes (mixed into `store.redis.RedisCache`)."""

    def _to_bytes(self, vector: np.ndarray, dtype: str) -> bytes:
        return np.asarray(vector, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()

    def _meta_args(self, r: EmbeddingRecord, now: float) -> list[Any]:
        meta = {
            "pin_version": str(int(r.pin_version)), "content_hash": r.content_hash,
            "event_time": repr(r.event_time), "encode_time": repr(r.encode_time),
            "written_at": repr(now), "image_location": r.image_location,
            "caption": r.caption, "metadata": json.dumps(r.metadata),
        }
        return [x for kv in meta.items() for x in kv]

    async def write(self, version: str, records: Sequence[EmbeddingRecord], *,
                    mode: Literal["write", "refill"] = "write",
                    written_at: float | None = None) -> WriteResult:
        """Conditionally write vectors, metadata and ids, one script per pin.

        ``write`` writes a pin unless its tombstone is at or above the
        record's version or Redis holds a newer version (an equal version is
        written again: a re-encode or a replay carries that version's newest
        vector). ``refill`` (a reader filling the cache from Milvus) writes
        only a pin that is absent and not deleted at or after that version.
        """
        now = written_at if written_at is not None else time.time()
        if not records:
            return WriteResult(now, frozenset())
        _, dtype = await self.version_info(version)
        m = "w" if mode == "write" else "r"

        calls = [(4, self.vec_key(version, r.pin_id), self.meta_key(version, r.pin_id),
                  self.ids_key(version, pin_slot(r.pin_id)), self.tomb_key(r.pin_id), m,
                  str(int(r.pin_version)), self._to_bytes(r.vector, dtype), r.pin_id,
                  *self._meta_args(r, now)) for r in records]
        replies = await self._eval_many(scripts.WRITE, calls, atomic=True)
        return WriteResult(
            now, frozenset(r.pin_id for r, x in zip(records, replies, strict=True) if int(x)))

    async def upsert(
        self, version: str, records: Sequence[EmbeddingRecord], written_at: float | None = None
    ) -> float:
        """`write` without a claim (tools, repairs, tests); returns the write time."""
        return (await self.write(version, records, written_at=written_at)).written_at

    async def refill(self, version: str, records: Sequence[EmbeddingRecord]) -> set[str]:
        """Fill the cache from Milvus: only absent, undeleted pins (see `write`)."""
        return set((await self.write(version, records, mode="refill")).written)

    async def replace(self, version: str, records: Sequence[EmbeddingRecord],
                      expected: Mapping[str, str | None]) -> set[str]:
        """Overwrite pins whose stored ``pin_version`` is still ``expected[pin]`` (a repair).

        `store.verify` read a wrong entry and rewrites it from Milvus's record
        (read again just before, at Strong consistency): a compare-and-set on
        the version it saw in Redis, so a worker's write landing in between is
        kept. ``None`` expects the pin absent. Returns the pins written.
        """
        if not records:
            return set()
        _, dtype = await self.version_info(version)
        now = time.time()

        calls = [(4, self.vec_key(version, r.pin_id), self.meta_key(version, r.pin_id),
                  self.ids_key(version, pin_slot(r.pin_id)), self.tomb_key(r.pin_id),
                  expected.get(r.pin_id) or "", str(int(r.pin_version)),
                  self._to_bytes(r.vector, dtype), r.pin_id, *self._meta_args(r, now))
                 for r in records]
        replies = await self._eval_many(scripts.REPLACE, calls, atomic=True)
        return {r.pin_id for r, x in zip(records, replies, strict=True) if int(x)}

    async def drop_if(self, version: str, expected: Mapping[str, str]) -> set[str]:
        """Remove pins that still hold the ``pin_version`` a repair saw (a compare-and-set).

        For entries Milvus does not have: one a worker rewrote meanwhile is kept.
        """
        if not expected:
            return set()

        calls = [(3, self.vec_key(version, pid), self.meta_key(version, pid),
                  self.ids_key(version, pin_slot(pid)), ver, pid)
                 for pid, ver in expected.items()]
        replies = await self._eval_many(scripts.DROP_IF, calls, atomic=True)
        return {pid for pid, x in zip(expected, replies, strict=True) if int(x)}

    async def claim(self, op: Literal["upsert", "delete"], token: str,
                    pins: Mapping[str, int], versions: Sequence[str]
                    ) -> dict[str, dict[str, bool]]:
        """Register ``token`` as a writer of each pin at its version; say where it may write.

        Per pin and version: True unless the pin's tombstone is newer (for an
        upsert: not older) or Redis holds a newer version there. A delete's
        claim also raises the pin's tombstone to its version, so from then on
        no older upsert is written anywhere. Called again before every retry
        of the Milvus write, which refreshes the entry's time and drops
        versions that have become stale meanwhile.
        """
        if not pins:
            return {}
        o = "u" if op == "upsert" else "d"
        ttl = str(int(self.settings.writer_ttl_s * 1000))
        tomb_ttl = str(self.settings.tombstone_ttl_s)

        calls = [(2 + len(versions), self.tomb_key(pid), self.wip_key(pid),
                  *[self.meta_key(v, pid) for v in versions], o, token, str(int(ver)),
                  tomb_ttl, ttl) for pid, ver in pins.items()]
        replies = await self._eval_many(scripts.CLAIM, calls)
        return {pid: {v: bool(int(f)) for v, f in zip(versions, flags, strict=True)}
                for pid, flags in zip(pins, replies, strict=True)}

    async def renew(self, token: str, pins: Sequence[str]) -> set[str]:
        """Renew ``token``'s claims on ``pins`` (their time becomes now); the pins still held.

        A writer renews its claims while a Milvus write runs, so that a slow
        write (a load after an outage, a slow server) never outlives its claim:
        a claim that expired would let a newer writer finish first, and the
        older write would then land on top of it.
        """
        if not pins:
            return set()
        ttl = str(int(self.settings.writer_ttl_s * 1000))
        replies = await self._eval_many(scripts.RENEW, [(1, self.wip_key(p), token, ttl)
                                                 for p in pins])
        return {p for p, n in zip(pins, replies, strict=True) if int(n)}

    async def release(self, token: str, pins: Mapping[str, int]) -> set[str]:
        """End ``token``'s claims; return the pins with an older writer still in flight.

        Called once the writer's Milvus and Redis writes of every version are
        done. An older writer still in flight may yet land its Milvus write
        after this one: the caller waits for it (`in_flight`) and applies
        these pins again. Idempotent for the writer ttl: run again (redis-py
        or the caller retrying after a lost reply), it answers what the first
        run did.
        """
        if not pins:
            return set()
        ttl = str(int(self.settings.writer_ttl_s * 1000))

        calls = [(2, self.wip_key(pid), self.tomb_key(pid), token, str(int(ver)), ttl)
                 for pid, ver in pins.items()]
        replies = await self._eval_many(scripts.RELEASE, calls)
        return {pid for pid, n in zip(pins, replies, strict=True) if int(n)}

    async def commit_deletes(self, token: str, pins: Mapping[str, int],
                             versions: Sequence[str]) -> set[str]:
        """Remove deleted pins from every version where they are not newer.

        Ends the claims of ``token``; returns the pins that still have an
        older writer in flight (the caller deletes them again after it).
        Idempotent like `release`.
        """
        if not pins:
            return set()
        ttl = str(int(self.settings.writer_ttl_s * 1000))

        calls = []
        for pid, ver in pins.items():
            keys = [self.tomb_key(pid), self.wip_key(pid)]
            for v in versions:
                keys += [self.vec_key(v, pid), self.meta_key(v, pid),
                         self.ids_key(v, pin_slot(pid))]
            calls.append((len(keys), *keys, token, str(int(ver)), pid, ttl))
        replies = await self._eval_many(scripts.DELETE, calls, atomic=True)
        return {pid for pid, n in zip(pins, replies, strict=True) if int(n)}

    async def in_flight(self, pins: Mapping[str, int]) -> set[str]:
        """The pins that have a writer of an older version in flight (not yet expired)."""
        if not pins:
            return set()
        ttl = str(int(self.settings.writer_ttl_s * 1000))

        calls = [(1, self.wip_key(pid), str(int(ver)), ttl) for pid, ver in pins.items()]
        replies = await self._eval_many(scripts.IN_FLIGHT, calls)
        return {pid for pid, n in zip(pins, replies, strict=True) if int(n)}

    async def delete(self, version: str, pin_ids: Sequence[str]) -> None:
        """Remove pins from a version's namespace whatever they hold (tools, drops)."""
        if not pin_ids:
            return

        calls = [(5, self.tomb_key(pid), self.wip_key(pid), self.vec_key(version, pid),
                  self.meta_key(version, pid), self.ids_key(version, pin_slot(pid)),
                  "", "", pid, "0") for pid in pin_ids]
        await self._eval_many(scripts.DELETE, calls, atomic=True)

    async def set_tombstones(self, versions: dict[str, int]) -> None:
        """Remember the version of each pin's delete, so older upserts stay dead."""
        if not versions:
            return

        async def go() -> None:
            async with self._r.pipeline(transaction=False) as pipe:
                for pid, ver in versions.items():
                    pipe.set(self.tomb_key(pid), ver, ex=self.settings.tombstone_ttl_s)
                await pipe.execute()

        await self._do(go)
