"""The write path under races and errors (issue: trustworthy writes), with the fakes.

The fakes write with the real engines' rules (tests/store_contract.py checks
them against Valkey too); the same races run on the real stack in
tests/integration/test_races.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from encoder.errors import (
    Reason,
    StateError,
    StoreUnavailable,
    UnknownVersion,
)
from store.reader import EmbeddingReader
from streams.events import PinEvent
from streams.processor import Message, PinProcessor, StaticVersions
from streams.retry import Backoff
from streams.settings import WorkerSettings
from tests.unit.fakes import FakeCache, FakeDLQ, FakeEncoder, FakeFetcher, FakeMilvus

FILES = {f"/c/{n}.png": f"IMG-{n}".encode() for n in ("a", "b", "c", "d", "v5", "v6")}


async def _nosleep(_: float) -> None:
    await asyncio.sleep(0)


def up(pin: str, image: str, version: int, **kw) -> Message:
    ev = PinEvent.upsert(pin, image, version, event_time=100.0, **kw)
    return Message(pin.encode(), ev.to_bytes())


def delete(pin: str, version: int) -> Message:
    return Message(pin.encode(), PinEvent.delete(pin, version, event_time=100.0).to_bytes())


def processor(milvus, cache, dlq=None, enc=None, **settings) -> PinProcessor:
    enc = enc or FakeEncoder()
    return PinProcessor(encoder=enc, milvus=milvus, cache=cache, fetcher=FakeFetcher(FILES),
                        dlq=dlq or FakeDLQ(), settings=WorkerSettings(**settings),
                        sleep=_nosleep, writer_ttl_s=5.0)


@pytest.fixture
async def stores():
    milvus, cache = FakeMilvus(), FakeCache(writer_ttl_s=5.0)
    await processor(milvus, cache).start()
    return milvus, cache


V = FakeEncoder.version


# ----------------------------------------------------------- two writers of one pin
@pytest.mark.parametrize("order", ["newer_first", "older_first"])
async def test_two_processors_racing_v5_v6_end_at_v6_in_both_stores(stores, order):
    """Two workers hold the same pin (a rebalance, `topics scale`): the one with v5
    claims first, and its Milvus write lands either before or after v6's."""
    milvus, cache = stores
    p5, p6 = processor(milvus, cache), processor(milvus, cache)
    v5_may_write, v6_done = asyncio.Event(), asyncio.Event()

    async def before(version, records):
        if any(r.pin_version == 5 for r in records) and order == "newer_first":
            await v5_may_write.wait()  # v5 is slow: its Milvus write lands after v6's

    milvus.before_upsert = before
    t5 = asyncio.create_task(p5.process([up("a", "/c/v5.png", 5)]))
    await asyncio.sleep(0)
    for _ in range(50):  # let v5 claim the pin and reach its Milvus write
        await asyncio.sleep(0)
    t6 = asyncio.create_task(p6.process([up("a", "/c/v6.png", 6)]))
    if order == "newer_first":
        deadline = time.monotonic() + 30  # a condition, not a count of loop turns
        while cache.data[V].get("a") is None:
            assert time.monotonic() < deadline, "v6 did not write"
            await asyncio.sleep(0.001)
        assert cache.data[V]["a"].pin_version == 6  # v6 wrote both stores first
        v5_may_write.set()
    await asyncio.wait_for(asyncio.gather(t5, t6), 10)
    v6_done.set()
    assert milvus.data[V]["a"].pin_version == 6
    assert cache.data[V]["a"].pin_version == 6
    assert milvus.data[V]["a"].content_hash == cache.data[V]["a"].content_hash


async def test_a_delete_racing_a_slow_older_upsert_leaves_the_pin_deleted(stores):
    milvus, cache = stores
    slow, fast = processor(milvus, cache), processor(milvus, cache)
    gate = asyncio.Event()

    async def before(version, records):
        if any(r.pin_id == "a" and r.pin_version == 1 for r in records):
            await gate.wait()

    milvus.before_upsert = before
    t1 = asyncio.create_task(slow.process([up("a", "/c/a.png", 1)]))
    for _ in range(50):
        await asyncio.sleep(0)
    t2 = asyncio.create_task(fast.process([delete("a", 2)]))
    for _ in range(200):
        await asyncio.sleep(0)
        if cache.tombs.get("a") == 2:
            break
    gate.set()  # the upsert's Milvus write lands after the delete's
    await asyncio.wait_for(asyncio.gather(t1, t2), 10)
    assert "a" not in milvus.data[V] and "a" not in cache.data[V]


