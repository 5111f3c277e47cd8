"""PinProcessor rules, driven with in-memory fakes (no services)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from encoder.errors import TransientFetchError
from streams.events import PinEvent, Reason
from streams.processor import Message, PinProcessor, ProcessorHooks
from streams.settings import WorkerSettings
from tests.unit.fakes import FakeCache, FakeDLQ, FakeEncoder, FakeFetcher, FakeMilvus


async def _nosleep(_: float) -> None:
    return None


class RaiseFor(ProcessorHooks):
    """A bug: processing a batch that holds ``pin`` raises."""

    def __init__(self, pin: str) -> None:
        self.pin = pin

    def before_batch(self, events) -> None:
        if any(e.pin_id == self.pin for e in events):
            raise RuntimeError(f"fault injection: processing pin {self.pin} raises")


@pytest.fixture
async def parts():
    enc, milvus, cache, dlq = FakeEncoder(), FakeMilvus(), FakeCache(), FakeDLQ()
    fetcher = FakeFetcher({"/c/a.png": b"IMG-a", "/c/b.png": b"IMG-b", "/c/a2.png": b"IMG-a2",
                           "/c/bad.png": b"<html>", "/c/a-copy.png": b"IMG-a"})
    proc = PinProcessor(encoder=enc, milvus=milvus, cache=cache, fetcher=fetcher, dlq=dlq,
                        settings=WorkerSettings(fetch_attempts=3), sleep=_nosleep)
    await proc.start()  # creates the version's collection and namespace, as a worker does
    return proc, enc, milvus, cache, fetcher, dlq


def msg(ev: PinEvent) -> Message:
    return Message(ev.pin_id.encode(), ev.to_bytes())


def up(pin: str, image: str, version: int, caption: str = "") -> Message:
    return msg(PinEvent.upsert(pin, image, version, caption, event_time=100.0))


async def test_start_makes_first_version_live(parts):
    proc, enc, milvus, cache, *_ = parts
    await proc.start()
    assert cache.live == enc.version and milvus.live == enc.version


async def test_upsert_writes_both_stores_with_provenance(parts):
    proc, enc, milvus, cache, *_ = parts
    rep = await proc.process([up("a", "/c/a.png", 1, "cap a")])
    assert rep.written == 1 and rep.encoded == 1
    for store in (milvus, cache):
        rec = store.data[enc.version]["a"]
        assert rec.pin_version == 1 and rec.caption == "cap a"
        assert rec.model_version == enc.version and len(rec.content_hash) == 64
        assert np.isclose(np.linalg.norm(rec.vector), 1.0)
    # freshness: from the event's time (100.0) to the Redis write, taken on this clock
    assert rep.freshness_s == [pytest.approx(time.time() - 100.0, abs=600)]


async def test_redelivery_is_not_fetched_or_encoded_again(parts):
    proc, enc, milvus, cache, fetcher, _ = parts
    await proc.process([up("a", "/c/a.png", 1)])
    rep = await proc.process([up("a", "/c/a.png", 1)])
    assert rep.skipped == 1 and rep.encoded == 0
    assert len(enc.calls) == 1 and len(fetcher.calls) == 1
    assert len(milvus.data[enc.version]) == 1


async def test_duplicate_in_one_batch_encodes_once(parts):
    proc, enc, *_ = parts
    rep = await proc.process([up("a", "/c/a.png", 1), up("a", "/c/a.png", 1)])
    assert len(enc.calls) == 1 and rep.written == 1


async def test_newer_version_replaces_older_never_the_reverse(parts):
    proc, enc, milvus, cache, *_ = parts
    await proc.process([up("a", "/c/a.png", 1)])
    first = milvus.data[enc.version]["a"].vector
    await proc.process([up("a", "/c/a2.png", 3)])
    second = milvus.data[enc.version]["a"].vector
    assert not np.allclose(first, second)
    rep = await proc.process([up("a", "/c/a.png", 2)])  # older, arrives late
    assert rep.skipped == 1 and rep.written == 0
    assert milvus.data[enc.version]["a"].pin_version == 3
    assert np.allclose(cache.data[enc.version]["a"].vector, second)


async def test_highest_version_in_batch_wins(parts):
    proc, enc, milvus, *_ = parts
    await proc.process([up("a", "/c/a2.png", 5), up("a", "/c/a.png", 4)])
    assert milvus.data[enc.version]["a"].pin_version == 5


async def test_same_image_new_version_reuses_vector(parts):
    proc, enc, milvus, *_ = parts
    await proc.process([up("a", "/c/a.png", 1, "old")])
    rep = await proc.process([up("a", "/c/a-copy.png", 2, "new caption")])
    assert rep.reused == 1 and rep.encoded == 0 and len(enc.calls) == 1
    rec = milvus.data[enc.version]["a"]
    assert rec.pin_version == 2 and rec.caption == "new caption"


async def test_delete_removes_from_every_version_and_blocks_older_upserts(parts):
    proc, enc, milvus, cache, *_ = parts
    cache.info["old_v0"] = {"dim": "8"}
    milvus.data["old_v0"] = {}
    await proc.process([up("a", "/c/a.png", 1), up("b", "/c/b.png", 1)])
    milvus.data["old_v0"]["a"] = milvus.data[enc.version]["a"]
    rep = await proc.process([msg(PinEvent.delete("a", 2, event_time=101.0))])
    assert rep.deleted == 1
    assert "a" not in milvus.data[enc.version] and "a" not in cache.data[enc.version]
    assert "a" not in milvus.data["old_v0"]
    assert "b" in milvus.data[enc.version]
    rep = await proc.process([up("a", "/c/a.png", 2)])  # not newer than the delete
    assert rep.written == 0 and "a" not in milvus.data[enc.version]
    rep = await proc.process([up("a", "/c/a.png", 3)])  # newer: comes back
    assert rep.written == 1


async def test_stale_delete_is_ignored(parts):
    proc, enc, milvus, *_ = parts
    await proc.process([up("a", "/c/a.png", 5)])
    await proc.process([msg(PinEvent.delete("a", 4, event_time=101.0))])
    assert "a" in milvus.data[enc.version]


async def test_malformed_and_missing_go_to_dlq_others_processed(parts):
    proc, enc, milvus, _, _, dlq = parts
    rep = await proc.process([
        up("a", "/c/a.png", 1),
        Message(b"x", b"{not json"),
        Message(b"y", json.dumps({"op": "upsert", "pin_id": "y"}).encode()),
        up("m", "/c/missing.png", 1),
        up("h", "/c/bad.png", 1),
        up("b", "/c/b.png", 1),
    ])
    assert set(milvus.data[enc.version]) == {"a", "b"}
    reasons = {(d.pin_id, d.reason) for d in dlq.letters}
    assert reasons == {("x", Reason.MALFORMED_EVENT), ("y", Reason.MALFORMED_EVENT),
                       ("m", Reason.NOT_FOUND), ("h", Reason.NOT_AN_IMAGE)}
    assert rep.written == 2 and len(rep.dead_letters) == 4
    original = next(d for d in dlq.letters if d.pin_id == "m").original_bytes()
    assert json.loads(original)["image"] == "/c/missing.png"


async def test_transient_fetch_error_retried_then_dead_lettered(parts):
    proc, enc, milvus, _, fetcher, dlq = parts
    fetcher.files["/c/flaky.png"] = TransientFetchError(Reason.FETCH_FAILED, "HTTP 503")
    await proc.process([up("f", "/c/flaky.png", 1)])
    assert fetcher.calls.count("/c/flaky.png") == 3
    assert dlq.letters[0].reason == Reason.FETCH_FAILED and dlq.letters[0].attempts == 3


async def test_store_outage_is_retried_not_dropped(parts):
    proc, enc, milvus, cache, *_ = parts
    milvus.fail_next = 3
    cache.fail_next = 2
    rep = await proc.process([up("a", "/c/a.png", 1)])
    assert rep.written == 1
    assert "a" in milvus.data[enc.version] and "a" in cache.data[enc.version]


async def test_a_writer_that_died_between_the_stores_costs_no_encode(parts):
    """A writer killed after its Milvus write leaves its claim in Redis: the next
    look-up reads Milvus for that pin (at Eventually, no tick to wait for), skips the
    redelivery and repairs the cache from Milvus."""
    proc, enc, milvus, cache, *_ = parts
    await proc.process([up("a", "/c/a.png", 1)])
    del cache.data[enc.version]["a"]  # the crash: Milvus written, Redis not
    await cache.claim("upsert", "dead-writer", {"a": 1}, [enc.version])
    milvus.reads.clear()
    rep = await proc.process([up("a", "/c/a.png", 1), up("b", "/c/b.png", 1)])
    assert rep.repaired == 1 and rep.skipped == 1 and len(enc.calls) == 2
    assert "a" in cache.data[enc.version]
    assert milvus.reads[0] == ("get_states", enc.version, ("a",), "Eventually")
    assert all(c != "Session" and c is not None for *_, c in milvus.reads)


async def test_pins_redis_knows_are_looked_up_in_redis_alone(parts):
    """The look-up of a batch whose pins Redis knows (or that nobody claims) reads no
    Milvus state: a read at Session or Strong right after this process's own upsert
    would wait for the server's time tick (docs/benchmarks.md)."""
    proc, enc, milvus, cache, fetcher, _ = parts
    await proc.process([up("a", "/c/a.png", 1), up("b", "/c/b.png", 1)])
    milvus.reads.clear()
    rep = await proc.process([up("a", "/c/a.png", 1), up("b", "/c/b.png", 2),
                              up("x", "/c/a2.png", 1),
                              msg(PinEvent.delete("a", 3, event_time=100.0))])
    assert rep.deleted == 1 and rep.written == 2
    # the only read: the reuse of b's vector (same bytes, new pin version), hash-checked
    assert [r[:3] for r in milvus.reads] == [("get_many", enc.version, ("b",))]
    assert milvus.reads[0][3] == "Eventually"


