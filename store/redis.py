"""Redis/Valkey backend: the hot cache for batch reads, and the version pointers.

One key layout serves a single node and a Redis/Valkey Cluster alike
(``p`` is ``RedisSettings.key_prefix``, default ``pf``; ``v`` a model version
id). The part in braces is the hash tag: keys with the same tag live in the
same cluster slot.

| key | type | content |
| --- | --- | --- |
| ``{p}:live`` | string | the live model version id |
| ``{p}:previous`` | string | the version live before the last promote (rollback target) |
| ``{p}:retired`` | hash | version -> when it was retired (workers never register it again) |
| ``{p}:versions`` | set | every known model version id |
| ``{p}:version:v`` | hash | ``dim``, ``dtype`` (float16/float32), ``model``, ``checkpoint``, ``seed``, ``created_at``, ``state``, ``cache`` (``complete``: see `RedisCache.mark_complete`) |
| ``p:v:vec:{PIN}`` | string | the vector: ``dim`` little-endian values of ``dtype``, L2-normalised |
| ``p:v:meta:{PIN}`` | hash | ``pin_version``, ``content_hash``, ``event_time``, ``encode_time``, ``written_at``, ``image_location``, ``caption``, ``metadata`` (the event's metadata object as JSON) |
| ``p:v:ids:{T}`` | set | pin ids of version ``v`` whose slot is ``T``'s (one set per slot, see below) |
| ``p:tomb:{PIN}`` | string | version of the pin's last delete (expires after ``tombstone_ttl_s``) |
| ``p:stats:freshness``, ``p:stats:encoded`` | list, string | recent freshness samples, encode count |
| ``p:dlq:marks`` | hash | dead letter key -> ``resolved|purged|replayed:<time>`` |
| ``{p:reg}:progress`` | hash | partition -> JSON: worker, committed offset, lag, when it moved |

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
per pin (vector, meta and id set together). On a single node the calls go as
EVALSHA of the script's batch form, 256 pins per command (`_eval_many`), in
one MULTI/EXEC; on a cluster one EVALSHA per pin, pipelined per node, each
pin still atomic. A reader never sees a vector without its meta.

A URL ``redis+cluster://host:port`` (or ``rediss+cluster://``) names any node
of a cluster; ``redis://`` one node.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar

import hiredis
import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
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

from encoder.errors import DimensionMismatch, StateError, StoreUnavailable, UnknownVersion
from store.base import CacheLookup, EmbeddingRecord, PinState
from store.config import RedisSettings

T = TypeVar("T")

#: URL schemes that name a Redis/Valkey Cluster (any node of it).
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

# Every write of a pin is one of these scripts, atomic on the pin's slot; see
# "Concurrent writers" in the module docstring. Pin versions travel and are stored
# as decimal strings and compared as such (exact up to 2**62; Lua's numbers are
# doubles). A writer's entry in the pin's in-flight hash is "<pin version>:<ms>:<f>":
# the server time of its last claim, and f = 1 once another writer's release (or an
# expired claim) marked it as possibly overwritten in Milvus. A release replaces it with
# "R<n>:<ms>", its answer, kept for the writer ttl: a release run again because its reply
# was lost (a reset connection, a timeout after the server ran it) answers the same.
_LIB = """
local function cmp(a, b)
  if a == nil then return b == nil and 0 or -1 end
  if b == nil then return 1 end
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function get(key) local x = redis.call('GET', key); if x then return x end end
local function hget(key, f) local x = redis.call('HGET', key, f); if x then return x end end
local function parse(e)
  local pv, at, d = string.match(e, '^(%d+):(%d+):([01])$')
  if pv == nil then return nil end
  return pv, tonumber(at), d == '1'
end
local function flag_from(key, v, except)
  local e = redis.call('HGETALL', key)
  for i = 1, #e, 2 do
    if e[i] ~= except then
      local pv, at, d = parse(e[i + 1])
      if pv ~= nil and not d and cmp(pv, v) >= 0 then
        redis.call('HSET', key, e[i], pv .. ':' .. at .. ':1')
      end
    end
  end
