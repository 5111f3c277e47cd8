"""The Redis/Valkey connection under `store.redis.RedisCache`: packing, scripts, errors.

One client for a single node or a Redis/Valkey Cluster (``redis+cluster://``
or ``rediss+cluster://`` names any node of one); commands are packed by
hiredis; every error is mapped at this boundary: an outage (`is_outage`) to
`StoreUnavailable`, anything else to `StateError`. Scripts (`store.redis.scripts`)
go as EVALSHA: on a single node a batch of pins in one call of the script's
batch form, on a cluster one call per pin, pipelined per node.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    DataError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from encoder.errors import StateError, StoreUnavailable, UnknownVersion
from store.config import RedisSettings
from store.redis.keys import CLUSTER_SCHEMES, Keys
from store.redis.scripts import BATCH_CALLS, Script, batch_call, sha1

T = TypeVar("T")

#: Error codes with which a Redis/Valkey server says "not now" rather than "never":
#: out of memory, a read-only replica, a master or the cluster down, a slot
#: migrating, the dataset loading, a script running long, writes stopped after a
#: failed save. A reply that carries one of them (also inside a script error or an
#: EXECABORT) is an outage.
OUTAGE_CODES = ("OOM", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "BUSY",
                "MISCONF", "NOREPLICAS")
_OUTAGE_RE = re.compile(r"(?:^|[\s:(\[])(" + "|".join(OUTAGE_CODES) + r")\b")
_OUTAGES = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ClusterDownError,
            TryAgainError, MasterDownError, ReadOnlyError, OutOfMemoryError,
            RedisClusterException, OSError)


def is_outage(exc: BaseException) -> bool:
    """Whether a redis-py error means the server is out for now (see `OUTAGE_CODES`)."""
    return isinstance(exc, _OUTAGES) or bool(_OUTAGE_RE.search(str(exc)))


class _HiredisPacking:
    """Packs commands with hiredis's C packer (what redis-py's sync client does).

    redis-py's asyncio connection packs in Python: about 18 us for a script
    call of 20 arguments against 3 us here, and a write costs a feeder three
    such calls per pin. Same bytes on the wire (`tests/unit/test_redis_layout.py`).
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            pass
        # hiredis takes bytes, str, int and float; redis-py also sends buffers
        args = tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


def _with_hiredis_packing(cls: type) -> type:
    if issubclass(cls, _HiredisPacking):
        return cls
    return type(f"Hiredis{cls.__name__}", (_HiredisPacking, cls), {})


def _pack_with_hiredis(client: Any) -> None:
    """Make ``client`` (no connection opened yet) pack commands with hiredis.

    The connection class the URL chose (TCP, TLS, Unix socket) is kept; only
    its packer is replaced.
    """
    if isinstance(client, RedisCluster):
        kw = client.connection_kwargs
        kw["connection_class"] = _with_hiredis_packing(kw["connection_class"])
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = kw["connection_class"]
    else:
        pool = client.connection_pool
        pool.connection_class = _with_hiredis_packing(pool.connection_class)


def as_text(x: bytes | str) -> str:
    """Redis replies arrive as bytes (``decode_responses=False``): their text."""
    return x.decode() if isinstance(x, bytes) else x