async def test_a_cache_that_lost_its_data_is_not_trusted_until_repaired(parts):
    """Redis restarted empty: the cache's completeness mark is gone with its data, so
    look-ups read every pin from Milvus at Strong (an older event must not overwrite
    what only Milvus still knows) until `store verify --repair` marks it again."""
    proc, enc, milvus, cache, *_ = parts
    await proc.process([up("a", "/c/a.png", 5)])
    cache.lose_data()
    await proc.start()  # a restarted worker: Milvus holds rows, so no mark
    milvus.reads.clear()
    rep = await proc.process([up("a", "/c/a2.png", 3), up("b", "/c/b.png", 1)])
    assert rep.skipped == 1 and rep.repaired == 1  # stale against Milvus; cache repaired
    assert milvus.data[enc.version]["a"].pin_version == 5
    assert cache.data[enc.version]["a"].pin_version == 5
    assert ("get_states", enc.version, ("a", "b"), "Strong") in milvus.reads
    await cache.mark_complete(enc.version)  # what verify --repair does at its end
    milvus.reads.clear()
    await proc.process([up("c", "/c/a2.png", 1)])
    assert not [r for r in milvus.reads if r[0] == "get_states"]


async def test_an_evicting_redis_is_never_trusted(parts):
    proc, enc, milvus, cache, *_ = parts

    async def lru() -> str:
        return "allkeys-lru"

    cache.eviction_policy = lru
    await proc.start()
    milvus.reads.clear()
    await proc.process([up("a", "/c/a.png", 1)])
    assert milvus.reads == [("get_states", enc.version, ("a",), "Strong")]


