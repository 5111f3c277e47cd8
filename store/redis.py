"""Redis/Valkey backend: the hot cache for batch reads, and the version pointers.

Key layout (``p`` is ``RedisSettings.key_prefix``, default ``pf``; ``v`` a
model version id). Any Redis client in any language can read it:

| key | type | content |
| --- | --- | --- |
| ``p:live`` | string | the live model version id |
| ``p:versions`` | set | every known model version id |
| ``p:version:v`` | hash | ``dim``, ``dtype`` (float16/float32), ``model``, ``created_at``, ``state`` |
| ``p:v:vec:PIN`` | string | the vector: ``dim`` little-endian values of ``dtype``, L2-normalised |
| ``p:v:meta:PIN`` | hash | ``pin_version``, ``content_hash``, ``event_time``, ``encode_time``, ``written_at``, ``image_location``, ``caption``, ``metadata`` (the event's metadata object as JSON) |
| ``p:v:ids`` | set | pin ids stored in version ``v`` |
| ``p:tomb:PIN`` | string | version of the pin's last delete (expires after ``tombstone_ttl_s``) |

A batch of 25 vectors is one ``MGET p:v:vec:a p:v:vec:b ...``. Writes of one
batch go in one MULTI/EXEC, so a reader never sees a vector without its meta.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from store.base import EmbeddingRecord, PinState
from store.config import RedisSettings
from store.errors import DimensionMismatch, StoreError, StoreUnavailable, UnknownVersion

T = TypeVar("T")
def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


_META = ("pin_version", "content_hash", "event_time", "encode_time", "written_at",
         "image_location", "caption")


class RedisCache:
    """`VectorBackend` over Redis, plus the live pointer and tombstones."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.p = settings.key_prefix
        pw = settings.password.get_secret_value() if settings.password else None
        # one quick retry hides a pooled connection that a restarted server closed;
        # a real outage still surfaces as StoreUnavailable
        self._r = aioredis.Redis.from_url(
            settings.url, password=pw, socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.timeout_s, decode_responses=False,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._info: dict[str, tuple[int, str]] = {}

    # ------------------------------------------------------------------ keys
    def vec_key(self, version: str, pin_id: str) -> str:
        """Key of a pin's vector."""
        return f"{self.p}:{version}:vec:{pin_id}"

    def meta_key(self, version: str, pin_id: str) -> str:
        """Key of a pin's metadata hash."""
        return f"{self.p}:{version}:meta:{pin_id}"

    def _ids_key(self, version: str) -> str:
        return f"{self.p}:{version}:ids"

    async def _do(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError) as exc:
            raise StoreUnavailable(f"Redis unavailable: {exc}", retry_after=1.0) from exc
        except RedisError as exc:
            raise StoreError(f"Redis error: {exc}") from exc

    # -------------------------------------------------------------- versions
    async def ensure_version(self, version: str, dim: int, model: str = "",
                             extra: dict[str, object] | None = None) -> None:
        """Register a version (idempotent); refuse a different dimension."""
        key = f"{self.p}:version:{version}"

        async def go() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                for k, v in (extra or {}).items():
                    pipe.hsetnx(key, k, str(v))
                pipe.hsetnx(key, "dim", dim)
                pipe.hsetnx(key, "dtype", self.settings.vector_dtype)
                pipe.hsetnx(key, "model", model)
                pipe.hsetnx(key, "created_at", repr(time.time()))
                pipe.hsetnx(key, "state", "building")
                pipe.sadd(f"{self.p}:versions", version)
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
            raw = await self._do(lambda: self._r.hgetall(f"{self.p}:version:{version}"))
            if not raw:
                raise UnknownVersion(f"model version {version} is not registered: see "
                                     "`pinfresh versions list`")
            self._info[version] = (int(raw[b"dim"]), _text(raw[b"dtype"]))
        return self._info[version]

    async def versions(self) -> dict[str, dict[str, str]]:
        """All registered versions with their info hashes."""
        names = await self._do(lambda: self._r.smembers(f"{self.p}:versions"))
        out: dict[str, dict[str, str]] = {}
        for n in sorted(_text(x) for x in names):
            key = f"{self.p}:version:{n}"
            raw = await self._do(partial(self._r.hgetall, key))
            out[n] = {_text(k): _text(v) for k, v in raw.items()}
        return out

    async def set_version_state(self, version: str, state: str) -> None:
        """Record a version's state (building, live, retired)."""
        await self._do(lambda: self._r.hset(f"{self.p}:version:{version}", "state", state))

    async def get_live(self) -> str | None:
        """The live version id, or None before the first version goes live."""
        raw = await self._do(lambda: self._r.get(f"{self.p}:live"))
        return _text(raw) if raw else None

    async def set_live(self, version: str) -> None:
        """Point readers at ``version`` (one atomic SET)."""
        await self._do(lambda: self._r.set(f"{self.p}:live", version))

    async def get_previous(self) -> str | None:
        """The version that was live before the last promote (kept for rollback)."""
        raw = await self._do(lambda: self._r.get(f"{self.p}:previous"))
        return _text(raw) if raw else None

    async def clear_previous(self) -> None:
        """Forget the rollback target."""
        await self._do(lambda: self._r.delete(f"{self.p}:previous"))

    async def promote(self, version: str, previous: str | None) -> None:
        """Flip the live pointer in one MULTI/EXEC, recording states and the previous version."""

        async def go() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.set(f"{self.p}:live", version)
                pipe.hset(f"{self.p}:version:{version}", "state", "live")
                if previous and previous != version:
                    pipe.set(f"{self.p}:previous", previous)
                    pipe.hset(f"{self.p}:version:{previous}", "state", "previous")
                await pipe.execute()

        await self._do(go)

    async def set_live_if_none(self, version: str) -> bool:
        """Make ``version`` live unless a live version exists. Returns whether it did."""
        return bool(await self._do(lambda: self._r.set(f"{self.p}:live", version, nx=True)))

    # ----------------------------------------------------------------- writes
    def _to_bytes(self, vector: np.ndarray, dtype: str) -> bytes:
        return np.asarray(vector, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()

    async def upsert(
        self, version: str, records: Sequence[EmbeddingRecord], written_at: float | None = None
    ) -> float:
        """Write vectors and metadata in one MULTI/EXEC; returns the write time."""
        if not records:
            return time.time()
        _, dtype = await self.version_info(version)
        ids_key = self._ids_key(version)

        async def go() -> float:
            now = written_at if written_at is not None else time.time()
            async with self._r.pipeline(transaction=True) as pipe:
                for r in records:
                    pipe.set(self.vec_key(version, r.pin_id), self._to_bytes(r.vector, dtype))
                    pipe.hset(self.meta_key(version, r.pin_id), mapping={
                        "pin_version": r.pin_version, "content_hash": r.content_hash,
                        "event_time": repr(r.event_time), "encode_time": repr(r.encode_time),
                        "written_at": repr(now), "image_location": r.image_location,
                        "caption": r.caption, "metadata": json.dumps(r.metadata),
                    })
                pipe.sadd(ids_key, *[r.pin_id for r in records])
                await pipe.execute()
            return now

        return await self._do(go)

    async def delete(self, version: str, pin_ids: Sequence[str]) -> None:
        """Remove pins from a version's namespace."""
        if not pin_ids:
            return

        async def go() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                for pid in pin_ids:
                    pipe.delete(self.vec_key(version, pid), self.meta_key(version, pid))
                pipe.srem(self._ids_key(version), *pin_ids)
                await pipe.execute()

        await self._do(go)

    async def drop_version(self, version: str) -> int:
        """Delete every key of a version's namespace; returns keys removed."""
        removed = 0
        async for key in self._r.scan_iter(match=f"{self.p}:{version}:*", count=1000):
            removed += await self._do(partial(self._r.delete, key))
        await self._do(lambda: self._r.delete(f"{self.p}:version:{version}"))
        await self._do(lambda: self._r.srem(f"{self.p}:versions", version))
        self._info.pop(version, None)
        return removed

    async def set_tombstones(self, versions: dict[str, int]) -> None:
        """Remember the version of each pin's delete, so older upserts stay dead."""
        if not versions:
            return

        async def go() -> None:
            async with self._r.pipeline(transaction=False) as pipe:
                for pid, ver in versions.items():
                    pipe.set(f"{self.p}:tomb:{pid}", ver, ex=self.settings.tombstone_ttl_s)
                await pipe.execute()

        await self._do(go)

    async def get_tombstones(self, pin_ids: Sequence[str]) -> dict[str, int]:
        """Delete versions of the pins that have a tombstone."""
        if not pin_ids:
            return {}
        raw = await self._do(lambda: self._r.mget([f"{self.p}:tomb:{p}" for p in pin_ids]))
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
        raw = await self._do(lambda: self._r.mget([self.vec_key(version, p) for p in pin_ids]))
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
        return [float(_text(x)) for x in fresh], int(_text(enc)) if enc else 0

    async def pin_ids(self, version: str) -> list[str]:
        """Every pin id stored in a version."""
        raw = await self._do(lambda: self._r.smembers(self._ids_key(version)))
        return sorted(_text(x) for x in raw)

    async def count(self, version: str) -> int:
        """Pins stored in a version."""
        return int(await self._do(lambda: self._r.scard(self._ids_key(version))))

    async def server_info(self, section: str) -> dict[str, Any]:
        """A section of the server's ``INFO`` (``memory``, ``persistence``, ...)."""
        return dict(await self._do(lambda: self._r.info(section)))

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless Redis answers PING."""
        await self._do(self._r.ping)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._r.aclose()