end
local function released(e)
  local n, at = string.match(e, '^R(%d+):(%d+)$')
  if n == nil then return nil end
  return tonumber(n), tonumber(at)
end
local function older(key, v, ttl)
  local now, n = now_ms(), 0
  local e = redis.call('HGETALL', key)
  for i = 1, #e, 2 do
    local pv, at = parse(e[i + 1])
    if pv == nil then
      local _, rat = released(e[i + 1])
      if rat == nil or rat < now - ttl then redis.call('HDEL', key, e[i]) end
    elseif at < now - ttl then
      redis.call('HDEL', key, e[i])
      flag_from(key, pv, e[i])
    elseif cmp(pv, v) <= 0 then n = n + 1 end
  end
  return n
end
local function release(wip, tomb, token, v, ttl)
  local mine = redis.call('HGET', wip, token)
  if mine then
    local was = released(mine)
    if was ~= nil then return was end
  end
  local dirty = false
  if mine then
    local _, _, d = parse(mine)
    dirty = d
    redis.call('HDEL', wip, token)
    flag_from(wip, v, token)
  end
  local n = 0
  if cmp(get(tomb), v) <= 0 then n = older(wip, v, ttl) + (dirty and 1 or 0) end
  redis.call('HSET', wip, token, 'R' .. n .. ':' .. now_ms())
  redis.call('PEXPIRE', wip, ttl)
  return n
end
local function claims(key)
  local n = 0
  for _, e in ipairs(redis.call('HVALS', key)) do
    if parse(e) ~= nil then n = n + 1 end
  end
  return n
end
"""
# KEYS: tomb, wip, meta of each version. ARGV: op (u|d), token, pin version, tomb ttl s,
# wip ttl ms. Returns one flag per version: 1 = this writer may write it. A renewed claim
# keeps the entry's flag.
_CLAIM = _LIB + """
local v = ARGV[3]
local tomb = get(KEYS[1])
local out, any = {}, 0
for i = 3, #KEYS do
  local ok = cmp(hget(KEYS[i], 'pin_version'), v) <= 0 and
    (cmp(tomb, v) < 0 or (ARGV[1] == 'd' and cmp(tomb, v) == 0))
  out[#out + 1] = ok and 1 or 0
  if ok then any = 1 end
end
if ARGV[1] == 'd' and cmp(tomb, v) <= 0 then
  if cmp(tomb, v) < 0 then redis.call('SET', KEYS[1], v, 'EX', ARGV[4]) end
  any = 1
end
if any == 1 then
  local d = '0'
  local old = redis.call('HGET', KEYS[2], ARGV[2])
  if old then local _, _, od = parse(old); if od then d = '1' end end
  redis.call('HSET', KEYS[2], ARGV[2], v .. ':' .. now_ms() .. ':' .. d)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return out
"""
# KEYS: vec, meta, ids set of the pin's slot, tomb. ARGV: mode (w|r), pin version, vector
# bytes, pin id, meta field/values. Returns 1 if it wrote.
_WRITE = _LIB + """
local v = ARGV[2]
local s = hget(KEYS[2], 'pin_version')
if cmp(get(KEYS[4]), v) < 0 and ((ARGV[1] == 'r' and s == nil) or
                                 (ARGV[1] == 'w' and cmp(s, v) <= 0)) then
  redis.call('SET', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[2], unpack(ARGV, 5))
  redis.call('SADD', KEYS[3], ARGV[4])
  return 1
end
return 0
"""
# KEYS: vec, meta, ids set, tomb. ARGV: expected stored pin version ('' = absent), pin
# version, vector bytes, pin id, meta field/values. A repair's compare-and-set (it may
# move a pin back: the record is Milvus's, read just before).
_REPLACE = _LIB + """
local s = hget(KEYS[2], 'pin_version')
if ((ARGV[1] == '' and s == nil) or s == ARGV[1]) and cmp(get(KEYS[4]), ARGV[2]) < 0 then
  redis.call('SET', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[2], unpack(ARGV, 5))
  redis.call('SADD', KEYS[3], ARGV[4])
  return 1
end
return 0
"""
# KEYS: vec, meta, ids set. ARGV: expected stored pin version, pin id. A repair's delete
# of an entry Milvus does not have: only if it still holds the version that was seen.
_DROP_IF = _LIB + """
if hget(KEYS[2], 'pin_version') == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[2])
  return 1