# ------------------------------------------------------------ isolation
async def test_an_event_that_raises_is_isolated_and_the_rest_is_applied(parts):
    proc, enc, milvus, *_ = parts
    proc.hooks = RaiseFor("b")
    await proc.start()
    batch = [up("a", "/c/a.png", 1), up("b", "/c/b.png", 1), up("x", "/c/a2.png", 1),
             msg(PinEvent.delete("gone", 1, event_time=100.0)), up("bad", "/c/bad.png", 1)]
    rep = await proc.handle(batch)
    assert set(milvus.data[enc.version]) == {"a", "x"}
    letters = {dl.pin_id: dl for dl in parts[-1].letters}
    assert set(letters) == {"b", "bad"}
    internal = letters["b"]
    assert internal.reason is Reason.INTERNAL_ERROR and internal.attempts == 3
    assert "fault injection" in internal.error and "RuntimeError" in (internal.traceback or "")
    assert internal.replayable and json.loads(internal.original_bytes())["pin_id"] == "b"
    assert letters["bad"].reason is Reason.NOT_AN_IMAGE
    assert rep.received == len(batch) and rep.written == 2 and len(rep.dead_letters) == 2


async def test_dead_letters_are_not_written_twice_when_the_dlq_fails_half_way(parts):
    from encoder.errors import DeadLetterSendError

    proc, *_, fetcher, dlq = parts

    class HalfBroken:
        def __init__(self) -> None:
            self.letters: list = []
            self.calls = 0

        async def send(self, letters):
            self.calls += 1
            if self.calls == 1:  # the first letter is acknowledged, then the broker goes away
                self.letters.append(letters[0])
                raise DeadLetterSendError("broker gone", sent=letters[:1])
            self.letters.extend(letters)

    proc.dlq = sink = HalfBroken()
    await proc.start()
    bad = [Message(f"m{i}".encode(), b"not json") for i in range(4)]
    await proc.handle(bad)
    assert sink.calls == 2
    assert sorted(dl.pin_id for dl in sink.letters) == ["m0", "m1", "m2", "m3"]


