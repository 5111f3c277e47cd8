"""``pinfresh bench soak``: the embedded broker's disk log under a long stream.

On a fresh private stack (the launcher the CLI uses) with the disk log and a
short retention, ``events`` pin events go through in ten equal slices. Each
slice is published through the product's publisher (acks=all), then drained
by one consumer group that stays in the group all along and commits after
every fetch (aiokafka, the worker's client). After each slice: the broker's
resident memory (the wrapper and Tansu, from ``/proc``), the log's bytes and
batch objects on disk.

What holds if the log is bounded and stays cheap (issue "the broker's log"):
publish and drain rates of the last slice within 0.8 of the first, the
broker's memory flat, and the disk flat once the retention window is full.
Retention is checked every 30 s by the wrapper; with the default 60 s window
the disk should stop growing after about a third of a million-event run.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from streams.bench.broker import drain
from streams.bench.cpu import children
from streams.bench.report import emit, machine
from streams.bench.runs import private_stack
from streams.events import PinEvent
from streams.producer import ensure_topics, publish_events
from streams.runtime.stack import EmbeddedStack
from streams.settings import Settings

SLICES = 10


def _broker_pid(s: Settings) -> int:
    info = EmbeddedStack(s.stack).read()
    if info is None:
        raise RuntimeError("the soak's stack is gone")
    return info.kafka.pid


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children, MiB."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def log_on_disk(kafka_dir: Path) -> tuple[float, int]:
    """(MiB, batch objects) of the broker's log under ``kafka_dir``."""
    size = 0
    objects = 0
    for f in kafka_dir.rglob("*"):
        try:
            if f.is_file():
                size += f.stat().st_size
                objects += f.suffix == ".batch"
        except OSError:  # removed by retention meanwhile
            continue
    return size / 2**20, objects


async def _soak(s: Settings, kafka_dir: Path, events: int,
                console: Console) -> list[dict[str, Any]]:
    from aiokafka import AIOKafkaConsumer

    from streams.kafka import aiokafka_kwargs

    await ensure_topics(s.kafka)
    consumer = AIOKafkaConsumer(s.kafka.topic, group_id="bench-soak", enable_auto_commit=False,
                                auto_offset_reset="earliest", **aiokafka_kwargs(s.kafka))
    await consumer.start()
    broker_pid = _broker_pid(s)
    # in the group before the first slice (its join is not the first slice's drain time)
    deadline = time.monotonic() + 120
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise RuntimeError("the soak's consumer got no partitions in 120 s")
        await consumer.getmany(timeout_ms=200)
    rows: list[dict[str, Any]] = []
    per = events // SLICES
    t_start = time.monotonic()
    try:
        for n in range(SLICES):
            first = n * per
            t = time.perf_counter()
            await publish_events(s.kafka, (PinEvent.upsert(f"soak{i}", f"/soak/{i}.png", 1)
                                           for i in range(first, first + per)),
                                 total=per, progress=False)
            publish = per / (time.perf_counter() - t)
            t = time.perf_counter()
            await drain(consumer, per, 600, max_records=5000)
            drained = per / (time.perf_counter() - t)
            if _broker_pid(s) != broker_pid:  # its memory would be a new process's
                raise RuntimeError(f"the broker was restarted during slice {n + 1}")
            mb, objects = log_on_disk(kafka_dir)
            row = {"slice": n + 1, "events_so_far": first + per,
                   "at_s": round(time.monotonic() - t_start, 1),
                   "publish_events_per_s": round(publish, 1),
                   "drain_events_per_s": round(drained, 1),
                   "broker_rss_mb": round(rss_mb(broker_pid), 1),
                   "log_mb": round(mb, 1), "log_objects": objects}
            rows.append(row)
            console.print(f"slice {n + 1}/{SLICES}: {row}")
    finally:
        await consumer.stop()
    return rows


def run_soak(settings: Settings, events: int, retention_s: float, fsync: bool, out: Path,
             console: Console) -> dict[str, Any]:
    """Run the soak (see the module docstring) and report it."""
    if events < SLICES:
        raise ValueError(f"--events must be at least {SLICES}")
    events -= events % SLICES  # ten equal slices
    with private_stack(settings, Path("."), kafka_log="disk", kafka_fsync=fsync,
                       kafka_retention_hours=retention_s / 3600) as (s, tmp):
        rows = asyncio.run(_soak(s, tmp / "kafka", events, console))
    first, last = rows[0], rows[-1]
    # the window is full once the run is past the retention time plus one check (30 s);
    # a run too short for that has no "once full" figure
    full = [r for r in rows if r["at_s"] >= retention_s + 30]
    report: dict[str, Any] = {
        "events": events, "slices": SLICES, "retention_s": retention_s, "fsync": fsync,
        "rows": rows,
        "publish_last_over_first": round(last["publish_events_per_s"]
                                         / first["publish_events_per_s"], 2),
        "drain_last_over_first": round(last["drain_events_per_s"]
                                       / first["drain_events_per_s"], 2),
        "broker_rss_mb_first_last_max": [first["broker_rss_mb"], last["broker_rss_mb"],
                                         max(r["broker_rss_mb"] for r in rows)],
        "log_mb_once_full_min_max": ([min(r["log_mb"] for r in full),
                                      max(r["log_mb"] for r in full)] if full else None),
        "log_objects_last": last["log_objects"],
        "broker": "Tansu 0.6 over streams.runtime.objectstore (disk log), one broker",
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    table: list[tuple[str, object]] = [
        (f"slice {r['slice']} (at {r['at_s']:.0f} s)",
         f"publish {r['publish_events_per_s']:,.0f}/s, drain {r['drain_events_per_s']:,.0f}/s, "
         f"RSS {r['broker_rss_mb']:.0f} MiB, log {r['log_mb']:.1f} MiB in "
         f"{r['log_objects']:,} objects") for r in rows]
    table += [("publish, last slice / first", report["publish_last_over_first"]),
              ("drain, last slice / first", report["drain_last_over_first"]),
              ("broker RSS MiB: first, last, max", report["broker_rss_mb_first_last_max"]),
              ("log MiB once the window is full: min, max",
               report["log_mb_once_full_min_max"] or "the run ended before it was full")]
    emit(f"pinfresh bench soak ({events:,} events, retention {retention_s:.0f} s, "
         f"fsync {'on' if fsync else 'off'})", table, report, out, console)
    return report