# ---------------------------------------------------------------- cache refills
async def test_a_refill_never_brings_a_deleted_pin_back(stores):
    """Reader misses P, reads P v1 from Milvus; a worker applies delete v2; the refill
    then writes: P must stay deleted in both stores."""
    milvus, cache = stores
    await processor(milvus, cache).process([up("a", "/c/a.png", 1)])
    del cache.data[V]["a"]  # e.g. evicted
    reader = EmbeddingReader(milvus, cache)  # type: ignore[arg-type]
    await cache.set_live(V)
    res = await reader.get_many(["a"], V)  # served from Milvus, refill queued
    assert res.found.tolist() == [True]
    await processor(milvus, cache).process([delete("a", 2)])
    await reader.flush_refills()
    again = await reader.get_many(["a"], V)
    assert again.found.tolist() == [False]
    assert "a" not in milvus.data[V] and "a" not in cache.data[V]
    # even a refill with the old record in hand is refused
    from tests.store_contract import rec
    assert await cache.refill(V, [rec("a", 1, dim=8, model=V)]) == set()
    await reader.close()


async def test_a_refill_never_moves_a_pin_back_to_an_older_version(stores):
    milvus, cache = stores
    await processor(milvus, cache).process([up("a", "/c/a.png", 5)])
    old = dict(milvus.data[V])
    del cache.data[V]["a"]
    await processor(milvus, cache).process([up("a", "/c/b.png", 6)])
    from tests.store_contract import rec
    assert await cache.refill(V, [old["a"]]) == set()
    assert await cache.refill(V, [rec("a", 5, dim=8, model=V)]) == set()
    assert cache.data[V]["a"].pin_version == 6 and milvus.data[V]["a"].pin_version == 6


# ------------------------------------------------------------ errors by kind
@pytest.mark.parametrize("error", [
    lambda: StoreUnavailable("Redis unavailable: OOM command not allowed", 0.0),
    lambda: StoreUnavailable("Redis unavailable: READONLY replica", 0.0),
    lambda: StoreUnavailable("Milvus upsert failed (code 8): rate limit", 0.0),
], ids=["redis-oom", "redis-readonly", "milvus-rate-limit"])
@pytest.mark.parametrize("side", ["milvus", "cache"])
async def test_an_outage_is_waited_out_and_never_dead_lettered(stores, error, side):
    milvus, cache = stores
    dlq = FakeDLQ()
    target = milvus if side == "milvus" else cache
    target.error, target.fail_next = error, 6
    rep = await processor(milvus, cache, dlq).handle([up("a", "/c/a.png", 1)])
    assert dlq.letters == [] and rep.written == 1
    assert milvus.data[V]["a"].pin_version == 1 and cache.data[V]["a"].pin_version == 1


async def test_a_row_milvus_refuses_is_dead_lettered_alone(stores):
    milvus, cache = stores
    dlq = FakeDLQ()
    milvus.refuse = lambda r: r.pin_id == "b"
    rep = await processor(milvus, cache, dlq).handle(
        [up("a", "/c/a.png", 1), up("b", "/c/b.png", 1), up("c", "/c/c.png", 1)])
    assert [(d.pin_id, d.reason) for d in dlq.letters] == [("b", Reason.STORE_REJECTED)]
    assert set(milvus.data[V]) == {"a", "c"} and set(cache.data[V]) == {"a", "c"}
    assert rep.written == 2


async def test_an_unknown_error_is_isolated_as_a_bug(stores):
    milvus, cache = stores
    dlq = FakeDLQ()
    cache.error, cache.fail_next = (lambda: StateError("Redis error: WRONGTYPE")), 1
    await processor(milvus, cache, dlq, internal_error_attempts=1).handle(
        [up("a", "/c/a.png", 1)])
    assert [(d.pin_id, d.reason) for d in dlq.letters] == [("a", Reason.INTERNAL_ERROR)]


async def test_an_encoder_that_fails_is_an_outage_not_a_dead_letter(stores):
    from encoder.errors import EncoderUnavailable

    milvus, cache = stores
    enc, dlq = FakeEncoder(), FakeDLQ()
    real = enc.encode_images_async
    fails = [3]

    async def flaky(items):
        if fails[0]:
            fails[0] -= 1
            raise EncoderUnavailable("CUDA error: an illegal memory access", 0.0)
        return await real(items)

    enc.encode_images_async = flaky  # type: ignore[method-assign]
    rep = await processor(milvus, cache, dlq, enc=enc).handle([up("a", "/c/a.png", 1)])
    assert dlq.letters == [] and rep.written == 1


