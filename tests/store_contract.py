"""The cache's write contract, checked against the unit fake and the real Valkey.

`tests/unit/test_fakes.py` runs `check_cache_contract` on `FakeCache`;
`tests/integration/test_store.py` runs it on a `RedisCache` over the embedded
Valkey (one node and a cluster). A fake that drifts from the engine fails one
of the two.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from encoder.errors import UnknownVersion
from store.base import EmbeddingRecord


def rec(pin: str, version: int, dim: int = 4, seed: int = 0, model: str = "m1"
        ) -> EmbeddingRecord:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return EmbeddingRecord(pin, v / np.linalg.norm(v), model, f"hash{seed}", version, 1.0, 2.0,
                           f"/img/{pin}.png", f"caption {pin}", {"k": "v"})


async def _version_of(cache: Any, ver: str, pin: str) -> int | None:
    st = await cache.get_states(ver, [pin])
    return st[pin].pin_version if pin in st else None


async def check_cache_contract(cache: Any, ver: str = "m1") -> None:
    """Every rule the processor relies on. ``cache`` has ``ver`` registered with dim 4,
    no pins written yet, and a ``writer_ttl`` short enough (under 1 s) to wait out."""
    # conditional writes: never below the stored version; equal versions rewrite
    assert (await cache.write(ver, [rec("a", 5, seed=1)])).written == {"a"}
    assert (await cache.write(ver, [rec("a", 4, seed=2)])).written == frozenset()
    assert await _version_of(cache, ver, "a") == 5
    assert (await cache.write(ver, [rec("a", 5, seed=3)])).written == {"a"}
    got = await cache.get_many(ver, ["a"])
    assert got["a"].content_hash == "hash3"

    # refill: only into an absent, undeleted pin
    assert await cache.refill(ver, [rec("a", 9)]) == set()  # present
    assert await cache.refill(ver, [rec("r", 2)]) == {"r"}

    # a delete's claim raises the tombstone; older upserts and refills stay out
    flags = await cache.claim("delete", "del-1", {"a": 7}, [ver])
    assert flags == {"a": {ver: True}}
    assert await cache.get_tombstones(["a"]) == {"a": 7}
    assert await cache.commit_deletes("del-1", {"a": 7}, [ver]) == set()
    assert await _version_of(cache, ver, "a") is None
    assert (await cache.write(ver, [rec("a", 7)])).written == frozenset()
    assert await cache.refill(ver, [rec("a", 6)]) == set()
    assert (await cache.claim("upsert", "up-1", {"a": 7}, [ver])) == {"a": {ver: False}}
    assert (await cache.claim("upsert", "up-2", {"a": 8}, [ver])) == {"a": {ver: True}}
    assert (await cache.write(ver, [rec("a", 8)])).written == {"a"}
    assert await cache.release("up-2", {"a": 8}) == set()
    await cache.release("up-1", {"a": 7})
    # a redelivered delete (tombstone == its version) may apply again; an older one not
    assert (await cache.claim("delete", "del-2", {"r": 3}, [ver])) == {"r": {ver: True}}
    assert await cache.commit_deletes("del-2", {"r": 3}, [ver]) == set()
    assert (await cache.claim("delete", "del-3", {"r": 3}, [ver])) == {"r": {ver: True}}
    assert (await cache.claim("delete", "del-4", {"r": 2}, [ver])) == {"r": {ver: False}}
    await cache.release("del-3", {"r": 3})
    await cache.release("del-4", {"r": 2})
    # a delete older than the stored upsert leaves it
    assert (await cache.claim("delete", "del-5", {"a": 6}, [ver])) == {"a": {ver: False}}
    assert await cache.commit_deletes("del-5", {"a": 6}, [ver]) == set()
    assert await _version_of(cache, ver, "a") == 8

    # two writers of one pin: the newer one learns that the older is still in flight
    assert (await cache.claim("upsert", "w5", {"p": 5}, [ver])) == {"p": {ver: True}}
    assert (await cache.claim("upsert", "w6", {"p": 6}, [ver])) == {"p": {ver: True}}
    assert (await cache.write(ver, [rec("p", 6)])).written == {"p"}
    assert await cache.release("w6", {"p": 6}) == {"p"}
    assert await cache.in_flight({"p": 6}) == {"p"}
    assert (await cache.write(ver, [rec("p", 5)])).written == frozenset()  # refused
    assert await cache.release("w5", {"p": 5}) == set()
    assert await cache.in_flight({"p": 6}) == set()
    # ...and an older writer that claims after the newer one's write is refused at once
    assert (await cache.claim("upsert", "w4", {"p": 4}, [ver])) == {"p": {ver: False}}
    await cache.release("w4", {"p": 4})

    # ...and an older writer that released before the newer one: its Milvus write may have
    # landed last, so the newer one is told to write again (the release flags it)
    assert (await cache.claim("upsert", "o5", {"o": 5}, [ver])) == {"o": {ver: True}}
    assert (await cache.claim("upsert", "o6", {"o": 6}, [ver])) == {"o": {ver: True}}
    assert (await cache.write(ver, [rec("o", 5)])).written == {"o"}  # Redis was empty
    assert await cache.release("o5", {"o": 5}) == set()
    assert (await cache.write(ver, [rec("o", 6)])).written == {"o"}
    assert await cache.release("o6", {"o": 6}) == {"o"}
    # a release run again (its reply was lost and the client retried) answers the same
    assert await cache.release("o6", {"o": 6}) == {"o"}
    assert await cache.in_flight({"o": 6}) == set()
    # a renewed claim keeps that flag
    assert (await cache.claim("upsert", "n5", {"n": 5}, [ver])) == {"n": {ver: True}}
    assert (await cache.claim("upsert", "n6", {"n": 6}, [ver])) == {"n": {ver: True}}
    assert await cache.release("n5", {"n": 5}) == set()
    assert (await cache.claim("upsert", "n6", {"n": 6}, [ver])) == {"n": {ver: True}}
    assert await cache.release("n6", {"n": 6}) == {"n"}
    # a delete that finished first flags the newer upsert in flight (its Milvus delete may
    # have removed the upsert's row)...
    assert (await cache.claim("delete", "d2", {"u": 2}, [ver])) == {"u": {ver: True}}
    assert (await cache.claim("upsert", "u3", {"u": 3}, [ver])) == {"u": {ver: True}}
    assert (await cache.write(ver, [rec("u", 3)])).written == {"u"}
    assert await cache.commit_deletes("d2", {"u": 2}, [ver]) == set()
    assert await _version_of(cache, ver, "u") == 3  # the newer upsert is kept
    assert await cache.release("u3", {"u": 3}) == {"u"}
    # ...and an older upsert that finished after a delete flags the delete (its Milvus
    # write may have brought the pin back)
    assert (await cache.claim("upsert", "x1", {"x": 1}, [ver])) == {"x": {ver: True}}
    assert (await cache.claim("delete", "x2", {"x": 2}, [ver])) == {"x": {ver: True}}
    assert (await cache.write(ver, [rec("x", 1)])).written == frozenset()  # tombstone
    assert await cache.release("x1", {"x": 1}) == set()
    assert await cache.commit_deletes("x2", {"x": 2}, [ver]) == {"x"}
    assert await cache.commit_deletes("x2", {"x": 2}, [ver]) == {"x"}  # retried: the same
    # two writers of the same version: the one that releases last writes again, so both
    # stores end with one writer's content
    assert (await cache.claim("upsert", "e-a", {"e": 4}, [ver])) == {"e": {ver: True}}
    assert (await cache.claim("upsert", "e-b", {"e": 4}, [ver])) == {"e": {ver: True}}
    assert await cache.release("e-a", {"e": 4}) == {"e"}  # e-b still in flight
    assert await cache.release("e-b", {"e": 4}) == {"e"}  # flagged by e-a's release

    # a claim that is never released stops counting after the writer ttl
    assert (await cache.claim("upsert", "dead", {"q": 1}, [ver])) == {"q": {ver: True}}
    assert (await cache.claim("upsert", "live", {"q": 2}, [ver])) == {"q": {ver: True}}
    assert await cache.in_flight({"q": 2}) == {"q"} and await cache.in_flight({"q": 0}) == set()
    deadline = time.monotonic() + 30
    while await cache.in_flight({"q": 1}) and time.monotonic() < deadline:
        await cache.claim("upsert", "live", {"q": 2}, [ver])  # the live writer renews
        await asyncio.sleep(0.05)
    assert await cache.in_flight({"q": 1}) == set()
    # the expired writer may have landed its write after the live one's: flagged
    assert await cache.release("live", {"q": 2}) == {"q"}
    # a claim renewed while its write runs outlives the ttl; a released one is not renewed
    assert (await cache.claim("upsert", "slow", {"s": 1}, [ver])) == {"s": {ver: True}}
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        assert await cache.renew("slow", ["s", "nobody"]) == {"s"}
        await asyncio.sleep(0.05)
    assert await cache.in_flight({"s": 2}) == {"s"}
    assert await cache.release("slow", {"s": 1}) == set()
    assert await cache.renew("slow", ["s"]) == set()

    # versions compare exactly up to 2**62 (Lua numbers are doubles)
    big = 2 ** 62
    assert (await cache.write(ver, [rec("z", big)])).written == {"z"}
    assert (await cache.write(ver, [rec("z", big - 1)])).written == frozenset()
    assert (await cache.claim("upsert", "z1", {"z": big - 1}, [ver])) == {"z": {ver: False}}
    await cache.release("z1", {"z": big - 1})

    # the look-up: tombstones, claims, states per version, registration and completeness
    assert (await cache.claim("upsert", "look", {"c1": 1}, [ver])) == {"c1": {ver: True}}
    got = await cache.lookup([ver, "never"], ["a", "c1", "nobody", "z", "x", "o"])
    assert got.tombs == {"a": 7, "x": 2}
    assert set(got.states["never"]) == set() and set(got.states[ver]) == {"a", "z", "o"}
    assert "o" not in got.claimed  # released writers (their answers kept) claim nothing
    assert got.states[ver]["z"].pin_version == big and got.states[ver]["a"].pin_version == 8
    assert got.states[ver]["a"].content_hash == "hash0"
    assert "c1" in got.claimed and "nobody" not in got.claimed
    assert got.registered == {ver} and got.complete == frozenset()
    await cache.release("look", {"c1": 1})
    await cache.mark_complete(ver)
    got = await cache.lookup([ver], [])
    assert got.complete == {ver} and got.tombs == {} and got.states == {ver: {}}
    try:
        await cache.mark_complete("never")
        raise AssertionError("an unregistered version was marked")
    except UnknownVersion:
        pass
    assert (await cache.lookup(["never"], [])).registered == frozenset()
