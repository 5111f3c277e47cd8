"""Store backends against the real embedded Milvus server and Valkey."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from encoder.errors import DimensionMismatch
from store.base import EmbeddingRecord
from store.config import MilvusSettings, RedisSettings
from store.milvus import MilvusStore
from store.reader import EmbeddingReader
from store.redis import RedisCache

pytestmark = pytest.mark.integration


@pytest.fixture
async def stores(stack, request):
    tag = request.node.name.replace("[", "_").replace("]", "_")[-20:].strip("_")
    milvus = MilvusStore(MilvusSettings(uri=stack.milvus_uri, collection_prefix=f"s_{tag}"))
    cache = RedisCache(RedisSettings(url=stack.redis_url, key_prefix=f"s_{tag}"))
    yield milvus, cache
    await milvus.close()
    await cache.close()


def rec(pin: str, dim: int, version: str = "v1") -> EmbeddingRecord:
    v = np.random.default_rng(abs(hash(pin)) % 2**32).standard_normal(dim).astype(np.float32)
    return EmbeddingRecord(pin, v / np.linalg.norm(v), version, "h" * 64, 1, time.time(),
                           time.time(), f"/img/{pin}.png", f"caption {pin}")


@pytest.mark.cluster
async def test_other_dimension_is_refused_with_the_fix(stores):
    milvus, cache = stores
    await milvus.ensure_version("v1", 512)
    await cache.ensure_version("v1", 512)
    await milvus.ensure_version("v1", 512)  # idempotent
    with pytest.raises(DimensionMismatch, match="512 != encoder dim 768.*pick the matching"):
        await milvus.ensure_version("v1", 768)
    with pytest.raises(DimensionMismatch, match="512 != encoder dim 768"):
        await cache.ensure_version("v1", 768)


@pytest.mark.cluster
async def test_upsert_replay_keeps_one_row_and_reader_falls_back_and_refills(stores):
    milvus, cache = stores
    await milvus.ensure_version("v1", 16)
    await cache.ensure_version("v1", 16)
    await cache.set_live("v1")
    records = [rec(f"p{i}", 16) for i in range(10)]
    await milvus.upsert("v1", records)
    await milvus.upsert("v1", records)  # replay
    assert await milvus.count("v1") == 10
    await cache.upsert("v1", records[:4])

    reader = EmbeddingReader(milvus, cache)
    res = await reader.get_many(["p0", "p7", "nope", "p3"])
    assert res.version == "v1" and res.found.tolist() == [True, True, False, True]
    assert res.from_cache == 2
    assert np.allclose(res.vectors[1], records[7].vector, atol=1e-3)
    assert not res.vectors[2].any()
    assert await reader.flush_refills() == 1  # p7, read again at Strong consistency
    again = await reader.get_many(["p7"])
    assert again.from_cache == 1  # refilled from Milvus

    ver, hits = await reader.similar(pin_id="p5", k=3)
    assert ver == "v1" and len(hits) == 3 and "p5" not in [h.pin_id for h in hits]
    await reader.close()


@pytest.mark.cluster
async def test_live_read_is_one_round_trip_and_follows_a_flip(stack, request):
    """The reader reads the live pointer in its vectors' MGET on one node (a cluster: two
    trips), and follows promote and rollback at once: every read is one version's bytes."""
    tag = f"lv{abs(hash(request.node.name)) % 10**8}"
    cache = RedisCache(RedisSettings(url=stack.redis_url, key_prefix=tag))
    reader = EmbeddingReader(None, cache, refill=False)  # type: ignore[arg-type]
    trips: list[str] = []
    mget, get_live = cache._mget, cache.get_live

    async def counted_mget(keys):  # type: ignore[no-untyped-def]
        trips.append("mget")
        return await mget(keys)

    async def counted_live():  # type: ignore[no-untyped-def]
        trips.append("live")
        return await get_live()

    cache._mget, cache.get_live = counted_mget, counted_live  # type: ignore[method-assign]
    try:
        ids = [f"p{i}" for i in range(6)]
        recs = {v: [rec(p, 8, v) for p in ids] for v in ("v1", "v2")}
        for v in ("v1", "v2"):
            await cache.ensure_version(v, 8)
            # another version's vectors differ: v2 stores v1's negated
            if v == "v2":
                recs[v] = [replace(r, vector=-r.vector, model_version="v2")
                           for r in recs["v1"]]
            await cache.upsert(v, recs[v])
        want = {v: np.stack([r.vector for r in recs[v]]).astype(np.float16).astype(np.float32)
                for v in recs}
        first, same, flipped = ["live", "mget"], ["mget"], ["mget", "live", "mget"]
        if cache.cluster:  # the pointer's slot is not the pins': read it first, always
            first = same = flipped = ["live", "mget"]
        for live, expect in (("v1", first), ("v1", same), ("v2", flipped), ("v2", same),
                             ("v1", flipped)):
            await cache.set_live(live)
            trips.clear()
            res = await reader.get_many(ids)
            assert res.version == live and res.found.all()
            assert np.array_equal(res.vectors, want[live])
            assert trips == expect
        # a guess of a version that does not exist is no error: the pointer decides
        live, vecs, found = await cache.get_live_vectors(ids, "never-registered")
        assert live == "v1" and found.all() and np.array_equal(vecs, want["v1"])
    finally:
        await cache.close()