def test_backoff_never_overflows():
    b = Backoff(0.2, 10.0, rng=lambda: 0.5)
    b.attempt = 5000  # ~ 14 hours of retries at the cap
    assert b.next_delay() == 10.0


# ---------------------------------------------------------- per-event failures
async def test_a_malformed_message_never_stands_in_for_a_valid_event_of_that_pin(stores):
    milvus, cache = stores
    dlq = FakeDLQ()
    bad = Message(b"a", json.dumps({"op": "upsert", "pin_id": "a"}).encode())  # no image
    rep = await processor(milvus, cache, dlq).handle([bad, up("a", "/c/missing.png", 2)])
    reasons = sorted((d.pin_id, d.reason.value) for d in dlq.letters)
    assert reasons == [("a", "malformed_event"), ("a", "not_found")]
    assert len(rep.dead_letters) == 2


async def test_an_event_keyed_by_something_else_is_dead_lettered_with_its_reason(stores):
    milvus, cache = stores
    dlq = FakeDLQ()
    ev = PinEvent.upsert("a", "/c/a.png", 1, event_time=100.0)
    await processor(milvus, cache, dlq).handle([
        Message(b"not-a", ev.to_bytes()), Message(None, ev.to_bytes()),
        up("b", "/c/b.png", 1)])
    assert [(d.pin_id, d.reason) for d in dlq.letters] == [
        ("not-a", Reason.KEY_MISMATCH), ("a", Reason.KEY_MISMATCH)]
    assert "a" not in milvus.data[V] and "b" in milvus.data[V]


# --------------------------------------------------------------- versions vanish
async def test_a_non_primary_version_that_vanishes_mid_batch_leaves_the_write_set(stores):
    milvus, cache = stores
    live, extra = FakeEncoder(), FakeEncoder()
    extra.version = "extra_v2"  # type: ignore[misc]
    versions = StaticVersions(live, extra)
    dlq = FakeDLQ()
    proc = PinProcessor(encoder=live, milvus=milvus, cache=cache, fetcher=FakeFetcher(FILES),
                        dlq=dlq, settings=WorkerSettings(), sleep=_nosleep,
                        versions=versions)
    await proc.start()

    async def drop(version, records):
        if version == "extra_v2":  # retired and dropped while the batch runs
            milvus.data.pop("extra_v2", None)
            cache.info.pop("extra_v2", None)
            raise UnknownVersion("no collection for version extra_v2")

    milvus.before_upsert = drop
    rep = await proc.handle([up("a", "/c/a.png", 1)])
    assert dlq.letters == [] and rep.written == 1
    assert "a" in milvus.data[V] and "a" in cache.data[V]
    assert "extra_v2" not in cache.data or "a" not in cache.data["extra_v2"]
    assert list(await versions.write_set()) == [V]


async def test_model_info_shows_every_version_the_worker_writes_now(stores):
    """pinfresh_worker_model_info showed only the version a worker booted with."""
    from streams import metrics

    def shown() -> set[str]:
        return {s.labels["version"] for m in metrics.MODEL_INFO.collect() for s in m.samples
                if s.value == 1}

    milvus, cache = stores
    live, extra = FakeEncoder(), FakeEncoder()
    extra.version = "extra_v3"  # type: ignore[misc]
    versions = StaticVersions(live)
    proc = PinProcessor(encoder=live, milvus=milvus, cache=cache, fetcher=FakeFetcher(FILES),
                        dlq=FakeDLQ(), settings=WorkerSettings(), sleep=_nosleep,
                        versions=versions)
    await proc.start()
    assert V in shown() and "extra_v3" not in shown()
    versions._write = {V: live, "extra_v3": extra}  # a refresh adds a version
    await milvus.ensure_version("extra_v3", extra.dim)
    await cache.ensure_version("extra_v3", extra.dim)
    await proc.handle([up("a", "/c/a.png", 1)])
    assert {V, "extra_v3"} <= shown()
    versions._write = {V: live}  # and retires it
    await proc.handle([up("b", "/c/b.png", 1)])
    assert "extra_v3" not in shown()