end
return 0
"""
# KEYS: wip, tomb. ARGV: token, pin version, wip ttl ms. Ends a claim; returns > 0 when
# the writer must write the pin again: an older (or equal) writer is still in flight,
# or one released after this writer claimed and may have landed its Milvus write last.
_RELEASE = _LIB + """
return release(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]))
"""
# KEYS: tomb, wip, then vec, meta, ids set of each version. ARGV: token, pin version
# ('' removes whatever is stored), pin id, wip ttl ms. Removes the pin from every version
# where it is not newer; then releases like _RELEASE.
_DELETE = _LIB + """
local v = ARGV[2]
for i = 3, #KEYS, 3 do
  if v == '' or cmp(hget(KEYS[i + 1], 'pin_version'), v) <= 0 then
    redis.call('DEL', KEYS[i], KEYS[i + 1])
    redis.call('SREM', KEYS[i + 2], ARGV[3])
  end
end
if ARGV[1] == '' then return 0 end
return release(KEYS[2], KEYS[1], ARGV[1], v, tonumber(ARGV[4]))
"""
# KEYS: wip. ARGV: token, wip ttl ms. Renews a claim that is still held (its version and
# flag kept, its time now); returns 1 if it was held.
_RENEW = _LIB + """
local e = redis.call('HGET', KEYS[1], ARGV[1])
if e == false then return 0 end
local pv, _, d = parse(e)
if pv == nil then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], pv .. ':' .. now_ms() .. ':' .. (d and '1' or '0'))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: wip. ARGV: pin version, wip ttl ms. Other writers of this or an older version
# still in flight (expired claims are dropped, and flag the writers above them).
_IN_FLIGHT = _LIB + """
return older(KEYS[1], ARGV[1], tonumber(ARGV[2]))
"""


#: Calls of one script per EVALSHA on a single node (see `RedisCache._eval_many`).
BATCH_CALLS = 256
# Runs a per-pin script (its text after _LIB, as a function of its own KEYS and ARGV) once
# per pin of a batch. ARGV: n, then n pairs (keys, args) counted per call, then every
# call's args; KEYS: every call's keys. Returns one reply per call (nil as false).
_BATCH_DRIVER = """
local n = tonumber(ARGV[1])
local out = {}
local k, a = 0, 1 + 2 * n
for i = 1, n do
  local nk, na = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = KEYS[k + j] end
  for j = 1, na do args[j] = ARGV[a + j] end
  k, a = k + nk, a + na
  local r = one(keys, args)
  if r == nil then r = false end
  out[i] = r
end
return out
"""


@functools.cache
def _batched(script: str) -> str:
    """The batch form of a per-pin script (``_LIB`` + body): `_BATCH_DRIVER` around it."""
    assert script.startswith(_LIB), "a per-pin script starts with _LIB"
    return (_LIB + "local function one(KEYS, ARGV)\n" + script[len(_LIB):] + "\nend\n"
            + _BATCH_DRIVER)


