"""``pinfresh demo``: the sample catalog, end to end, with a summary.

Starts the embedded stack, prepares the Tux Paint catalog, starts one worker,
publishes every pin, waits until each is readable in Redis, prints pins,
throughput, freshness and one "similar pins" query, then stops the worker and
leaves the stack running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from store.lifecycle import open_stores
from store.reader import EmbeddingReader
from streams.producer import ensure_topics, publish_events
from streams.runtime.catalog import catalog_root_of, load_catalog, prepare_sample_catalog
from streams.runtime.processes import spawn_worker, stop_pid, wait_readable, wait_settled
from streams.runtime.stack import EmbeddedStack
from streams.settings import Settings

logger = logging.getLogger(__name__)


def run_demo(settings: Settings, catalog: Path | None, limit: int | None,
             console: Console) -> dict[str, float]:
    """Run the demo; returns the summary numbers."""
    stack = EmbeddedStack(settings.stack)
    info = stack.start()
    settings = settings.with_stack(info)
    console.print(f"[bold]stack up[/]: kafka {info.kafka_bootstrap}, redis {info.redis_url}, "
                  f"milvus {info.milvus_uri}")
    path = catalog or prepare_sample_catalog(settings.stack.data_dir.resolve())
    items = list(load_catalog(path, limit))
    root = catalog_root_of(path)
    settings = settings.model_copy(update={
        "fetch": settings.fetch.model_copy(update={"catalog_root": root})})
    console.print(f"[bold]catalog[/]: {len(items)} pins from {path}")
    return asyncio.run(_demo(settings, items, console))


async def _demo(settings: Settings, items: list, console: Console) -> dict[str, float]:  # type: ignore[type-arg]
    await ensure_topics(settings.kafka)
    worker = spawn_worker(settings, "demo")
    async with open_stores(settings) as stores:
        cache, milvus = stores.cache, stores.milvus
        try:
            console.print(f"worker started (pid {worker.pid}); loading the encoder ...")
            # one warm-up pin: the worker has loaded its model and joined the group once
            # it is readable
            warm = items[0]
            await publish_events(settings.kafka, [warm.event(version=1)], progress=False)
            got = await wait_readable(cache, [warm.pin_id], 180)
            if not got:
                raise RuntimeError(
                    f"worker not ready after 180s: see {settings.stack.data_dir}/logs")
            t0 = time.time()
            # version 2: every pin (the warm-up one too) is new work for the worker
            sent = await publish_events(settings.kafka, (it.event(version=2) for it in items),
                                        total=len(items))
            ids = [it.pin_id for it in items]
            meta, letters = await wait_settled(cache, settings.kafka, ids, 900, min_pin_version=2,
                                               progress=True)
            missing = len(ids) - len(meta) - len(letters)
            written = np.array([float(m["written_at"]) for m in meta.values()])
            fresh = np.array([float(m["written_at"]) - float(m["event_time"])
                              for m in meta.values()])
            elapsed = float(written.max() - t0) if len(written) else float("nan")
            summary = {
                "pins_published": float(sent), "pins_readable": float(len(meta)),
                "pins_dead_lettered": float(len(letters)),
                "pins_missing": float(missing), "seconds": elapsed,
                "pins_per_s": len(meta) / elapsed if elapsed > 0 else float("nan"),
                "freshness_p50_s": float(np.percentile(fresh, 50)) if len(fresh) else float("nan"),
                "freshness_p99_s": float(np.percentile(fresh, 99)) if len(fresh) else float("nan"),
            }
            table = Table(title="pinfresh demo")
            table.add_column("metric")
            table.add_column("value", justify="right")
            for k, v in summary.items():
                table.add_row(k, f"{v:.3f}" if not float(v).is_integer() else f"{int(v)}")
            console.print(table)
            for pid, dl in sorted(letters.items()):
                console.print(f"dead letter: {pid}: {dl.reason.value}: {dl.error}")

            reader = EmbeddingReader(milvus, cache)
            probe = next((it for it in items if "frog" in it.pin_id), items[0])
            version, hits = await reader.similar(pin_id=probe.pin_id, k=5)
            sim = Table(title=f"similar to {probe.pin_id}: {probe.caption!r} (version {version})")
            sim.add_column("score", justify="right")
            sim.add_column("pin")
            sim.add_column("caption")
            for h in hits:
                sim.add_row(f"{h.score:.3f}", h.pin_id, h.caption)
            console.print(sim)
            return summary
        finally:
            stop_pid(worker.pid)
            console.print("worker stopped; the stack is still running: `pinfresh down` stops it "
                          "(its data, the broker's log included, stays under the data dir).")