@pytest.mark.cluster
async def test_cache_write_contract_on_the_real_engine(stack, request):
    """The rules the unit fakes copy (tests/store_contract.py), on Valkey itself."""
    from tests.store_contract import check_cache_contract

    tag = f"k{abs(hash(request.node.name)) % 10**8}"
    cache = RedisCache(RedisSettings(url=stack.redis_url, key_prefix=tag, writer_ttl_s=0.3))
    try:
        await cache.ensure_version("m1", 4)
        await check_cache_contract(cache, "m1")
    finally:
        await cache.close()


async def test_collections_are_sealed_every_seal_rows_when_asked(stack):
    """Unsealed rows make every Milvus Lite search scan them one by one: a store can seal."""
    every = MilvusStore(MilvusSettings(
        uri=stack.milvus_uri, collection_prefix="seal_100", seal_rows=100, index_type="HNSW",
        index_params={"M": 8, "efConstruction": 64}, search_params={"ef": 32}))
    default = MilvusStore(MilvusSettings(uri=stack.milvus_uri, collection_prefix="seal_0"))
    for st in (every, default):
        await st.ensure_version("v1", 16)
        for i in range(0, 250, 50):
            await st.upsert("v1", [rec(f"p{j}", 16) for j in range(i, i + 50)])
    await every.close()  # waits for the seals in flight
    await default.close()
    # the first seal starts at 100 rows; a second at 200 only if the first has finished
    # by then (rows written meanwhile wait for the next one); by default never
    assert 1 <= every.seals <= 2 and default.seals == 0

    again = MilvusStore(every.settings)
    try:
        info = again._client.describe_index(again.collection("v1"), "vector")
        assert info["index_type"] == "HNSW"
        assert info["params"] == {"M": 8, "efConstruction": 64}  # the build parameters arrived
        assert await again.settle("v1")  # sealed and indexed, every row
        hits = await again.search("v1", rec("p7", 16).vector, 3)
        assert hits[0].pin_id == "p7" and await again.count("v1") == 250
        await again.drop_version("v1")
    finally:
        await again.close()


async def test_migrate_keys_moves_a_0_1_layout_in_place(stack):
    """A node written by pinfresh 0.1 (no hash tags, one ids set) keeps its data."""
    import redis.asyncio as aioredis

    from encoder.errors import StateError
    from store.migrate import migrate_keys

    r = aioredis.Redis.from_url(stack.redis_url)
    vecs = {pid: np.arange(4, dtype="<f4") + i for i, pid in enumerate(("a", "b"))}
    await r.sadd("mig:versions", "v1")
    await r.hset("mig:version:v1", mapping={"dim": 4, "dtype": "float32", "state": "live"})
    await r.set("mig:live", "v1")
    for pid, v in vecs.items():
        await r.set(f"mig:v1:vec:{pid}", v.tobytes())
        await r.hset(f"mig:v1:meta:{pid}", mapping={"pin_version": 2, "content_hash": "h"})
    await r.sadd("mig:v1:ids", "a", "b")
    await r.set("mig:tomb:c", 3, ex=600)
    cache = RedisCache(RedisSettings(url=stack.redis_url, key_prefix="mig"))
    try:
        with pytest.raises(StateError, match="store migrate-keys"):
            await cache.ensure_version("v1", 4)
        done = await migrate_keys(cache)
        assert dict(done) == {"registry": 3, "vectors": 2, "metas": 2, "ids": 2,
                              "tombstones": 1}
        assert await cache.get_live() == "v1" and await cache.count("v1") == 2
        got, found = await cache.get_vectors("v1", ["a", "b", "z"])
        assert found.tolist() == [True, True, False] and np.array_equal(got[1], vecs["b"])
        assert (await cache.get_states("v1", ["a"]))["a"].pin_version == 2
        assert await cache.get_tombstones(["c"]) == {"c": 3}
        assert 0 < await r.ttl(cache.tomb_key("c")) <= 600
        assert await r.keys("mig:v1:vec:a") == [] and not await r.exists("mig:v1:ids")
        assert dict(await migrate_keys(cache)) == {}  # a second run finds nothing to move
        await cache.ensure_version("v1", 4)  # the registry is usable again
    finally:
        await cache.close()
        await r.aclose()


