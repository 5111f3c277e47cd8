"""Redis/Valkey backend: the hot cache for batch reads, and the version pointers.

One key layout serves a single node and a Redis/Valkey Cluster alike
(``p`` is ``RedisSettings.key_prefix``, default ``pf``; ``v`` a model version
id). The part in braces is the hash tag: keys with the same tag live in the
same cluster slot.

| key | type | content |
| --- | --- | --- |
| ``{p}:live`` | string | the live model version id |
| ``{p}:previous`` | string | the version live before the last promote (rollback target) |
| ``{p}:versions`` | set | every known model version id |
| ``{p}:version:v`` | hash | ``dim``, ``dtype`` (float16/float32), ``model``, ``created_at``, ``state`` |
| ``p:v:vec:{PIN}`` | string | the vector: ``dim`` little-endian values of ``dtype``, L2-normalised |
| ``p:v:meta:{PIN}`` | hash | ``pin_version``, ``content_hash``, ``event_time``, ``encode_time``, ``written_at``, ``image_location``, ``caption``, ``metadata`` (the event's metadata object as JSON) |
| ``p:v:ids:{T}`` | set | pin ids of version ``v`` whose slot is ``T``'s (one set per slot, see below) |
| ``p:tomb:{PIN}`` | string | version of the pin's last delete (expires after ``tombstone_ttl_s``) |
| ``p:stats:freshness``, ``p:stats:encoded`` | list, string | recent freshness samples, encode count |

What shares a slot, and why:

* Every key of one pin (its vector and meta in every version, its tombstone)
  hashes on the pin id, so a pin's write is one atomic script on one node.
* The registry keys share the tag ``{p}``: `promote` flips ``{p}:live`` and
  the states in one MULTI/EXEC, on a cluster too.
* The ids of a version are split into one set per cluster slot (16,384 at
  most), named by a tag ``T`` that hashes to that slot (``T`` is the smallest
  decimal integer whose CRC16 lands there, see `slot_tag`). A pin's id joins
  the set of its own slot in the same script that writes its vector, so the
  sets and the vectors never disagree, and no set grows past
  ``pins / 16,384`` members (6,100 at 100M pins). `count` sums ``SCARD`` over
  the sets, `iter_pin_ids` walks them slot by slot.

Reads: a batch of 25 vectors is one ``MGET`` on a single node; on a cluster
the keys are grouped by slot and one pipeline goes to each node touched, all
nodes at once (one round trip per node). Writes of a batch: one script call
per pin (vector, meta and id set together), all in one MULTI/EXEC on a single
node; on a cluster one pipeline per node, each pin still atomic. A reader
never sees a vector without its meta.

A URL ``redis+cluster://host:port`` (or ``rediss+cluster://``) names any node
of a cluster; ``redis://`` one node.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from store.base import EmbeddingRecord, PinState
from store.config import RedisSettings
from store.errors import DimensionMismatch, StoreError, StoreUnavailable, UnknownVersion

T = TypeVar("T")

#: URL schemes that name a Redis/Valkey Cluster (any node of it).
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

# KEYS: vec, meta, ids set of the pin's slot. ARGV: vector bytes, pin id, meta field/values.
_UPSERT = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""
# KEYS: vec, meta, ids set. ARGV: pin id.
_DELETE = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

_slot_tags: list[str] = []


def slot_tag(slot: int) -> str:
    """The smallest decimal integer, as text, whose CRC16 hash lands in ``slot``.

    ``p:v:ids:{slot_tag(s)}`` is the ids set of slot ``s``; any client can
    rebuild the table (110k CRC16 computations, 0.2 s in Python).
    """
    if not _slot_tags:
        tags: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        left, i = REDIS_CLUSTER_HASH_SLOTS, 0
        while left:
            s = key_slot(str(i).encode())
            if tags[s] is None:
                tags[s] = str(i)
                left -= 1
            i += 1
        _slot_tags.extend(t for t in tags if t is not None)
    return _slot_tags[slot]


def pin_slot(pin_id: str) -> int:
    """Cluster slot of every key of ``pin_id``."""
    return int(key_slot(pin_id.encode()))


def as_text(x: bytes | str) -> str:
    """Redis replies arrive as bytes (``decode_responses=False``): their text."""
    return x.decode() if isinstance(x, bytes) else x


_META = ("pin_version", "content_hash", "event_time", "encode_time", "written_at",
         "image_location", "caption")


class RedisCache:
    """`VectorBackend` over Redis, plus the live pointer and tombstones."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.p = settings.key_prefix
        #: ``{p}``: the hash tag every registry key shares.
        self.reg = "{" + settings.key_prefix + "}"
        pw = settings.password.get_secret_value() if settings.password else None
        # one quick retry hides a pooled connection that a restarted server closed;
        # a real outage still surfaces as StoreUnavailable
        common: dict[str, Any] = dict(
            password=pw, socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.timeout_s, decode_responses=False,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )
        self.cluster = settings.url.startswith(CLUSTER_SCHEMES)
        self._r: Any
        if self.cluster:
            # a master that is down makes its slots fail, not the whole client
            self._r = RedisCluster.from_url(settings.url.replace("+cluster", "", 1),
                                            require_full_coverage=False, **common)
        else:
            self._r = aioredis.Redis.from_url(
                settings.url, retry_on_error=[RedisConnectionError, RedisTimeoutError],
                **common)
        self._info: dict[str, tuple[int, str]] = {}

    # ------------------------------------------------------------------ keys
    def vec_key(self, version: str, pin_id: str) -> str:
        """Key of a pin's vector."""
        return f"{self.p}:{version}:vec:{{{pin_id}}}"

    def meta_key(self, version: str, pin_id: str) -> str:
        """Key of a pin's metadata hash."""
        return f"{self.p}:{version}:meta:{{{pin_id}}}"

    def ids_key(self, version: str, slot: int) -> str:
        """Key of the set of a version's pin ids that hash to ``slot``."""
        return f"{self.p}:{version}:ids:{{{slot_tag(slot)}}}"

    def tomb_key(self, pin_id: str) -> str:
        """Key of a pin's tombstone."""
        return f"{self.p}:tomb:{{{pin_id}}}"

    def reg_key(self, name: str) -> str:
        """A registry key: ``{p}:live``, ``{p}:versions``, ``{p}:version:v``, ..."""
        return f"{self.reg}:{name}"

    async def _do(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ClusterDownError,
                TryAgainError, RedisClusterException, OSError) as exc:
            raise StoreUnavailable(f"Redis unavailable: {exc}", retry_after=1.0) from exc
        except RedisError as exc:
            raise StoreError(f"Redis error: {exc}") from exc

    # -------------------------------------------------------------- versions
    async def ensure_version(self, version: str, dim: int, model: str = "",
                             extra: dict[str, object] | None = None) -> None:
        """Register a version (idempotent); refuse a different dimension."""
        key = self.reg_key(f"version:{version}")
        if not self.cluster and not await self._do(
                lambda: self._r.exists(self.reg_key("versions"))) and await self._do(
                lambda: self._r.exists(f"{self.p}:versions")):
            raise StoreError(
                f"Redis holds pinfresh 0.1's key layout ({self.p}:versions, {self.p}:live, "
                "...): run `pinfresh store migrate-keys` once, then start again")

        async def go() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                for k, v in (extra or {}).items():
                    pipe.hsetnx(key, k, str(v))
                pipe.hsetnx(key, "dim", dim)
                pipe.hsetnx(key, "dtype", self.settings.vector_dtype)
                pipe.hsetnx(key, "model", model)
                pipe.hsetnx(key, "created_at", repr(time.time()))
                pipe.hsetnx(key, "state", "building")
                pipe.sadd(self.reg_key("versions"), version)
                await pipe.execute()

        await self._do(go)
        have_dim, _ = await self.version_info(version)
        if have_dim != dim:
            raise DimensionMismatch(
                f"Redis namespace {self.p}:{version} has dim {have_dim} != encoder dim {dim}: "
                "pick the matching model or retire the version"
            )

    async def version_info(self, version: str) -> tuple[int, str]:
        """``(dim, dtype)`` of a registered version (cached)."""
        if version not in self._info:
            raw = await self._do(lambda: self._r.hgetall(self.reg_key(f"version:{version}")))
            if not raw:
                raise UnknownVersion(f"model version {version} is not registered: see "
                                     "`pinfresh versions list`")
            self._info[version] = (int(raw[b"dim"]), as_text(raw[b"dtype"]))
        return self._info[version]

    async def versions(self) -> dict[str, dict[str, str]]:
        """All registered versions with their info hashes."""
        names = await self._do(lambda: self._r.smembers(self.reg_key("versions")))
        out: dict[str, dict[str, str]] = {}
        for n in sorted(as_text(x) for x in names):
            key = self.reg_key(f"version:{n}")
            raw = await self._do(partial(self._r.hgetall, key))
            out[n] = {as_text(k): as_text(v) for k, v in raw.items()}
        return out

    async def set_version_state(self, version: str, state: str) -> None:
        """Record a version's state (building, live, retired)."""
        await self._do(lambda: self._r.hset(self.reg_key(f"version:{version}"), "state", state))

    async def get_live(self) -> str | None:
        """The live version id, or None before the first version goes live."""
        raw = await self._do(lambda: self._r.get(self.reg_key("live")))
        return as_text(raw) if raw else None

    async def set_live(self, version: str) -> None:
        """Point readers at ``version`` (one atomic SET)."""
        await self._do(lambda: self._r.set(self.reg_key("live"), version))

    async def get_previous(self) -> str | None:
        """The version that was live before the last promote (kept for rollback)."""
        raw = await self._do(lambda: self._r.get(self.reg_key("previous")))
        return as_text(raw) if raw else None

    async def clear_previous(self) -> None:
        """Forget the rollback target."""
        await self._do(lambda: self._r.delete(self.reg_key("previous")))

    async def promote(self, version: str, previous: str | None) -> None:
        """Flip the live pointer in one MULTI/EXEC, recording states and the previous version."""

        async def go() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.set(self.reg_key("live"), version)
                pipe.hset(self.reg_key(f"version:{version}"), "state", "live")
                if previous and previous != version:
                    pipe.set(self.reg_key("previous"), previous)
                    pipe.hset(self.reg_key(f"version:{previous}"), "state", "previous")
                await pipe.execute()

        await self._do(go)

    async def set_live_if_none(self, version: str) -> bool:
        """Make ``version`` live unless a live version exists. Returns whether it did."""
        return bool(await self._do(lambda: self._r.set(self.reg_key("live"), version, nx=True)))

    # ----------------------------------------------------------------- writes
    def _to_bytes(self, vector: np.ndarray, dtype: str) -> bytes:
        return np.asarray(vector, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()

    async def upsert(
        self, version: str, records: Sequence[EmbeddingRecord], written_at: float | None = None
    ) -> float:
        """Write vectors, metadata and ids; returns the write time.

        One script per pin writes its vector, meta and id together. On a single
        node the whole batch is one MULTI/EXEC; on a cluster one pipeline per
        node (each pin still atomic).
        """
        if not records:
            return time.time()
        _, dtype = await self.version_info(version)

        async def go() -> float:
            now = written_at if written_at is not None else time.time()
            async with self._r.pipeline(transaction=not self.cluster) as pipe:
                for r in records:
                    meta = {
                        "pin_version": r.pin_version, "content_hash": r.content_hash,
                        "event_time": repr(r.event_time), "encode_time": repr(r.encode_time),
                        "written_at": repr(now), "image_location": r.image_location,
                        "caption": r.caption, "metadata": json.dumps(r.metadata),
                    }
                    pipe.eval(_UPSERT, 3, self.vec_key(version, r.pin_id),
                              self.meta_key(version, r.pin_id),
                              self.ids_key(version, pin_slot(r.pin_id)),
                              self._to_bytes(r.vector, dtype), r.pin_id,
                              *[x for kv in meta.items() for x in kv])
                await pipe.execute()
            return now

        return await self._do(go)

    async def delete(self, version: str, pin_ids: Sequence[str]) -> None:
        """Remove pins from a version's namespace (vector, meta and id together)."""
        if not pin_ids:
            return

        async def go() -> None:
            async with self._r.pipeline(transaction=not self.cluster) as pipe:
                for pid in pin_ids:
                    pipe.eval(_DELETE, 3, self.vec_key(version, pid), self.meta_key(version, pid),
                              self.ids_key(version, pin_slot(pid)), pid)
                await pipe.execute()

        await self._do(go)

    async def drop_version(self, version: str) -> int:
        """Delete every key of a version's namespace; returns keys removed."""
        removed = 0
        async for part in self.iter_pin_ids(version):
            keys = [k for pid in part
                    for k in (self.vec_key(version, pid), self.meta_key(version, pid))]
            removed += await self._pipelined("delete", [(k,) for k in keys])
        removed += await self._pipelined(
            "delete", [(self.ids_key(version, s),) for s in range(REDIS_CLUSTER_HASH_SLOTS)])
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self.reg_key(f"version:{version}"))
            pipe.srem(self.reg_key("versions"), version)
            await self._do(pipe.execute)
        self._info.pop(version, None)
        return removed

    async def _pipelined(self, command: str, calls: Sequence[tuple[Any, ...]],
                         chunk: int = 4096) -> int:
        """Run one command per argument tuple in non-transactional pipelines; sum the replies."""
        total = 0
        for i in range(0, len(calls), chunk):
            async def go(part: Sequence[tuple[Any, ...]] = calls[i:i + chunk]) -> list[Any]:
                async with self._r.pipeline(transaction=False) as pipe:
                    for args in part:
                        getattr(pipe, command)(*args)
                    return list(await pipe.execute())

            total += sum(int(x) for x in await self._do(go))
        return total

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

    async def get_tombstones(self, pin_ids: Sequence[str]) -> dict[str, int]:
        """Delete versions of the pins that have a tombstone."""
        if not pin_ids:
            return {}
        raw = await self._mget([self.tomb_key(p) for p in pin_ids])
        return {p: int(v) for p, v in zip(pin_ids, raw, strict=True) if v is not None}

    # ------------------------------------------------------------------ reads
    async def get_vectors(
        self, version: str, pin_ids: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """One MGET: ``(vectors (n, dim) float32, found mask (n,) bool)``; misses are zeros."""
        dim, dtype = await self.version_info(version)
        out = np.zeros((len(pin_ids), dim), dtype=np.float32)
        found = np.zeros(len(pin_ids), dtype=bool)
        if not pin_ids:
            return out, found
        raw = await self._mget([self.vec_key(version, p) for p in pin_ids])
        dt = np.dtype(dtype).newbyteorder("<")
        for i, blob in enumerate(raw):
            if isinstance(blob, bytes) and len(blob) == dim * dt.itemsize:
                out[i] = np.frombuffer(blob, dtype=dt)
                found[i] = True
        return out, found

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
                event_time=float(m.get("event_time", 0)), encode_time=float(m.get("encode_time", 0)),
                image_location=m.get("image_location", ""), caption=m.get("caption", ""),
                metadata=json.loads(m.get("metadata") or "{}"),
            )
        return out

    async def get_states(self, version: str, pin_ids: Sequence[str]) -> dict[str, PinState]:
        """Pin version and content hash of the pins found."""
        if not pin_ids:
            return {}

        async def go() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for p in pin_ids:
                    pipe.hmget(self.meta_key(version, p), "pin_version", "content_hash")
                return list(await pipe.execute())

        rows = await self._do(go)
        return {
            p: PinState(p, int(r[0]), r[1].decode())
            for p, r in zip(pin_ids, rows, strict=True) if r[0] is not None
        }

    async def record_batch_stats(self, freshness_s: Sequence[float], encoded: int,
                                 keep: int = 10_000) -> None:
        """Keep the last ``keep`` freshness samples and count encodes (for `pinfresh status`)."""

        async def go() -> None:
            async with self._r.pipeline(transaction=False) as pipe:
                if freshness_s:
                    pipe.lpush(f"{self.p}:stats:freshness", *[f"{f:.4f}" for f in freshness_s])
                    pipe.ltrim(f"{self.p}:stats:freshness", 0, keep - 1)
                if encoded:
                    pipe.incrby(f"{self.p}:stats:encoded", encoded)
                await pipe.execute()

        await self._do(go)

    async def batch_stats(self) -> tuple[list[float], int]:
        """``(recent freshness samples, total encodes)`` written by the workers."""
        fresh = await self._do(lambda: self._r.lrange(f"{self.p}:stats:freshness", 0, -1))
        enc = await self._do(lambda: self._r.get(f"{self.p}:stats:encoded"))
        return [float(as_text(x)) for x in fresh], int(as_text(enc)) if enc else 0

    async def _mget(self, keys: list[str]) -> list[Any]:
        """One MGET on a node; on a cluster one MGET per slot, one pipeline per node."""
        if self.cluster:
            return list(await self._do(lambda: self._r.mget_nonatomic(keys)))
        return list(await self._do(lambda: self._r.mget(keys)))

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

    async def used_memory(self) -> int:
        """``used_memory`` of ``INFO memory``, summed over the nodes of a cluster."""
        if self.cluster:
            per_node = await self._do(lambda: self._r.info(
                "memory", target_nodes=RedisCluster.PRIMARIES))
            if "used_memory" in per_node:
                return int(per_node["used_memory"])
            return sum(int(v["used_memory"]) for v in per_node.values())
        return int((await self._do(lambda: self._r.info("memory")))["used_memory"])

    @property
    def client(self) -> Any:
        """The redis-py client (``Redis`` or ``RedisCluster``), for maintenance tools."""
        return self._r

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless Redis answers PING."""
        await self._do(self._r.ping)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._r.aclose()