# ------------------------------- an older writer that releases before the newer one
async def _until(cond, timeout: float = 60.0) -> None:
    """Wait for ``cond``: a number of loop turns was not enough on a loaded machine (the
    processor's file reads run in threads)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.001)


async def test_an_older_upsert_landing_last_in_milvus_and_releasing_first_is_undone(stores):
    """v6 writes Milvus; v5's Milvus write lands after it and v5 writes Redis (still empty)
    and releases, all before v6's Redis write. v6 must write again."""
    milvus, cache = stores
    gate5, gate6 = asyncio.Event(), asyncio.Event()
    at_redis6 = asyncio.Event()

    async def before_upsert(version, records):
        if any(r.pin_version == 5 for r in records):
            await gate5.wait()

    async def before_write(version, records):
        if any(r.pin_version == 6 for r in records) and not gate6.is_set():
            at_redis6.set()
            await gate6.wait()

    milvus.before_upsert, cache.before_write = before_upsert, before_write
    p6 = processor(milvus, cache)
    t5 = asyncio.create_task(processor(milvus, cache).process([up("a", "/c/v5.png", 5)]))
    await _until(lambda: "a" in cache.wip and len(cache.wip["a"]) == 1)
    t6 = asyncio.create_task(p6.process([up("a", "/c/v6.png", 6)]))
    await asyncio.wait_for(at_redis6.wait(), 10)  # v6 is in Milvus, its Redis write waits
    assert milvus.data[V]["a"].pin_version == 6
    gate5.set()
    await asyncio.wait_for(t5, 10)  # v5 landed in Milvus after v6, wrote Redis, released
    assert milvus.data[V]["a"].pin_version == 5
    gate6.set()
    rep6 = await asyncio.wait_for(t6, 10)
    assert milvus.data[V]["a"].pin_version == 6 and cache.data[V]["a"].pin_version == 6
    assert rep6.rewritten == 1


async def test_a_delete_whose_milvus_delete_lands_after_a_newer_upsert_is_undone(stores):
    """D2 claims; U3 claims and writes Milvus and Redis; D2's Milvus delete lands after
    and D2 commits first. U3 must write again: the pin is at v3 in both stores."""
    milvus, cache = stores
    await processor(milvus, cache).process([up("a", "/c/a.png", 1)])
    gate_d, gate_u = asyncio.Event(), asyncio.Event()
    at_release_u = asyncio.Event()

    async def before_delete(version, ids):
        await gate_d.wait()

    async def before_write(version, records):
        if any(r.pin_version == 3 for r in records) and not gate_u.is_set():
            at_release_u.set()
            await gate_u.wait()

    milvus.before_delete, cache.before_write = before_delete, before_write
    td = asyncio.create_task(processor(milvus, cache).process([delete("a", 2)]))
    await _until(lambda: cache.tombs.get("a") == 2)
    tu = asyncio.create_task(processor(milvus, cache).process([up("a", "/c/b.png", 3)]))
    await asyncio.wait_for(at_release_u.wait(), 10)  # U3 is in Milvus; its Redis write waits
    gate_d.set()
    await asyncio.wait_for(td, 10)  # the delete removed U3's row and committed
    assert "a" not in milvus.data[V]
    gate_u.set()
    await asyncio.wait_for(tu, 10)
    assert milvus.data[V]["a"].pin_version == 3 and cache.data[V]["a"].pin_version == 3


async def test_an_older_upsert_landing_after_a_delete_is_deleted_again(stores):
    """U1 claims; D2 claims, deletes in Milvus; U1's Milvus write lands after (the pin is
    back in Milvus), its Redis write is refused and it releases; D2 must delete again."""
    milvus, cache = stores
    gate_u, gate_d = asyncio.Event(), asyncio.Event()
    deleted = asyncio.Event()

    async def before_upsert(version, records):
        if any(r.pin_version == 1 for r in records):
            await gate_u.wait()

    async def before_delete(version, ids):
        if not gate_d.is_set():
            deleted.set()
            await gate_d.wait()

    milvus.before_upsert, milvus.before_delete = before_upsert, before_delete
    tu = asyncio.create_task(processor(milvus, cache).process([up("a", "/c/a.png", 1)]))
    await _until(lambda: "a" in cache.wip)
    td = asyncio.create_task(processor(milvus, cache).process([delete("a", 2)]))
    await asyncio.wait_for(deleted.wait(), 10)
    gate_d.set()  # the delete lands first...
    await _until(lambda: "a" not in milvus.data[V] and cache.tombs.get("a") == 2)
    gate_u.set()  # ...then the older upsert's Milvus write
    await asyncio.wait_for(asyncio.gather(tu, td), 10)
    assert "a" not in milvus.data[V] and "a" not in cache.data[V]