async def test_freshness_is_read_over_a_time_window(stack):
    """`status` read the last 10,000 samples whatever their age: one replay of old events
    held p99 at 95 s for the rest of the day. Samples carry the time they were written."""
    cache = RedisCache(RedisSettings(url=stack.redis_url, key_prefix="s_window"))
    try:
        t = time.time()
        await cache.record_batch_stats([95.0, 0.4], 2)
        fresh, encoded = await cache.batch_stats(window_s=300, now=t + 10)
        assert sorted(fresh) == [0.4, 95.0] and encoded == 2
        assert (await cache.batch_stats(window_s=300, now=t + 400))[0] == []
        assert sorted((await cache.batch_stats())[0]) == [0.4, 95.0]  # no window: all
    finally:
        await cache.close()


@pytest.mark.cluster
async def test_writes_survive_a_server_that_forgot_its_scripts(stack, request, monkeypatch):
    """Scripts go as EVALSHA; after a SCRIPT FLUSH (a restarted or failed-over server) the
    calls answered NOSCRIPT are loaded and run once, in write, claim, release and delete."""
    from redis.asyncio.cluster import RedisCluster

    tag = f"f{abs(hash(request.node.name)) % 10**8}"
    cache = RedisCache(RedisSettings(url=stack.redis_url, key_prefix=tag))
    r = cache._r
    loads: list[str] = []
    load = r.script_load

    async def counting_load(script):  # type: ignore[no-untyped-def]
        loads.append(script)
        return await load(script)

    # this client's loads only: another test's client in this process is not counted
    monkeypatch.setattr(r, "script_load", counting_load)

    async def flush() -> None:
        if isinstance(r, RedisCluster):
            await r.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
        else:
            await r.script_flush()

    try:
        await cache.ensure_version("v1", 8)
        pins = {f"p{i}": 1 for i in range(600)}  # three batch calls on one node
        await flush()
        assert all(all(v.values()) for v in (await cache.claim("upsert", "t1", pins,
                                                                 ["v1"])).values())
        await flush()
        done = await cache.write("v1", [rec(p, 8) for p in pins])
        assert done.written == set(pins)
        assert await cache.count("v1") == 600
        await flush()
        assert await cache.release("t1", pins) == set()
        await flush()
        await cache.delete("v1", ["p0", "p1"])
        assert await cache.count("v1") == 598
        # stale writes are refused pin by pin, across batch calls, not retried
        mixed = [replace(rec(p, 8), pin_version=0 if i % 3 == 0 else 2)
                 for i, p in enumerate(list(pins)[2:])]
        stale = await cache.write("v1", mixed)
        assert stale.written == {r.pin_id for r in mixed if r.pin_version == 2}
        assert len(stale.written) == 398
        from store.redis.scripts import CLAIM, DELETE, RELEASE, WRITE

        # each loaded once after each flush (the last write follows the flush before delete)
        sent = {(s.batch_text if not cache.cluster else s.text): s.name
                for s in (CLAIM, WRITE, RELEASE, DELETE)}  # one node: the batch forms
        assert [sent.get(x) for x in loads] == ["claim", "write", "release", "delete", "write"]
        meta = await cache.get_meta("v1", ["p2", "p3"])
        assert (meta["p2"]["pin_version"], meta["p3"]["pin_version"]) == ("1", "2")
    finally:
        await cache.close()


@pytest.mark.cluster
async def test_every_lua_script_loads_into_valkey(stack):
    """Each script of store/redis/lua, and each per-pin script's batch form, is loaded into
    the real server (every primary of a cluster): a syntax error fails here, not in a
    worker at start-up."""
    from redis.asyncio.cluster import RedisCluster

    from store.redis.scripts import ALL

    cache = RedisCache(RedisSettings(url=stack.redis_url, key_prefix="lua"))
    r = cache.client
    try:
        texts = [s.text for s in ALL] + [s.batch_text for s in ALL if s.body is not None]
        assert len(texts) == len(ALL) * 2 - 1  # every script but the mark runs per pin
        for text in texts:
            if isinstance(r, RedisCluster):
                shas = await r.script_load(text)  # loaded on every primary
                got = {s if isinstance(s, str) else s.decode() for s in (
                    shas.values() if isinstance(shas, dict) else [shas])}
            else:
                got = {await r.script_load(text)}
            from store.redis.scripts import sha1

            assert got == {sha1(text)}
    finally:
        await cache.close()
