"""End to end on one host: pin events to stored vectors through feeders and one encoder process.

What `deploy/device/gpu_check.py` runs on a GPU machine (and, scaled down,
on the CPU as a dry run). On a private embedded stack:

1. **store write ceiling**: ``writers`` processes write records (a fixed
   vector, real sizes) straight into Milvus and into Redis for
   ``seconds``; rows/s of each, and the lower one, which bounds how many pins
   a second the stack can store whatever feeds it;
2. **capacity**: a backlog of ``pins`` upsert events (JPEG files on local
   disk) is published, then ``pinfresh worker --devices D --feeders N``
   starts; pins/s between 10 % and 90 % of the backlog written (the pins'
   Redis ``written_at``), GPU utilisation sampled meanwhile;
3. **freshness**: new pins published at half that rate for ``fresh_seconds``;
   p50/p99 of Redis write time minus event time.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from store.base import EmbeddingRecord
from store.milvus import MilvusStore
from store.redis import RedisCache
from streams.events import PinEvent
from streams.producer import ensure_topics, publish_events
from streams.runtime.processes import stop_group
from streams.settings import Settings


# ------------------------------------------------------------ write ceiling
def _writer(args: tuple[Settings, str, str, int, float, int]) -> int:
    """One writer process: records into one store for ``seconds``; returns rows written."""
    s, store, version, slot, seconds, batch = args

    async def go() -> int:
        vec = np.full(512, 1 / np.sqrt(512), dtype=np.float32)
        now = time.time()
        backend: Any = MilvusStore(s.milvus) if store == "milvus" else RedisCache(s.redis)
        try:
            n, k = 0, 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                recs = [EmbeddingRecord(f"w{slot}-{k}-{i}", vec, version, "h" * 64, 1, now, now,
                                        f"/data/corpus/img-{i:05d}.jpg", "a caption")
                        for i in range(batch)]
                await backend.upsert(version, recs)
                n += batch
                k += 1
            return n
        finally:
            await backend.close()

    return asyncio.run(go())


def store_write_ceiling(s: Settings, writers: int, seconds: float = 8.0,
                        batch: int = 128) -> dict[str, float]:
    """Rows/s into Milvus and into Redis from ``writers`` processes each (forked)."""
    out: dict[str, float] = {}
    ctx = multiprocessing.get_context("fork")
    # its own namespace: a version registered where the workers look would be dual-written
    s = s.model_copy(update={
        "milvus": s.milvus.model_copy(update={"collection_prefix": "ceiling"}),
        "redis": s.redis.model_copy(update={"key_prefix": "ceiling"})})
    for store in ("milvus", "redis"):
        version = f"ceiling_{store}_{int(time.time())}"
        asyncio.run(_register(s, store, version))  # once, before the writers race to it
        with ctx.Pool(writers) as pool:
            t = time.monotonic()
            rows = sum(pool.map(_writer, [(s, store, version, i, seconds, batch)
                                          for i in range(writers)]))
            out[f"{store}_rows_per_s"] = round(rows / (time.monotonic() - t), 1)
    out["store_write_ceiling_per_s"] = min(out["milvus_rows_per_s"], out["redis_rows_per_s"])
    return out


async def _register(s: Settings, store: str, version: str) -> None:
    backend: Any = MilvusStore(s.milvus) if store == "milvus" else RedisCache(s.redis)
    try:
        await backend.ensure_version(version, 512)
    finally:
        await backend.close()


# --------------------------------------------------------------- the pipeline
class _GpuUtil:
    """Mean GPU utilisation from NVML while inside (None without NVML or a GPU)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = False

    def __enter__(self) -> _GpuUtil:
        try:
            import pynvml  # type: ignore[import-not-found,import-untyped]

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML: no figure
            return self
        import threading

        def run() -> None:
            while not self._stop:
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                time.sleep(0.05)

        threading.Thread(target=run, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


async def _wait_written(cache: RedisCache, version: str, pin_ids: Sequence[str],
                        timeout: float) -> dict[str, dict[str, str]]:
    deadline = time.monotonic() + timeout
    meta: dict[str, dict[str, str]] = {}
    todo = list(pin_ids)
    while todo:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(todo)} of {len(pin_ids)} pins not written in {timeout}s")
        for i in range(0, len(todo), 2000):
            meta.update(await cache.get_meta(version, todo[i:i + 2000]))
        todo = [p for p in pin_ids if p not in meta]
        if todo:
            await asyncio.sleep(0.2)
    return meta


def run_e2e(s: Settings, images: Sequence[Path], *, device: str, feeders: int, pins: int,
            fresh_seconds: float, log: Path, version: str) -> dict[str, Any]:
    """Capacity and freshness of ``feeders`` feeders + one encoder process on ``device``.

    ``s`` points at the stack and names the model; ``version`` is the model
    version its encoder writes (the caller knows it from loading the model).
    """
    dev = "cpu" if device == "cpu" else device.removeprefix("cuda:").removeprefix("cuda") or "0"
    tag = f"e2e{int(time.time())}"
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={
        "topic": f"pins-{tag}", "dlq_topic": f"pins-{tag}.dlq", "group_id": f"g-{tag}",
        "partitions": max(8, feeders)})})
    backlog = [PinEvent.upsert(f"{tag}-{i}", str(images[i % len(images)]), 1)
               for i in range(pins)]
    fresh_ids: list[str] = []

    async def publish_backlog() -> None:
        await ensure_topics(s.kafka)
        await publish_events(s.kafka, backlog, progress=False, stamp=False)

    asyncio.run(publish_backlog())
    with open(log, "ab") as f:
        pool = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--devices", dev, "--feeders",
             str(feeders)], env=s.child_environ(os.environ), stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        async def capacity() -> float:
            cache = RedisCache(s.redis)
            try:
                meta = await _wait_written(cache, version, [e.pin_id for e in backlog], 900)
            finally:
                await cache.close()
            written = sorted(float(m["written_at"]) for m in meta.values())
            t0, t1 = written[len(written) // 10], written[len(written) * 9 // 10]
            return 0.8 * len(written) / (t1 - t0)

        with _GpuUtil() as util:
            rate = asyncio.run(capacity())

        async def freshness() -> list[float]:
            half = rate / 2
            n = max(50, int(half * fresh_seconds))
            events = [PinEvent.upsert(f"{tag}-fresh-{i}", str(images[i % len(images)]), 1)
                      for i in range(n)]
            fresh_ids.extend(e.pin_id for e in events)
            await publish_events(s.kafka, events, rate=half, progress=False, stamp=True)
            cache = RedisCache(s.redis)
            try:
                meta = await _wait_written(cache, version, fresh_ids, 600)
            finally:
                await cache.close()
            return [float(m["written_at"]) - float(m["event_time"]) for m in meta.values()]

        fresh = np.array(asyncio.run(freshness()))
    finally:
        stop_group(pool, 120)
    return {
        "e2e_pins_per_s": round(rate, 1),
        "e2e_gpu_util_mean_pct": util.mean,
        "e2e_freshness_rate_per_s": round(rate / 2, 1),
        "e2e_freshness_pins": len(fresh),
        "e2e_freshness_p50_s": round(float(np.percentile(fresh, 50)), 3),
        "e2e_freshness_p99_s": round(float(np.percentile(fresh, 99)), 3),
        "e2e_pins": pins,
        "e2e_feeders": feeders,
        "e2e_distinct_images": len(images),
    }