def _batch_call(calls: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """``(numkeys, *keys, *args)`` of one `_batched` call running ``calls``."""
    keys: list[Any] = []
    head: list[Any] = [len(calls)]
    args: list[Any] = []
    for numkeys, *rest in calls:
        keys += rest[:numkeys]
        args += rest[numkeys:]
        head += [numkeys, len(rest) - numkeys]
    return (len(keys), *keys, *head, *args)


# KEYS: meta. The pin's stored version and content hash (nil when absent).
_STATES = _LIB + """
return redis.call('HMGET', KEYS[1], 'pin_version', 'content_hash')
"""
# KEYS: tomb, wip, then the meta of each version. What a batch's look-up needs of one pin:
# {tombstone, writers in flight (their claims in wip), then pin version and content hash
# of each version} (nil where absent).
_LOOKUP = _LIB + """
local out = {get(KEYS[1]) or false, claims(KEYS[2])}
for i = 3, #KEYS do
  local m = redis.call('HMGET', KEYS[i], 'pin_version', 'content_hash')
  out[#out + 1] = m[1]
  out[#out + 1] = m[2]
end
return out
"""
# KEYS: a version's registry hash. ARGV: the mark. Sets its ``cache`` field if the version
# is registered (a dropped version is not brought back as a hash of one field).
_MARK = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'cache', ARGV[1])
  return 1