class Client(Keys):
    """The connection and the calls every part of the cache makes (see module docstring)."""

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__(settings.key_prefix)
        self.settings = settings
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
        _pack_with_hiredis(self._r)
        self._info: dict[str, tuple[int, str]] = {}

    async def _do(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a call; map its errors: an outage (`is_outage`) to `StoreUnavailable`.

        Any other error reply (a wrong type, a script bug) is a `StateError`:
        retrying will not fix it.
        """
        try:
            return await fn()
        except (RedisError, OSError) as exc:
            if is_outage(exc):
                raise StoreUnavailable(f"Redis unavailable: {exc}", retry_after=1.0) from exc
            raise StateError(f"Redis error: {exc}") from exc

    async def _eval_many(self, script: Script, calls: Sequence[tuple[Any, ...]], *,
                         atomic: bool = False) -> list[Any]:
        """Run the per-pin ``script`` once per call (``(numkeys, *keys, *args)``).

        On a single node the calls go `BATCH_CALLS` at a time through the
        script's batch form (`Script.batch_text`): one EVALSHA runs them in order and
        answers one reply per call, so a batch of pins costs the client a
        command per 256 pins instead of one per pin (redis-py spends about
        30 us of CPU on each command of a pipeline); ``atomic``: all in one
        MULTI/EXEC. Each call is still its own compare-and-set, as before. On
        a cluster a pin's keys share a slot but a batch's do not: one EVALSHA
        per call, pipelined per node. Errors are mapped as in `_do`.
        """
        if self.cluster:
            return await self._do(partial(self._evalsha_all, script.text, list(calls),
                                          transaction=False))
        chunks = [batch_call(calls[i:i + BATCH_CALLS])
                  for i in range(0, len(calls), BATCH_CALLS)]
        replies = await self._do(partial(self._evalsha_all, script.batch_text, chunks,
                                         transaction=atomic))
        return [x for chunk in replies for x in chunk]

    async def _evalsha_all(self, script: str, calls: list[tuple[Any, ...]], *,
                           transaction: bool) -> list[Any]:
        """EVALSHA ``script`` once per call in one pipeline; one reply per call.

        EVALSHA sends 40 bytes instead of the script's 2 kB. The calls the
        server answers NOSCRIPT (a restarted or failed-over server, a SCRIPT
        FLUSH) are run again, alone, after a SCRIPT LOAD (on every primary of
        a cluster). A call answered NOSCRIPT did not run, so none runs twice.
        Any other error reply raises, as `_do` maps it; NOSCRIPT again after
        two loads is `StoreUnavailable`.
        """
        sha = sha1(script)
        out: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(3):
            async with self._r.pipeline(transaction=transaction) as pipe:
                for i in todo:
                    # execute_command: a cluster pipeline blocks its evalsha() method only;
                    # EVALSHA is routed by its first key like EVAL
                    pipe.execute_command("EVALSHA", sha, *calls[i])
                replies = list(await pipe.execute(raise_on_error=False))
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    out[i] = reply
            if not missing:
                return out
            if attempt < 2:
                await self._r.script_load(script)
            todo = missing
        # a failover in progress can answer so twice: an outage, retried like one
        raise StoreUnavailable(f"Redis forgot script {sha} again after SCRIPT LOAD twice "
                               "(a failover?)", retry_after=1.0)

    async def version_info(self, version: str) -> tuple[int, str]:
        """``(dim, dtype)`` of a registered version (cached)."""
        if version not in self._info:
            raw = await self._do(lambda: self._r.hgetall(self.reg_key(f"version:{version}")))
            if not raw:
                raise UnknownVersion(f"model version {version} is not registered: see "
                                     "`pinfresh versions list`")
            self._info[version] = (int(raw[b"dim"]), as_text(raw[b"dtype"]))
        return self._info[version]

    async def _mget(self, keys: list[str]) -> list[Any]:
        """One MGET on a node; on a cluster one MGET per slot, one pipeline per node."""
        if self.cluster:
            return list(await self._do(lambda: self._r.mget_nonatomic(keys)))
        return list(await self._do(lambda: self._r.mget(keys)))

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

    async def eviction_policy(self) -> str | None:
        """``maxmemory-policy`` of the server (of a node), or None if CONFIG is not allowed."""
        try:
            got = await self._r.config_get("maxmemory-policy")
        except (RedisError, OSError):
            return None
        if isinstance(got, dict) and "maxmemory-policy" not in got and got:
            got = next(iter(got.values()))  # a cluster answers per node
        value = got.get("maxmemory-policy") if isinstance(got, dict) else None
        return as_text(value) if value is not None else None

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
