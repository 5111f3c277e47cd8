"""The registry part of the Redis cache: versions, the live pointer, reports, marks.

Keys tagged ``{p}`` (one slot: `promote` flips the pointer and the states in one
MULTI/EXEC, on a cluster too), plus the workers' statistics and the dead
letters' marks. See `store.redis.keys` for the layout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from encoder.errors import DimensionMismatch, StateError, UnknownVersion
from store.redis import scripts
from store.redis.client import Client, as_text

#: Value of a version's ``cache`` field when its cache holds every pin written to Milvus.
CACHE_COMPLETE = "complete"


class RegistryOps(Client):
    """Registry, reports and statistics (mixed into `store.redis.RedisCache`)."""

    async def ensure_version(self, version: str, dim: int, model: str = "",
                             extra: dict[str, object] | None = None) -> None:
        """Register a version (idempotent); refuse a different dimension."""
        key = self.reg_key(f"version:{version}")
        if not self.cluster and not await self._do(
                lambda: self._r.exists(self.reg_key("versions"))) and await self._do(
                lambda: self._r.exists(f"{self.p}:versions")):
            raise StateError(
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

    async def versions(self) -> dict[str, dict[str, str]]:
        """All registered versions with their info hashes."""
        names = await self._do(lambda: self._r.smembers(self.reg_key("versions")))
        out: dict[str, dict[str, str]] = {}
        for n in sorted(as_text(x) for x in names):
            key = self.reg_key(f"version:{n}")
            raw = await self._do(partial(self._r.hgetall, key))
            out[n] = {as_text(k): as_text(v) for k, v in raw.items()}
        return out

    async def registered(self, versions: Sequence[str]) -> set[str]:
        """Which of ``versions`` are still registered (not dropped)."""
        if not versions:
            return set()

        async def go() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for v in versions:
                    pipe.sismember(self.reg_key("versions"), v)
                return list(await pipe.execute())

        return {v for v, ok in zip(versions, await self._do(go), strict=True) if int(ok)}

    async def set_version_state(self, version: str, state: str) -> None:
        """Record a version's state (building, live, retired)."""
        await self._do(lambda: self._r.hset(self.reg_key(f"version:{version}"), "state", state))

    async def mark_retired(self, version: str, at: float | None = None) -> None:
        """Remember that ``version`` was retired (``{p}:retired``: version -> time)."""
        when = repr(time.time() if at is None else at)
        await self._do(lambda: self._r.hset(self.reg_key("retired"), version, when))

    async def unmark_retired(self, version: str) -> bool:
        """Forget that ``version`` was retired (`versions create` brings it back)."""
        return bool(await self._do(lambda: self._r.hdel(self.reg_key("retired"), version)))

    async def retired(self) -> dict[str, float]:
        """Every version retired and not created again, with when it was retired."""
        raw = await self._do(lambda: self._r.hgetall(self.reg_key("retired")))
        return {as_text(k): float(as_text(v)) for k, v in raw.items()}

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

    async def mark_complete(self, version: str) -> None:
        """Record that ``version``'s cache holds every pin written to Milvus.

        Called when the version is known to be empty in both stores (a new
        version) or after ``store verify --repair`` copied Milvus into the
        cache. A worker then looks up the version's pins in Redis alone; losing
        Redis's data loses this mark too, and workers read Milvus again.
        """
        key = self.reg_key(f"version:{version}")
        done = await self._do(partial(self._evalsha_all, scripts.MARK.text,
                                      [(1, key, CACHE_COMPLETE)], transaction=False))
        if not int(done[0]):
            raise UnknownVersion(f"model version {version} is not registered: see "
                                 "`pinfresh versions list`")

    async def report_writer(self, name: str, write_set: Sequence[str],
                            batches: Sequence[Sequence[str]],
                            extra: Mapping[str, Any] | None = None) -> None:
        """Record what one writer writes now (``{p}:writers``, field ``name``).

        ``write_set``: the versions its next batch writes; ``batches``: the
        versions each of its batches in flight writes. `VersionRegistry.wait_writers`
        reads these to know when a retired version is no longer written, or a
        new one is written by every batch. ``extra``: what a worker adds for
        `pinfresh status` (the partitions it holds, its host and pid, since
        when it holds none while partitions with lag have no worker).
        """
        entry = json.dumps({**(extra or {}), "at": time.time(), "write_set": list(write_set),
                            "batches": [list(b) for b in batches]})
        await self._do(lambda: self._r.hset(self.reg_key("writers"), name, entry))

    async def writers(self) -> dict[str, dict[str, Any]]:
        """Every writer's last report (see `report_writer`)."""
        raw = await self._do(lambda: self._r.hgetall(self.reg_key("writers")))
        return {as_text(k): json.loads(as_text(v)) for k, v in raw.items()}

    async def forget_writers(self, names: Sequence[str]) -> None:
        """Remove the reports of writers that are gone."""
        if names:
            await self._do(lambda: self._r.hdel(self.reg_key("writers"), *names))

    async def report_progress(self, worker: str, offsets: Mapping[int, tuple[int, int]],
                              moved_at: Mapping[int, float], now: float | None = None) -> None:
        """Record, per partition ``worker`` holds, its committed offset, lag and ``moved_at``.

        ``moved_at`` (per partition): when the worker last saw the committed offset
        change or the lag at 0 (`streams.app` keeps it). One hash, ``{p}:progress``,
        field = partition; several workers reporting one partition (a rebalance) are
        last-writer-wins, which is fine for a view.
        """
        if not offsets:
            return
        now = time.time() if now is None else now
        mapping = {str(part): json.dumps({"worker": worker, "committed": committed, "lag": lag,
                                          "moved_at": moved_at[part], "at": now})
                   for part, (committed, lag) in offsets.items()}
        await self._do(lambda: self._r.hset(self.reg_key("progress"), mapping=mapping))

    async def progress(self) -> dict[int, dict[str, Any]]:
        """Every partition's last progress record (see `report_progress`)."""
        raw = await self._do(lambda: self._r.hgetall(self.reg_key("progress")))
        return {int(as_text(k)): json.loads(as_text(v)) for k, v in raw.items()}

    async def forget_progress(self, worker: str) -> None:
        """Remove the progress records a worker wrote last (it stopped on purpose)."""
        mine = [str(part) for part, rec in (await self.progress()).items()
                if rec.get("worker") == worker]
        if mine:
            await self._do(lambda: self._r.hdel(self.reg_key("progress"), *mine))

    async def report_encoder(self, name: str, snapshot: Mapping[str, Any]) -> None:
        """Record an encoder process's counters (``{p}:encoders``, field ``name``), with now."""
        entry = json.dumps({**snapshot, "at": time.time()})
        await self._do(lambda: self._r.hset(self.reg_key("encoders"), name, entry))

    async def encoders(self) -> dict[str, dict[str, Any]]:
        """Every encoder process's last report (see `report_encoder`)."""
        raw = await self._do(lambda: self._r.hgetall(self.reg_key("encoders")))
        return {as_text(k): json.loads(as_text(v)) for k, v in raw.items()}

    async def forget_encoder(self, name: str) -> None:
        """Remove an encoder process's report (it stopped on purpose)."""
        await self._do(lambda: self._r.hdel(self.reg_key("encoders"), name))

    async def record_batch_stats(self, freshness_s: Sequence[float], encoded: int,
                                 keep: int = 10_000) -> None:
        """Keep the last ``keep`` freshness samples and count encodes (for `pinfresh status`).

        Each sample is ``"<unix time written>:<freshness s>"``, so a reader can
        keep a time window (one replay of old events must not hold the p99 up
        for the rest of the day).
        """
        now = time.time()

        async def go() -> None:
            async with self._r.pipeline(transaction=False) as pipe:
                if freshness_s:
                    pipe.lpush(f"{self.p}:stats:freshness",
                               *[f"{now:.3f}:{f:.4f}" for f in freshness_s])
                    pipe.ltrim(f"{self.p}:stats:freshness", 0, keep - 1)
                if encoded:
                    pipe.incrby(f"{self.p}:stats:encoded", encoded)
                await pipe.execute()

        await self._do(go)

    async def batch_stats(self, window_s: float | None = None, now: float | None = None,
                          ) -> tuple[list[float], int]:
        """``(freshness samples, total encodes)`` written by the workers.

        With ``window_s``, only the samples written in the last ``window_s``
        seconds before ``now`` (default: the current time).
        """
        fresh = await self._do(lambda: self._r.lrange(f"{self.p}:stats:freshness", 0, -1))
        enc = await self.encoded_total()
        since = (now if now is not None else time.time()) - window_s if window_s else None
        out = []
        for raw in fresh:
            at, _, value = as_text(raw).rpartition(":")
            if since is not None and (not at or float(at) < since):
                continue  # outside the window (or written before samples had a time)
            out.append(float(value))
        return out, enc

    async def encoded_total(self) -> int:
        """Images encoded by every worker so far (``{p}:stats:encoded``)."""
        enc = await self._do(lambda: self._r.get(f"{self.p}:stats:encoded"))
        return int(as_text(enc)) if enc else 0

    async def dlq_marks(self) -> dict[str, tuple[str, float]]:
        """Dead letters marked ``resolved``, ``purged`` or ``replayed``: key -> (state, at)."""
        raw = await self._do(lambda: self._r.hgetall(f"{self.p}:dlq:marks"))
        out = {}
        for k, v in raw.items():
            state, _, at = as_text(v).partition(":")
            out[as_text(k)] = (state, float(at))
        return out

    async def dlq_mark(self, keys: Sequence[str], state: str, at: float) -> None:
        """Mark dead letters (by `streams.dlq.letter_key`) as ``state`` at time ``at``."""
        if keys:
            mapping = {k: f"{state}:{at:.3f}" for k in keys}
            await self._do(lambda: self._r.hset(f"{self.p}:dlq:marks", mapping=mapping))