end
return 0
"""
#: Value of a version's ``cache`` field when its cache holds every pin written to Milvus.
CACHE_COMPLETE = "complete"

_slot_tags: list[str] = []

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


async def _none() -> list[Any]:
    return []


@functools.cache
def _sha(script: str) -> str:
    """The SHA-1 a server names ``script`` by (EVALSHA)."""
    return hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis's name for it


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


_META = ("pin_version", "content_hash", "event_time", "encode_time", "written_at",
         "image_location", "caption")


@dataclass(frozen=True)
class WriteResult:
    """What one conditional `RedisCache.write` did.

    Attributes:
        written_at: the time recorded as the records' ``written_at``.
        written: pins whose entry this call wrote (the others were stale).
    """

    written_at: float
    written: frozenset[str]


class RedisCache:
    """`VectorBackend` over Redis, plus the live pointer, tombstones and writer claims."""

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
        _pack_with_hiredis(self._r)
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

    def wip_key(self, pin_id: str) -> str:
        """Key of the hash of a pin's writers in flight (token -> ``version:ms``)."""
        return f"{self.p}:wip:{{{pin_id}}}"

    def reg_key(self, name: str) -> str:
        """A registry key: ``{p}:live``, ``{p}:versions``, ``{p}:version:v``, ..."""
        return f"{self.reg}:{name}"

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

    async def _eval_many(self, script: str, calls: Sequence[tuple[Any, ...]], *,
                         atomic: bool = False) -> list[Any]:
        """Run the per-pin ``script`` once per call (``(numkeys, *keys, *args)``).

        On a single node the calls go `BATCH_CALLS` at a time through the
        script's batch form (`_batched`): one EVALSHA runs them in order and
        answers one reply per call, so a batch of pins costs the client a
        command per 256 pins instead of one per pin (redis-py spends about
        30 us of CPU on each command of a pipeline); ``atomic``: all in one
        MULTI/EXEC. Each call is still its own compare-and-set, as before. On
        a cluster a pin's keys share a slot but a batch's do not: one EVALSHA
        per call, pipelined per node. Errors are mapped as in `_do`.
        """
        if self.cluster:
            return await self._do(partial(self._evalsha_all, script, list(calls),
                                          transaction=False))
        chunks = [_batch_call(calls[i:i + BATCH_CALLS])
                  for i in range(0, len(calls), BATCH_CALLS)]
        replies = await self._do(partial(self._evalsha_all, _batched(script), chunks,
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
        sha = _sha(script)
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

    # -------------------------------------------------------------- versions
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

    async def forget_writers(self, names: Sequence[str]) -> None:
        """Remove the reports of writers that are gone."""
        if names:
            await self._do(lambda: self._r.hdel(self.reg_key("writers"), *names))

    async def forget_progress(self, worker: str) -> None:
        """Remove the progress records a worker wrote last (it stopped on purpose)."""
        mine = [str(part) for part, rec in (await self.progress()).items()
                if rec.get("worker") == worker]
        if mine:
            await self._do(lambda: self._r.hdel(self.reg_key("progress"), *mine))

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
        replies = await self._eval_many(_WRITE, calls, atomic=True)
        return WriteResult(
            now, frozenset(r.pin_id for r, x in zip(records, replies, strict=True) if int(x)))

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
        replies = await self._eval_many(_REPLACE, calls, atomic=True)
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
        replies = await self._eval_many(_DROP_IF, calls, atomic=True)
        return {pid for pid, x in zip(expected, replies, strict=True) if int(x)}

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
        replies = await self._eval_many(_RELEASE, calls)
        return {pid for pid, n in zip(pins, replies, strict=True) if int(n)}

    async def upsert(
        self, version: str, records: Sequence[EmbeddingRecord], written_at: float | None = None
    ) -> float:
        """`write` without a claim (tools, repairs, tests); returns the write time."""
        return (await self.write(version, records, written_at=written_at)).written_at

    async def refill(self, version: str, records: Sequence[EmbeddingRecord]) -> set[str]:
        """Fill the cache from Milvus: only absent, undeleted pins (see `write`)."""
        return set((await self.write(version, records, mode="refill")).written)

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
        replies = await self._eval_many(_CLAIM, calls)
        return {pid: {v: bool(int(f)) for v, f in zip(versions, flags, strict=True)}
                for pid, flags in zip(pins, replies, strict=True)}

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
        replies = await self._eval_many(_DELETE, calls, atomic=True)
        return {pid for pid, n in zip(pins, replies, strict=True) if int(n)}

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
        replies = await self._eval_many(_RENEW, [(1, self.wip_key(p), token, ttl)
                                                 for p in pins])
        return {p for p, n in zip(pins, replies, strict=True) if int(n)}

    async def in_flight(self, pins: Mapping[str, int]) -> set[str]:
        """The pins that have a writer of an older version in flight (not yet expired)."""
        if not pins:
            return set()
        ttl = str(int(self.settings.writer_ttl_s * 1000))

        calls = [(1, self.wip_key(pid), str(int(ver)), ttl) for pid, ver in pins.items()]
        replies = await self._eval_many(_IN_FLIGHT, calls)
        return {pid for pid, n in zip(pins, replies, strict=True) if int(n)}

    async def delete(self, version: str, pin_ids: Sequence[str]) -> None:
        """Remove pins from a version's namespace whatever they hold (tools, drops)."""
        if not pin_ids:
            return

        calls = [(5, self.tomb_key(pid), self.wip_key(pid), self.vec_key(version, pid),
                  self.meta_key(version, pid), self.ids_key(version, pin_slot(pid)),
                  "", "", pid, "0") for pid in pin_ids]
        await self._eval_many(_DELETE, calls, atomic=True)

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
                event_time=float(m.get("event_time", 0)), encode_time=float(m.get("encode_time", 0)),
                image_location=m.get("image_location", ""), caption=m.get("caption", ""),
                metadata=json.loads(m.get("metadata") or "{}"),
            )
        return out

    async def get_states(self, version: str, pin_ids: Sequence[str]) -> dict[str, PinState]:
        """Pin version and content hash of the pins found."""
        if not pin_ids:
            return {}

        rows = await self._eval_many(_STATES, [(1, self.meta_key(version, p))
                                               for p in pin_ids])
        return {
            p: PinState(p, int(r[0]), r[1].decode())
            for p, r in zip(pin_ids, rows, strict=True) if r[0] is not None
        }

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
            self._eval_many(_LOOKUP, calls) if ids else _none(), self._do(registry))
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

    async def mark_complete(self, version: str) -> None:
        """Record that ``version``'s cache holds every pin written to Milvus.

        Called when the version is known to be empty in both stores (a new
        version) or after ``store verify --repair`` copied Milvus into the
        cache. A worker then looks up the version's pins in Redis alone; losing
        Redis's data loses this mark too, and workers read Milvus again.
        """
        key = self.reg_key(f"version:{version}")
        done = await self._do(partial(self._evalsha_all, _MARK, [(1, key, CACHE_COMPLETE)],
                                      transaction=False))
        if not int(done[0]):
            raise UnknownVersion(f"model version {version} is not registered: see "
                                 "`pinfresh versions list`")

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

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless Redis answers PING."""
        await self._do(self._r.ping)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._r.aclose()
