"""``pinfresh bench pipeline``: the bare encoder vs the whole pipeline, one run, one machine.

Measured in one process tree, in this order:

1. the bare encoder: `ImageEncoder.encode_images` (decode + forward + finish)
   over the sample catalog's images held in memory, median of 3 runs; plus
   forward-only and decode-only rates as ceilings;
2. the pipeline's capacity: a private embedded stack (free ports, temporary
   data dir) and one ``pinfresh worker`` process; a backlog of pins is
   published at once and the rate is pins readable in Redis over the time from
   the first send to the last Redis write;
3. freshness: new pins published at half that capacity, each stamped with its
   send time; freshness = Redis write time - event time, p50/p99;
4. the worker's peak RSS (``VmHWM``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from encoder.engine import ImageEncoder
from store.lifecycle import open_stores
from store.redis import RedisCache
from streams.bench.report import emit, machine, percentile
from streams.producer import ensure_topics, publish_events
from streams.runtime.catalog import (
    CatalogItem,
    catalog_root_of,
    load_catalog,
    prepare_sample_catalog,
)
from streams.runtime.processes import spawn_worker, stop_pid, wait_readable, wait_settled
from streams.runtime.stack import EmbeddedStack, StackSettings
from streams.settings import Settings

__all__ = ["emit", "machine", "private_stack", "run_pipeline_bench", "run_read_bench",
           "run_refresh_bench"]


@contextlib.contextmanager
def private_stack(settings: Settings, catalog_root: Path, redis_cluster: int = 0,
                  kafka_log: str | None = None, kafka_fsync: bool = True,
                  **stack_fields: Any) -> Iterator[tuple[Settings, Path]]:
    """A throw-away embedded stack on free ports; yields settings pointed at it and its dir.

    ``redis_cluster``: Valkey as a cluster of that many masters (0: one node);
    ``kafka_log``: the broker's log engine (default: ``settings``'); ``kafka_fsync``:
    whether the disk log syncs each write; ``stack_fields``: other `StackSettings` fields
    (the disk log's retention, for instance).
    """
    with tempfile.TemporaryDirectory(prefix="pinfresh-bench-") as tmp:
        stack = EmbeddedStack(StackSettings(data_dir=Path(tmp), kafka_port=0, redis_port=0,
                                            milvus_port=0, redis_cluster=redis_cluster,
                                            milvus=settings.stack.milvus,
                                            kafka_log=kafka_log or settings.stack.kafka_log,
                                            kafka_fsync=kafka_fsync, **stack_fields))
        info = stack.start()
        try:
            yield settings.with_stack(info).model_copy(update={
                "fetch": settings.fetch.model_copy(update={"catalog_root": catalog_root}),
                "stack": settings.stack.model_copy(update={"data_dir": Path(tmp)}),
            }), Path(tmp)
        finally:
            stack.stop()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rate(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def run_pipeline_bench(settings: Settings, pins: int, fresh_pins: int, out: Path,
                       console: Console) -> dict[str, object]:
    """Run the benchmark, print the table, write JSON to ``out``; returns the JSON object."""
    data_dir = settings.stack.data_dir.resolve()
    path = prepare_sample_catalog(data_dir)
    base_items = list(load_catalog(path))
    images = {it.pin_id: Path(it.image).read_bytes() for it in base_items}

    # 1. bare encoder, in this process, on images held in memory
    enc = ImageEncoder.load(settings.encoder)
    first = enc.encode_images(list(images.values()))
    usable = [it for it, r in zip(base_items, first, strict=True) if isinstance(r, np.ndarray)]
    cap_items = [replace(usable[i % len(usable)], pin_id=f"cap-{i}") for i in range(pins)]
    fresh_items = [replace(usable[i % len(usable)], pin_id=f"fresh-{i}")
                   for i in range(fresh_pins)]
    sample = [images[it.pin_id] for it in usable][:pins]
    bare = statistics.median(_rate(len(sample), lambda: enc.encode_images(sample))
                             for _ in range(3))
    prepared = [enc.prepare(b) for b in sample]
    bs = enc.batch_size
    batches = [np.stack(prepared[i:i + bs]) for i in range(0, len(prepared), bs)]
    forward = statistics.median(
        _rate(len(prepared), lambda: [enc.forward(b) for b in batches]) for _ in range(3))
    decode = statistics.median(
        _rate(len(sample), lambda: [enc.prepare_batch(sample[i:i + bs])
                                    for i in range(0, len(sample), bs)]) for _ in range(3))
    model_version = enc.version
    enc_batch = enc.batch_size
    enc.close()
    console.print(f"bare encoder: {bare:.1f} img/s (forward only {forward:.1f}, "
                  f"decode only {decode:.1f})")

    # 2-4. the pipeline on a private stack
    with private_stack(settings, catalog_root_of(path)) as (s, _):
        s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"topic": "bench"})})
        result = asyncio.run(_pipeline(s, usable[0], cap_items, fresh_items, console))

    report: dict[str, object] = {
        "encoder_images_per_s": round(bare, 2),
        "encoder_forward_only_images_per_s": round(forward, 2),
        "decode_only_images_per_s": round(decode, 2),
        **result,
        "pipeline_vs_encoder": round(float(result["pipeline_pins_per_s"]) / bare, 3),  # type: ignore[arg-type]
        "model_version": model_version,
        "encoder_batch_size": enc_batch,
        "worker_batch_size": settings.worker.batch_size,
        "worker_batch_wait_s": settings.worker.batch_wait_s,
        "images": "Tux Paint stamps (PNG, mostly transparent), read from local disk",
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows: list[tuple[str, object]] = [
        ("bare encoder (decode+forward+finish), img/s", report["encoder_images_per_s"]),
        ("  forward only (ceiling), img/s", report["encoder_forward_only_images_per_s"]),
        ("  decode only (ceiling), img/s", report["decode_only_images_per_s"]),
        ("pipeline, publish -> readable in Redis, pins/s", report["pipeline_pins_per_s"]),
        ("pipeline / bare encoder", report["pipeline_vs_encoder"]),
        (f"freshness p50 at {report['fresh_rate_per_s']} pins/s, s", report["freshness_p50_s"]),
        ("freshness p99, s", report["freshness_p99_s"]),
        ("worker peak RSS, MB", report["worker_peak_rss_mb"]),
    ]
    emit("pinfresh bench pipeline (one run, this machine)", rows, report, out, console)
    return report


async def _pipeline(s: Settings, warm: CatalogItem, cap_items: list[CatalogItem],
                    fresh_items: list[CatalogItem], console: Console) -> dict[str, object]:
    await ensure_topics(s.kafka)
    worker = spawn_worker(s, "bench")
    cache = RedisCache(s.redis)
    try:
        await publish_events(s.kafka, [replace(warm, pin_id="warmup").event(1)], progress=False)
        if not await wait_readable(cache, ["warmup"], 180):
            raise RuntimeError("bench worker did not start: see the worker log")
        console.print(f"capacity: backlog of {len(cap_items)} pins")
        t0 = time.time()
        await publish_events(s.kafka, (it.event(1) for it in cap_items), total=len(cap_items))
        meta, letters = await wait_settled(cache, s.kafka, [it.pin_id for it in cap_items], 900)
        last = max(float(m["written_at"]) for m in meta.values())
        capacity = len(meta) / (last - t0)

        rate = round(capacity / 2, 2)
        console.print(f"freshness: {len(fresh_items)} pins at {rate} pins/s")
        await publish_events(s.kafka, (it.event(1) for it in fresh_items), rate=rate,
                             total=len(fresh_items))
        fmeta, fletters = await wait_settled(cache, s.kafka, [it.pin_id for it in fresh_items],
                                             900)
        fresh = np.array([float(m["written_at"]) - float(m["event_time"])
                          for m in fmeta.values()])
        rss = _peak_rss_mb(worker.pid)
    finally:
        stop_pid(worker.pid)
        await cache.close()
    return {
        "pipeline_pins": len(meta),
        "pipeline_seconds": round(last - t0, 3),
        "pipeline_pins_per_s": round(capacity, 2),
        "fresh_rate_per_s": rate,
        "fresh_pins": len(fmeta),
        "freshness_p50_s": round(float(np.percentile(fresh, 50)), 3),
        "freshness_p99_s": round(float(np.percentile(fresh, 99)), 3),
        "freshness_max_s": round(float(fresh.max()), 3),
        "dead_letters": len(letters) + len(fletters),
        "worker_peak_rss_mb": round(rss, 1),
    }


def run_refresh_bench(settings: Settings, pins: int, rate: float, out: Path,
                      console: Console) -> dict[str, object]:
    """Backfill throughput, and live freshness with and without a backfill running.

    One private embedded stack, one worker. The catalog's first ``pins`` pins
    are encoded by the default model (live); a second version (same towers,
    projection seed 1) is registered, so the worker dual-writes from then on.
    Live pins are published at ``rate`` pins/s twice: once with nothing else
    running (idle), once while ``pinfresh backfill`` fills the new version.
    """
    data_dir = settings.stack.data_dir.resolve()
    path = prepare_sample_catalog(data_dir)
    items = [it for it in load_catalog(path) if "party-horn-out" not in it.pin_id]
    base = items[:pins]
    live_a = [replace(items[i % len(items)], pin_id=f"live-idle-{i}") for i in range(100)]
    live_b = [replace(items[i % len(items)], pin_id=f"live-during-{i}") for i in range(2000)]
    with private_stack(settings, catalog_root_of(path)) as (s, _):
        result = asyncio.run(_refresh(s, base, live_a, live_b, rate, console))
    report: dict[str, object] = {
        **result, "catalog_pins": len(base), "live_rate_per_s": rate,
        "images": "Tux Paint stamps (PNG) from local disk",
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    keys = ("backfill_pins_per_s", "backfill_seconds", "backfill_yielded_s",
            "freshness_p50_s_idle", "freshness_p99_s_idle",
            "freshness_p50_s_during_backfill", "freshness_p99_s_during_backfill")
    emit("pinfresh bench refresh (one run, this machine)", [(k, report[k]) for k in keys],
         report, out, console)
    return report


async def _refresh(s: Settings, base: list[CatalogItem], live_a: list[CatalogItem],
                   live_b: list[CatalogItem], rate: float, console: Console
                   ) -> dict[str, object]:
    from encoder.config import EncoderSettings
    from store.registry import VersionRegistry
    from streams.refresh import run_backfill

    await ensure_topics(s.kafka)
    worker = spawn_worker(s, "bench-refresh")
    async with open_stores(s) as stores:
        cache, milvus = stores.cache, stores.milvus
        try:
            console.print(f"encoding the catalog ({len(base)} pins) into the live version")
            await publish_events(s.kafka, (it.event(1) for it in base), total=len(base))
            await wait_settled(cache, s.kafka, [it.pin_id for it in base], 900)
            enc_b = ImageEncoder.load(EncoderSettings(seed=1))
            vb = enc_b.version
            enc_b.close()
            await VersionRegistry(milvus, cache).register(vb, 512, "pinfresh-effl0-minilm", None, 1)
            await asyncio.sleep(4)  # the worker picks up the new version (dual writes)

            async def live_traffic(items: list[CatalogItem],
                                   until: asyncio.Task | None) -> list[float]:
                sent: list[str] = []
                t0 = time.monotonic()
                for i, it in enumerate(items):
                    if until is not None and until.done():
                        break
                    if until is None and i >= 100:
                        break
                    await publish_events(s.kafka, [it.event(1)], progress=False)
                    sent.append(it.pin_id)
                    ahead = t0 + (i + 1) / rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                meta = await wait_readable(cache, sent, 300)
                return [float(m["written_at"]) - float(m["event_time"]) for m in meta.values()]

            console.print(f"idle: 100 live pins at {rate}/s")
            idle = np.array(await live_traffic(live_a, None))
            console.print("backfill running, live pins at the same rate")
            task = asyncio.create_task(run_backfill(s, vb, progress=False, yield_lag=20))
            during = np.array(await live_traffic(live_b, task))
            rep = await task
        finally:
            stop_pid(worker.pid)
    return {
        "backfill_pins_per_s": round(rep.pins_per_s, 2),
        "backfill_pins": rep.pins, "backfill_encoded": rep.encoded,
        "backfill_seconds": round(rep.seconds, 2),
        "backfill_yielded_s": round(rep.yielded_s, 2),
        "freshness_p50_s_idle": round(float(np.percentile(idle, 50)), 3),
        "freshness_p99_s_idle": round(float(np.percentile(idle, 99)), 3),
        "freshness_p50_s_during_backfill": round(float(np.percentile(during, 50)), 3),
        "freshness_p99_s_during_backfill": round(float(np.percentile(during, 99)), 3),
        "live_pins_idle": len(idle), "live_pins_during_backfill": len(during),
        "dual_writes": True,
    }


def run_read_bench(settings: Settings, pins: int, requests: int, out: Path,
                   console: Console, cluster_nodes: int = 3, rate: float = 400.0
                   ) -> dict[str, object]:
    """Read 25 precomputed embeddings vs fetch+decode+encode 25 images, one run.

    A private stack is filled with real embeddings of ``pins`` catalog images;
    ``pinfresh serve`` runs as its own process. Measured, in one run:

    * the in-process reads the API's overhead is compared with, on the same
      stack and the same 25-id batches: `RedisCache.get_vectors` (the version
      known: one MGET, the floor) and `EmbeddingReader.get_many` (the live
      version resolved, as the API does);
    * the Python client calling the API on loopback, one request at a time,
      in each response format (binary, the client's default, and base64);
    * the same encoder reading the 25 image files and encoding them at
      request time;
    * a separate load-generating process (aiohttp, 16 connections): paced at
      ``rate`` requests/s in each format, latency counted from each request's
      scheduled time; then unpaced (the throughput ceiling);
    * all the reads again against a second private stack whose Valkey is a
      cluster of ``cluster_nodes`` masters, with the same vectors.
    """
    import random

    path = prepare_sample_catalog(settings.stack.data_dir.resolve())
    items = [it for it in load_catalog(path) if "party-horn-out" not in it.pin_id][:pins]
    enc = ImageEncoder.load(settings.encoder)
    rnd = random.Random(0)
    batches = [[it.pin_id for it in rnd.sample(items, 25)] for _ in range(requests)]
    single: dict[str, Any] = {}
    cluster: dict[str, Any] = {}
    try:
        for where, n in ((single, 0), (cluster, cluster_nodes)):
            if n:
                console.print(f"again on a {n}-master Valkey Cluster")
            with private_stack(settings, catalog_root_of(path), redis_cluster=n) as (s, tmp):
                asyncio.run(_fill(s, enc, items))
                with _api(s, items[0].pin_id) as url:
                    for fmt in ("binary", "base64"):
                        where[f"api_{fmt}"] = _api_reads(url, fmt, batches)
                    ids_file = Path(tmp) / "ids.txt"
                    ids_file.write_text("\n".join(it.pin_id for it in items))
                    for fmt in ("binary", "base64"):
                        where[f"load_{fmt}"] = _loadgen(url, ids_file, rate, fmt)
                    where["load_max"] = _loadgen(url, ids_file, 0, "binary")
                where["get_vectors"], where["get_many"] = asyncio.run(_cache_reads(s, batches))
            if not n:
                by_id = {it.pin_id: it for it in items}
                encode_ms = []
                for ids in batches[:max(10, requests // 25)]:
                    t = time.perf_counter()
                    enc.encode_images([Path(by_id[p].image).read_bytes() for p in ids])
                    encode_ms.append((time.perf_counter() - t) * 1000)
    finally:
        enc.close()

    def p(xs: list[float], q: float, nd: int = 3) -> float:
        return round(percentile(xs, q), nd)

    e50 = percentile(encode_ms, 0.5)
    read_ms = single["api_binary"]
    report: dict[str, object] = {
        "read_p50_ms": p(read_ms, 0.5), "read_p99_ms": p(read_ms, 0.99),
        "read_base64_p50_ms": p(single["api_base64"], 0.5),
        "read_base64_p99_ms": p(single["api_base64"], 0.99),
        "encode_p50_ms": p(encode_ms, 0.5, 1), "encode_p99_ms": p(encode_ms, 0.99, 1),
        "ratio_p50": round(e50 / percentile(read_ms, 0.5), 1),
        "cache_read_p50_ms": p(single["get_vectors"], 0.5),
        "cache_read_p99_ms": p(single["get_vectors"], 0.99),
        "reader_read_p50_ms": p(single["get_many"], 0.5),
        "reader_read_p99_ms": p(single["get_many"], 0.99),
        "api_over_cache_read_p50": round(percentile(read_ms, 0.5)
                                         / percentile(single["get_vectors"], 0.5), 2),
        "api_over_reader_read_p50": round(percentile(read_ms, 0.5)
                                          / percentile(single["get_many"], 0.5), 2),
        "load_rate": rate, "load": {k: single[k] for k in ("load_binary", "load_base64",
                                                          "load_max")},
        "api_requests_per_s": single["load_binary"]["requests_per_s"],
        "api_p50_ms": single["load_binary"]["p50_ms"],
        "api_p99_ms": single["load_binary"]["p99_ms"],
        "api_errors": single["load_binary"]["errors"],
        "api_concurrency": single["load_binary"]["concurrency"],
        "api_max_requests_per_s": single["load_max"]["requests_per_s"],
        "pins_per_request": 25,
        "cluster_nodes": cluster_nodes,
        "cluster_read_p50_ms": p(cluster["api_binary"], 0.5),
        "cluster_read_p99_ms": p(cluster["api_binary"], 0.99),
        "cluster_cache_read_p50_ms": p(cluster["get_vectors"], 0.5),
        "cluster_cache_read_p99_ms": p(cluster["get_vectors"], 0.99),
        "cluster_reader_read_p50_ms": p(cluster["get_many"], 0.5),
        "cluster_reader_read_p99_ms": p(cluster["get_many"], 0.99),
        "cluster_load": {k: cluster[k] for k in ("load_binary", "load_base64", "load_max")},
        "read_requests": len(read_ms), "encode_requests": len(encode_ms),
        "read_path": "PinfreshClient (urllib3) -> HTTP on loopback -> uvicorn (uvloop, "
                     "httptools) -> one MGET of the live pointer and 25 vectors; float16, "
                     "binary body",
        "cache_read_path": "RedisCache.get_vectors in-process, version known: one MGET "
                           "(single node); one MGET per slot, one pipeline per node, nodes "
                           "at once (cluster)",
        "reader_read_path": "EmbeddingReader.get_many in-process, live version resolved as "
                            "the API does: one MGET with the pointer (single node); GET, "
                            "then the MGETs (cluster)",
        "load_path": "streams.bench.loadgen: its own process, aiohttp, 16 connections, "
                     "paced (open loop, latency from the scheduled send) or unpaced",
        "encode_path": "read 25 image files + PIL decode + EfficientNet-Lite0 tower on CPU",
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    def pair(xs: list[float]) -> str:
        return f"{p(xs, 0.5)}/{p(xs, 0.99)}"

    def load(r: dict[str, Any]) -> str:
        return f"{r['requests_per_s']}/s: {r['p50_ms']}/{r['p99_ms']} ({r['errors']} errors)"

    rows: list[tuple[str, object]] = [
        ("25 vectors, p50/p99 ms", f"single node | {cluster_nodes}-master cluster"),
        ("  RedisCache.get_vectors (version known)",
         f"{pair(single['get_vectors'])} | {pair(cluster['get_vectors'])}"),
        ("  EmbeddingReader.get_many (live resolved)",
         f"{pair(single['get_many'])} | {pair(cluster['get_many'])}"),
        ("  API, client, binary (default)",
         f"{pair(single['api_binary'])} | {pair(cluster['api_binary'])}"),
        ("  API, client, base64", f"{pair(single['api_base64'])} | {pair(cluster['api_base64'])}"),
        ("  encode at request time", pair(encode_ms)),
        (f"load, 16 conns, paced {rate:.0f}/s, binary",
         f"{load(single['load_binary'])} | {load(cluster['load_binary'])}"),
        (f"load, 16 conns, paced {rate:.0f}/s, base64",
         f"{load(single['load_base64'])} | {load(cluster['load_base64'])}"),
        ("load, 16 conns, unpaced, binary",
         f"{load(single['load_max'])} | {load(cluster['load_max'])}"),
        ("API p50 / in-process p50", f"{report['api_over_cache_read_p50']}x get_vectors, "
                                     f"{report['api_over_reader_read_p50']}x get_many"),
        ("encode p50 / API read p50", report["ratio_p50"]),
    ]
    emit("read precomputed vs encode at request time (25 pins, one run)", rows, report, out,
         console)
    return report


@contextlib.contextmanager
def _api(s: Settings, probe: str) -> Iterator[str]:
    """``pinfresh serve`` as its own process on a free port; yields its URL.

    Ready once reading the pin ``probe`` succeeds.
    """
    import subprocess
    import sys

    from store.client import ApiClientError, PinfreshClient
    from streams.runtime.stack import free_port

    port = free_port()
    env = {**s.child_environ(os.environ), "PINFRESH_API__PORT": str(port)}
    server = subprocess.Popen([sys.executable, "-m", "streams.cli", "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while server.poll() is None:  # listening (no client retries logged meanwhile)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("pinfresh serve did not listen within 60 s")
            time.sleep(0.2)
        if server.poll() is not None:
            raise RuntimeError(f"pinfresh serve exited with {server.returncode}")
        with PinfreshClient(url, timeout=30) as client:
            while True:  # 503 until the API has connected to the stores
                try:
                    client.get_embeddings([probe])
                    break
                except ApiClientError as exc:
                    if exc.status != 503 or time.monotonic() > deadline \
                            or server.poll() is not None:
                        raise
                    time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def _api_reads(url: str, encoding: str, batches: list[list[str]]) -> list[float]:
    from store.client import PinfreshClient

    out = []
    with PinfreshClient(url, encoding=encoding) as client:  # type: ignore[arg-type]
        for ids in batches[:50]:  # warm: connection, caches
            client.get_embeddings(ids)
        for ids in batches:
            t = time.perf_counter()
            emb = client.get_embeddings(ids)
            out.append((time.perf_counter() - t) * 1000)
            if not emb.found.all():
                raise RuntimeError(f"pins missing from the read: {ids}")
    return out


async def _cache_reads(s: Settings, batches: list[list[str]]
                       ) -> tuple[list[float], list[float]]:
    """``(RedisCache.get_vectors, EmbeddingReader.get_many)`` latencies in ms."""
    floor, reader = [], []
    async with open_stores(s) as stores:
        version = await stores.reader.resolve_version()
        for ids in batches[:50]:  # connect, learn the slots
            await stores.cache.get_vectors(version, ids)
            await stores.reader.get_many(ids)
        for ids in batches:
            t = time.perf_counter()
            _, found = await stores.cache.get_vectors(version, ids)
            floor.append((time.perf_counter() - t) * 1000)
            if not found.all():
                raise RuntimeError(f"pins missing from the cache: {ids}")
            t = time.perf_counter()
            res = await stores.reader.get_many(ids)
            reader.append((time.perf_counter() - t) * 1000)
            if res.from_cache != len(ids):
                raise RuntimeError(f"pins missing from the cache: {ids}")
    return floor, reader


def _loadgen(url: str, ids_file: Path, rate: float, encoding: str) -> dict[str, Any]:
    import subprocess
    import sys

    load = subprocess.run([sys.executable, "-m", "streams.bench.loadgen", url, str(ids_file),
                           "--concurrency", "16", "--seconds", "10", "--rate", str(rate),
                           "--encoding", encoding],
                          capture_output=True, text=True, check=True)
    return dict(json.loads(load.stdout.strip().splitlines()[-1]))


async def _fill(s: Settings, enc: ImageEncoder, items: list[CatalogItem]) -> None:
    from store.base import EmbeddingRecord

    async with open_stores(s) as stores:
        await stores.registry.register(enc.version, enc.dim, enc.spec.name, None, 0)
        now = time.time()
        vecs = enc.encode_images([Path(it.image).read_bytes() for it in items])
        recs = [EmbeddingRecord(it.pin_id, v, enc.version, "-", 1, now, now, it.image,
                                it.caption) for it, v in zip(items, vecs, strict=True)
                if isinstance(v, np.ndarray)]
        await stores.milvus.upsert(enc.version, recs)
        await stores.cache.upsert(enc.version, recs)