async def test_batch_retry_after_an_error_does_not_duplicate_dead_letters(parts):
    proc, *_, dlq = parts
    proc.hooks = RaiseFor("b")
    await proc.start()
    batch = [Message(b"m1", b"not json"), up("b", "/c/b.png", 1), Message(b"m2", b"{}")]
    await proc.handle(batch)
    assert sorted(dl.pin_id for dl in dlq.letters) == ["b", "m1", "m2"]


async def test_a_registered_version_that_does_not_load_is_skipped_not_fatal(caplog):
    from encoder.config import EncoderSettings
    from encoder.null import NullEncoder
    from store.registry import VersionInfo
    from streams.refresh import RegistryVersions

    base = NullEncoder()

    class Registry:
        async def written(self):
            return [VersionInfo(base.version, "live", 512, "null", "", 0, 0.0, True),
                    VersionInfo("ghost_123", "building", 512, "no-such-model", "", 0, 0.0,
                                False)]

    rv = RegistryVersions(Registry(), base, EncoderSettings(), refresh_s=0)
    for _ in range(2):  # tried once, then remembered as broken
        assert list(await rv.write_set()) == [base.version]
    assert sum("ghost_123" in r.message for r in caplog.records if r.levelname == "ERROR") == 1


async def test_writer_reports_go_out_when_they_change_and_the_newest_lands_last(parts):
    """Two batches of one version in flight at once: the report naming the version goes out
    once, the empty one after the last batch ends (before, two reports a batch)."""
    import asyncio

    proc, enc, milvus, cache, *_ = parts
    sent: list[list[list[str]]] = []
    original = cache.report_writer

    async def slow_report(name, write_set, batches, extra=None):  # type: ignore[no-untyped-def]
        sent.append([list(b) for b in batches])
        await asyncio.sleep(0)  # lets the other batch start meanwhile
        await original(name, write_set, batches, extra)

    cache.report_writer = slow_report
    await asyncio.gather(proc.process([up("a", "/c/a.png", 1)]),
                         proc.process([up("b", "/c/b.png", 1)]))
    assert sent[0] == [[enc.version]] and sent[-1] == [], sent
    assert len(sent) < 4, sent
    assert cache.writer_reports[proc.worker_name]["batches"] == []
    await proc.process([up("a", "/c/a.png", 2)])  # the state changed since: sent again
    assert sent[-2:] == [[[enc.version]], []]


async def test_a_dead_letter_keeps_the_message_as_sent_byte_for_byte(parts):
    """A parsed event's letter holds its message value as it came (spacing, key order),
    with the size and sha256 of those bytes, not of a re-serialised event."""
    import hashlib

    proc, *_, dlq = parts
    sent = (b'{ "pin_id": "m",  "op": "upsert", "version": 1,\n "image": "/c/missing.png", '
            b'"event_time": 100.0 }')
    await proc.process([Message(b"m", sent)])
    letter = dlq.letters[0]
    assert letter.original_bytes() == sent
    assert letter.original_size == len(sent)
    assert letter.original_sha256 == hashlib.sha256(sent).hexdigest()


async def test_an_idle_worker_reports_at_every_refresh(parts):
    """No batches: the periodic write-set refresh still sends the writer report, so
    `status` tells an idle worker from one that stopped (its report aged 70-140 s)."""
    proc, *_, cache, _fetcher, _dlq = parts
    proc.report_extra = lambda: {"partitions": [3], "pid": 42}
    await proc.refresh_write_set()
    first = cache.writer_reports[proc.worker_name]
    assert first["partitions"] == [3] and first["pid"] == 42
    await proc.refresh_write_set()
    assert cache.writer_reports[proc.worker_name]["at"] >= first["at"]
    assert cache.writer_reports[proc.worker_name] is not first  # sent again, not skipped
