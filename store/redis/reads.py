"""The read part of the Redis cache: vectors, metadata, states, the look-up, ids.

A batch of 25 vectors is one ``MGET`` on a single node (with the live pointer
when the reader's last live version is still live); on a cluster the keys are
grouped by slot and one pipeline goes to each node touched, all at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from redis.crc import REDIS_CLUSTER_HASH_SLOTS

from encoder.errors import UnknownVersion
from store.base import CacheLookup, EmbeddingRecord, PinState
from store.redis import scripts
from store.redis.client import as_text
from store.redis.registry import CACHE_COMPLETE, RegistryOps


async def _none() -> list[Any]:
    return []


class ReadOps(RegistryOps):
    """Reads (mixed into `store.redis.RedisCache`); they resolve the live pointer too."""

    async def get_vectors(
        self, version: str, pin_ids: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """One MGET: ``(vectors (n, dim) float32, found mask (n,) bool)``; misses are zeros."""
        dim, dtype = await self.version_info(version)
        if not pin_ids:
            return np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=bool)
        raw = await self._mget([self.vec_key(version, p) for p in pin_ids])
        return self._decode_vectors(dim, dtype, raw)

    @staticmethod
    def _decode_vectors(dim: int, dtype: str, raw: Sequence[Any]
                        ) -> tuple[np.ndarray, np.ndarray]:
        dt = np.dtype(dtype).newbyteorder("<")
        size = dim * dt.itemsize
        if all(isinstance(b, bytes) and len(b) == size for b in raw):  # all found: one copy
            joined = np.frombuffer(b"".join(raw), dtype=dt).reshape(len(raw), dim)
            return joined.astype(np.float32), np.ones(len(raw), dtype=bool)
        out = np.zeros((len(raw), dim), dtype=np.float32)
        found = np.zeros(len(raw), dtype=bool)
        for i, blob in enumerate(raw):
            if isinstance(blob, bytes) and len(blob) == dim * dt.itemsize:
                out[i] = np.frombuffer(blob, dtype=dt)
                found[i] = True
        return out, found

    async def get_live_vectors(
        self, pin_ids: Sequence[str], guess: str | None
    ) -> tuple[str | None, np.ndarray, np.ndarray]:
        """The live version and its vectors of ``pin_ids``, in one round trip when it can.

        On one node, a single MGET reads the live pointer together with the
        vectors of ``guess`` (the caller's last live version): MGET is atomic,
        so when the pointer names ``guess`` the vectors are that version's as it
        was live at that instant. Otherwise (another live version, a cluster,
        where the pointer and the pins live in different slots) the pointer is
        read first and the vectors of the version it names after. Returns
        ``(None, empty, empty)`` before any version is live.
        """
        live_key = self.reg_key("live")
        if guess is not None and not self.cluster and pin_ids:
            try:
                dim, dtype = await self.version_info(guess)
            except UnknownVersion:  # deleted since: no guess
                dim = 0
            if dim:
                raw = await self._mget([live_key, *(self.vec_key(guess, p) for p in pin_ids)])
                if raw[0] is not None and as_text(raw[0]) == guess:
                    return (guess, *self._decode_vectors(dim, dtype, raw[1:]))
        live = await self.get_live()
        if live is None:
            return None, np.zeros((0, 0), np.float32), np.zeros(0, bool)
        return (live, *await self.get_vectors(live, pin_ids))

    async def get_meta(self, version: str, pin_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """Metadata hashes of the pins found."""
        if not pin_ids:
            return {}

        async def go() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for p in pin_ids:
                    pipe.hgetall(self.meta_key(version, p))
                return list(await pipe.execute())

        rows = await self._do(go)
        return {
            p: {k.decode(): v.decode() for k, v in row.items()}
            for p, row in zip(pin_ids, rows, strict=True) if row
        }

    async def get_many(self, version: str, pin_ids: Sequence[str]) -> dict[str, EmbeddingRecord]:
        """Full records of the pins found in the cache."""
        vecs, found = await self.get_vectors(version, pin_ids)
        metas = await self.get_meta(version, [p for p, f in zip(pin_ids, found, strict=True) if f])
        out: dict[str, EmbeddingRecord] = {}
        for i, pid in enumerate(pin_ids):
            m = metas.get(pid)
            if not found[i] or m is None:
                continue
            out[pid] = EmbeddingRecord(
                pin_id=pid, vector=vecs[i], model_version=version,
                content_hash=m.get("content_hash", ""), pin_version=int(m.get("pin_version", -1)),
                event_time=float(m.get("event_time", 0)),
                encode_time=float(m.get("encode_time", 0)),
                image_location=m.get("image_location", ""), caption=m.get("caption", ""),
                metadata=json.loads(m.get("metadata") or "{}"),
            )
        return out

    async def get_states(self, version: str, pin_ids: Sequence[str]) -> dict[str, PinState]:
        """Pin version and content hash of the pins found."""
        if not pin_ids:
            return {}

        rows = await self._eval_many(scripts.STATES, [(1, self.meta_key(version, p))
                                               for p in pin_ids])
        return {
            p: PinState(p, int(r[0]), r[1].decode())
            for p, r in zip(pin_ids, rows, strict=True) if r[0] is not None
        }

    async def get_tombstones(self, pin_ids: Sequence[str]) -> dict[str, int]:
        """Delete versions of the pins that have a tombstone."""
        if not pin_ids:
            return {}
        raw = await self._mget([self.tomb_key(p) for p in pin_ids])
        return {p: int(v) for p, v in zip(pin_ids, raw, strict=True) if v is not None}

    async def lookup(self, versions: Sequence[str], pin_ids: Sequence[str]) -> CacheLookup:
        """Everything a batch's look-up needs from Redis, in one script call per pin.

        Per pin: its tombstone, whether a writer holds a claim on it, and its
        stored version and content hash in each of ``versions``; per version:
        whether it is registered and whether its cache is complete (see
        `mark_complete`). On one node the pins go as one EVALSHA of the batch
        form and the registry read beside it; on a cluster one call per pin,
        pipelined per node.
        """
        ids = list(pin_ids)
        calls = [(2 + len(versions), self.tomb_key(p), self.wip_key(p),
                  *(self.meta_key(v, p) for v in versions)) for p in ids]

        async def registry() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for v in versions:
                    pipe.hmget(self.reg_key(f"version:{v}"), "dim", "cache")
                return list(await pipe.execute())

        rows, flags = await asyncio.gather(
            self._eval_many(scripts.LOOKUP, calls) if ids else _none(), self._do(registry))
        tombs: dict[str, int] = {}
        claimed: set[str] = set()
        states: dict[str, dict[str, PinState]] = {v: {} for v in versions}
        for p, row in zip(ids, rows, strict=True):
            if row[0] is not None:
                tombs[p] = int(row[0])
            if int(row[1]):
                claimed.add(p)
            for j, v in enumerate(versions):
                pv = row[2 + 2 * j]
                if pv is not None:
                    states[v][p] = PinState(p, int(pv), as_text(row[3 + 2 * j] or b""))
        registered = frozenset(v for v, (dim, _) in zip(versions, flags, strict=True)
                               if dim is not None)
        complete = frozenset(v for v, (_, c) in zip(versions, flags, strict=True)
                             if c is not None and as_text(c) == CACHE_COMPLETE)
        return CacheLookup(tombs, states, frozenset(claimed), registered, complete & registered)

    async def pin_ids_in_slots(self, version: str, lo: int, hi: int) -> list[str]:
        """Pin ids of a version whose slot is in ``[lo, hi)`` (unsorted).

        A pin has the same slot in every version, so two versions compared
        slot range by slot range never need all ids in memory at once.
        """
        async def go() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for slot in range(lo, min(hi, REDIS_CLUSTER_HASH_SLOTS)):
                    pipe.smembers(self.ids_key(version, slot))
                return list(await pipe.execute())

        return [as_text(x) for members in await self._do(go) for x in members]

    async def iter_pin_ids(self, version: str, slots_per_call: int = 1024
                           ) -> AsyncIterator[list[str]]:
        """A version's pin ids, ``slots_per_call`` slots' sets at a time (unsorted)."""
        for lo in range(0, REDIS_CLUSTER_HASH_SLOTS, slots_per_call):
            part = await self.pin_ids_in_slots(version, lo, lo + slots_per_call)
            if part:
                yield part

    async def pin_ids(self, version: str) -> list[str]:
        """Every pin id stored in a version, sorted."""
        return sorted([p async for part in self.iter_pin_ids(version) for p in part])

    async def count(self, version: str) -> int:
        """Pins stored in a version (``SCARD`` of every slot's set, pipelined)."""
        return await self._pipelined(
            "scard", [(self.ids_key(version, s),) for s in range(REDIS_CLUSTER_HASH_SLOTS)],
            chunk=REDIS_CLUSTER_HASH_SLOTS)
