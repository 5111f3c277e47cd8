"""``pinfresh bench volume``: a catalog of many distinct pins through the real pipeline.

What grows with the catalog, measured on a private embedded stack (the
launcher the CLI uses) with the null encoder (`encoder.null`), so the run
measures the stream and the stores, not a model:

1. ``pins`` distinct pins are published (small PNG thumbnails of the sample
   stamps, each file made distinct by a trailer after its IEND chunk, read
   from local files), then ``pinfresh worker --devices cpu --feeders N``
   drains them: pins/s per tenth of the run, to see whether the rate holds
   or decays as the stores fill;
2. Redis memory per pin and version (``INFO memory`` before and after), the
   Milvus server's resident memory and its data on disk;
3. ``similar`` through `EmbeddingReader` (as the read API runs it) on
   ``queries`` pins after the collection is sealed and indexed: p50/p99, and
   recall@10 against an exact search over every stored vector (recomputed
   from the image bytes, so exact); then the same queries again while
   another process publishes new versions of existing pins (new images) at
   ``stream_rate`` pins/s into the version searched, recall counted over the
   queries whose true neighbours are the same before and after the updates;
4. ``store verify`` of the whole version;
5. a backfill of every pin into a second version (the null encoder with
   another seed) while live pins arrive at ``live_rate``/s: backfill pins/s,
   and the live pins' freshness (event time to Redis write) meanwhile.

The null encoder's vectors have full rank and 16 intrinsic dimensions (see
`encoder.null`), so recall measures the index on neighbours that exist;
`pinfresh bench similar` measures it on clustered vectors. The Milvus engine
is whatever the stack runs (``PINFRESH_STACK__MILVUS``); the report names it (``milvus_engine``).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import Progress

from encoder.null import LATENT_DIM, NullEncoder, null_vector
from store.lifecycle import open_stores
from store.verify import verify_cache
from streams.bench.report import emit, machine, percentile
from streams.events import PinEvent
from streams.producer import ensure_topics, publish_events
from streams.refresh import run_backfill
from streams.runtime.catalog import load_catalog, prepare_sample_catalog
from streams.runtime.processes import stop_group
from streams.settings import KafkaSettings, Settings

LIVE = NullEncoder().version
BACKFILL_SEED = 1


def null_drain_setup(settings: Settings) -> tuple[list[Path], Settings]:
    """The sample catalog's stamp images, and ``settings`` for null-encoder drain runs.

    No metrics port, quiet logs: what the drain benchmarks' workers run with.
    """
    stamps = [Path(it.image) for it in load_catalog(prepare_sample_catalog(
        settings.stack.data_dir.resolve()))]
    return stamps, settings.model_copy(update={
        "encoder": settings.encoder.model_copy(update={"model": "null"}),
        "worker": settings.worker.model_copy(update={"metrics_port": 0}),
        "log_level": "WARNING"})


def image_path(root: Path, i: int) -> Path:
    """Where `make_images` puts image ``i``."""
    return root / f"{i // 1000:04d}" / f"{i}.png"


def make_images(root: Path, stamps: list[Path], n: int, side: int = 48) -> list[Path]:
    """``n`` distinct small PNGs under ``root`` (thumbnails of ``stamps``, unique trailers)."""
    thumbs = []
    for p in stamps:
        with Image.open(p) as src:
            im = src.convert("RGBA")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, "PNG", optimize=True)
            thumbs.append(buf.getvalue())
    paths = []
    for i in range(n):
        path = image_path(root, i)
        if i % 1000 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        # bytes after IEND are ignored by decoders; they make every file's hash distinct
        path.write_bytes(thumbs[i % len(thumbs)] + b"pinfresh" + i.to_bytes(8, "little"))
        paths.append(path)
    return paths


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and every descendant (the server is the wrapper's child)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return total / 1024


def _du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


async def _redis_used(cache: Any) -> int:
    return await cache.used_memory()


async def drain_backlog(s: Settings, pins: int, feeders: int, logs: Path, console: Console
                        ) -> subprocess.Popen[bytes]:
    """Start null-encoder workers on a published backlog of pins ``v0``...; wait for all.

    Polls the Redis count of the null version until every pin is in; returns
    the worker process (the caller stops it).
    """
    cmd = [sys.executable, "-m", "streams.cli", "worker", "--devices", "cpu",
           "--feeders", str(feeders)]
    with open(logs / "workers.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=s.child_environ(os.environ), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    last = -1
    async with open_stores(s) as stores:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("pins written", total=pins)
            last_change = time.monotonic()
            while True:
                got = await stores.cache.count(LIVE) if await stores.cache.get_live() else 0
                if got != last:
                    last, last_change = got, time.monotonic()
                bar.update(task, completed=got)
                if got >= pins:
                    return proc
                if proc.poll() is not None or time.monotonic() - last_change > 300:
                    raise RuntimeError(f"stalled at {got} of {pins} pins (see {logs})")
                await asyncio.sleep(1.0)


async def written_times(s: Settings, pins: int) -> list[float]:
    """Every pin's Redis write time (``written_at`` in its meta), sorted."""
    out: list[float] = []
    async with open_stores(s) as stores:
        for lo in range(0, pins, 2000):
            metas = await stores.cache.get_meta(LIVE, [f"v{i}" for i in range(lo, min(pins,
                                                                                  lo + 2000))])
            out.extend(float(m["written_at"]) for m in metas.values())
    return sorted(out)


def _rates_by_tenth(written: list[float]) -> list[float]:
    """pins/s within each tenth of the pins, from their exact write times."""
    n = len(written)
    marks = [written[min(n - 1, n * k // 10)] for k in range(11)]
    return [round((n / 10) / max(1e-6, b - a), 1) for a, b in zip(marks, marks[1:],
                                                                   strict=False)]


async def _queries(s: Settings, picks: np.ndarray) -> tuple[list[float], list[set[str]]]:
    async with open_stores(s) as stores:
        reader = stores.reader
        lat, hits = [], []
        for i in picks:
            t = time.perf_counter()
            _, res = await reader.similar(pin_id=f"v{i}", k=10)
            lat.append((time.perf_counter() - t) * 1000)
            hits.append({h.pin_id for h in res})
    return lat, hits


def _recall(vecs: np.ndarray, picks: np.ndarray, hits: list[set[str]],
            skip: set[int] = frozenset(),  # type: ignore[assignment]
            after: np.ndarray | None = None) -> list[float]:
    """recall@10 of each query against an exact search.

    With updates meanwhile (the pins ``skip``, holding the vectors ``after``
    once their updates land), a query counts only if its pin was not updated
    and no updated pin is among its true neighbours before the updates or
    after them: its true neighbours are then the same whether or not an
    update had landed when it ran.
    """
    out = []
    for lo in range(0, len(picks), 100):
        batch = picks[lo:lo + 100]
        tops = [_top10(vecs, batch)] + ([_top10(after, batch)] if after is not None else [])
        for n, (i, got) in enumerate(zip(batch, hits[lo:lo + 100], strict=True)):
            near = {int(j) for top in tops for j in top[n]}
            if int(i) in skip or skip & near:
                continue
            out.append(len({f"v{j}" for j in tops[0][n]} & got) / 10)
    return out


def _top10(vecs: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """The ten nearest rows of ``vecs`` to each of ``vecs[picks]``, the row itself excluded."""
    scores = vecs[picks] @ vecs.T
    scores[np.arange(len(picks)), picks] = -np.inf
    return np.argpartition(-scores, 10, axis=1)[:, :10]


async def _similar(s: Settings, images: Path, paths: list[Path], queries: int,
                   stream_rate: float, console: Console) -> dict[str, Any]:
    async with open_stores(s) as stores:
        t = time.monotonic()
        settled = await stores.milvus.settle(LIVE, deadline_s=1800)
        settle_s = time.monotonic() - t
    rng = np.random.default_rng(0)
    picks = rng.choice(len(paths), size=min(queries, len(paths)), replace=False)
    vecs = np.stack([null_vector(p.read_bytes(), 512) for p in paths])
    lat, hits = await _queries(s, picks)
    recall = _recall(vecs, picks, hits)
    out: dict[str, Any] = {
        "similar_p50_ms": round(percentile(lat, 0.5), 1),
        "similar_p99_ms": round(percentile(lat, 0.99), 1),
        "similar_recall_at_10": round(statistics.fmean(recall), 4),
        "similar_queries": len(picks), "index_settled": settled,
        "index_settle_s": round(settle_s, 1)}
    # again while the stream writes new images for random pins into the searched version,
    # from another process (as a producer and a ranking service are): in the queries'
    # event loop the publisher's bursts delayed queries, which measured the driver
    ctx = multiprocessing.get_context("spawn")  # no fork of this process's gRPC threads
    stop, sent = ctx.Event(), ctx.RawValue("q", 0)  # one writer (the child): no lock
    pub = ctx.Process(target=_stream_updates, daemon=True, name="pinfresh-bench-stream",
                      args=(s.kafka, images, len(paths), stream_rate, stop, sent))
    loads: list[float] = []

    async def sample_load() -> None:
        while True:
            loads.append(os.getloadavg()[0])
            await asyncio.sleep(1.0)

    pub.start()
    sampler = asyncio.create_task(sample_load())
    try:
        deadline = time.monotonic() + 300
        while sent.value < stream_rate * 5:  # the writes have flowed 5 s before the first query
            if not pub.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the update stream did not start (exit code {pub.exitcode})")
            await asyncio.sleep(0.2)
        lat2, hits2 = await _queries(s, picks)
        if not pub.is_alive():
            raise RuntimeError(f"the update stream stopped during the queries "
                               f"(exit code {pub.exitcode})")
    finally:
        stop.set()
        sampler.cancel()
        await asyncio.to_thread(pub.join, 120)
        if pub.is_alive():
            pub.kill()
            await asyncio.to_thread(pub.join)
    if pub.exitcode != 0:
        raise RuntimeError(f"the update stream failed (exit code {pub.exitcode})")
    updated = list(itertools.islice(_update_ids(len(paths)), sent.value))
    new = vecs.copy()  # what the updated pins hold once their updates land
    for i in set(updated):
        new[i] = vecs[(i + 1) % len(paths)]
    recall2 = _recall(vecs, picks, hits2, skip=set(updated), after=new)
    console.print(f"similar while streaming {stream_rate:g} updates/s: "
                  f"{len(set(updated))} pins updated, recall over {len(recall2)} queries")
    out.update({
        "similar_streaming_p50_ms": round(percentile(lat2, 0.5), 1),
        "similar_streaming_p99_ms": round(percentile(lat2, 0.99), 1),
        "similar_streaming_recall_at_10": round(statistics.fmean(recall2), 4)
        if recall2 else None,
        "similar_streaming_queries": len(picks),
        "similar_streaming_recall_queries": len(recall2),
        "stream_rate_updates_per_s": stream_rate,
        "stream_updates_published": len(updated),
        "load_avg_1m_while_streaming": round(statistics.fmean(loads), 2) if loads else None})
    return out


def _update_ids(pins: int) -> Iterator[int]:
    """The pins the update stream rewrites, in order (the same sequence in both processes)."""
    rng = np.random.default_rng(1)
    while True:
        yield from (int(i) for i in rng.integers(0, pins, 1024))


def _stream_updates(kafka: KafkaSettings, images: Path, pins: int, rate: float, stop: Any,
                    sent: Any) -> None:
    """Publish new images for the pins of `_update_ids` at ``rate``/s until ``stop``.

    Runs in a child process; ``sent`` counts the events, each before it is
    handed to the producer. Pin ``i`` gets image ``i + 1`` (`image_path`
    under ``images``). Stops by itself if its parent is gone.
    """
    parent = os.getppid()

    def events() -> Iterator[PinEvent]:
        for i in _update_ids(pins):
            if stop.is_set() or os.getppid() != parent:
                return
            sent.value += 1
            yield PinEvent.upsert(f"v{i}", str(image_path(images, (i + 1) % pins)), 2)

    asyncio.run(publish_events(kafka, events(), rate=rate, progress=False))


async def _backfill_with_live(s: Settings, live_rate: float, paths: list[Path],
                              console: Console) -> dict[str, Any]:
    """Register the second version, backfill it, publish live pins meanwhile."""
    target = NullEncoder(seed=BACKFILL_SEED).version
    async with open_stores(s) as stores:
        await stores.registry.register(target, 512, "null", None, BACKFILL_SEED)
    await asyncio.sleep(2 * 3.0)  # the workers' write sets refresh every 3 s: dual writes first
    stop = asyncio.Event()
    live_ids: list[str] = []

    async def live() -> None:
        i = 0
        while not stop.is_set():
            batch = []
            for _ in range(max(1, int(live_rate))):
                pid = f"live{i}"
                batch.append(PinEvent.upsert(pid, str(paths[i % len(paths)]), 1))
                live_ids.append(pid)
                i += 1
            await publish_events(s.kafka, batch, progress=False)
            await asyncio.sleep(1.0)

    pub = asyncio.create_task(live())
    try:
        rep = await run_backfill(s, target, progress=True)
    finally:
        stop.set()
        await pub
    fresh: list[float] = []
    async with open_stores(s) as stores:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the last live pins are still on their way
            metas = await stores.cache.get_meta(LIVE, live_ids)
            if len(metas) == len(live_ids):
                break
            await asyncio.sleep(1.0)
        fresh = [float(m["written_at"]) - float(m["event_time"]) for m in metas.values()]
        target_pins = await stores.cache.count(target)
    return {"backfill_pins_per_s": round(rep.pins_per_s, 1), "backfill_pins": rep.pins,
            "backfill_encoded": rep.encoded, "backfill_yielded_s": round(rep.yielded_s, 1),
            "backfill_target_pins": target_pins, "live_pins_during_backfill": len(live_ids),
            "live_pins_written": len(fresh),
            "freshness_p50_s_during_backfill": round(percentile(fresh, 0.5), 2),
            "freshness_p99_s_during_backfill": round(percentile(fresh, 0.99), 2)}


def run_volume_bench(settings: Settings, pins: int, feeders: int, queries: int,
                     live_rate: float, out: Path, console: Console,
                     stream_rate: float = 200.0) -> dict[str, Any]:
    """Run every step (see the module docstring); print the table, write JSON to ``out``."""
    from streams.bench.runs import private_stack

    data_dir = settings.stack.data_dir.resolve()
    stamps = [Path(it.image) for it in load_catalog(prepare_sample_catalog(data_dir))]
    base = settings.model_copy(update={
        "encoder": settings.encoder.model_copy(update={"model": "null"}),
        "worker": settings.worker.model_copy(update={"metrics_port": 0}),
        "log_level": "WARNING"})
    report: dict[str, Any] = {"pins": pins, "feeders": feeders,
                              "milvus_engine": _engine_name(settings)}
    for name in ("streams", "store", "encoder"):  # the backfill runs here: no line per batch
        logging.getLogger(name).setLevel(logging.WARNING)
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pinfresh-volume-") as img_tmp, \
            private_stack(base, Path(img_tmp)) as (s, tmp):
        images = Path(img_tmp)
        t = time.monotonic()
        paths = make_images(images, stamps[:200], pins)
        console.print(f"{pins:,} images in {time.monotonic() - t:.0f}s under {images}")
        logs = tmp / "logs"

        async def before() -> int:
            await ensure_topics(s.kafka)
            async with open_stores(s) as stores:
                return await _redis_used(stores.cache)

        used0 = asyncio.run(before())
        t = time.monotonic()
        asyncio.run(publish_events(s.kafka, (PinEvent.upsert(f"v{i}", str(p), 1)
                                             for i, p in enumerate(paths)), total=pins))
        report["publish_s"] = round(time.monotonic() - t, 1)
        proc = asyncio.run(drain_backlog(s, pins, feeders, logs, console))
        try:
            written = asyncio.run(written_times(s, pins))
            report["pins_per_s"] = round(len(written) / (written[-1] - written[0]), 1)
            report["pins_per_s_by_tenth"] = _rates_by_tenth(written)

            async def sizes() -> int:
                async with open_stores(s) as stores:
                    return await _redis_used(stores.cache)

            used1 = asyncio.run(sizes())
            report["redis_bytes_per_pin_version"] = round((used1 - used0) / pins, 1)
            milvus_pid = _milvus_pid(tmp)
            report["milvus_rss_mb"] = round(_rss_mb(milvus_pid), 1) if milvus_pid else None
            report["milvus_disk_mb"] = round(_du_mb(tmp / "milvus"), 1)
            report.update(asyncio.run(_similar(s, images, paths, queries, stream_rate,
                                                 console)))

            async def verify() -> tuple[float, bool]:
                async with open_stores(s) as stores:
                    t = time.perf_counter()
                    rep = await verify_cache(stores.milvus, stores.cache, LIVE)
                    return time.perf_counter() - t, rep.ok

            secs, ok = asyncio.run(verify())
            report["verify_s"], report["verify_ok"] = round(secs, 1), ok
            report.update(asyncio.run(_backfill_with_live(s, live_rate, paths, console)))
            report["redis_bytes_per_pin_two_versions"] = round(
                (asyncio.run(sizes()) - used0) / pins, 1)
            report["milvus_disk_mb_two_versions"] = round(_du_mb(tmp / "milvus"), 1)
        finally:
            stop_group(proc)
    report["live_rate_pins_per_s"] = live_rate
    report["seconds"] = round(time.monotonic() - t_all)
    report["images"] = ("48 px PNG thumbnails of 200 Tux Paint stamps, each file made "
                        "distinct by a trailer after IEND; local files")
    report["encoder"] = (f"null (a function of the image bytes: full rank, {LATENT_DIM} "
                         "intrinsic dimensions; no decode, no model)")
    report["machine"] = machine()
    report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows: list[tuple[str, object]] = [
        ("pins", f"{pins:,}"),
        ("pins/s, whole drain", report["pins_per_s"]),
        ("pins/s by tenth", ", ".join(f"{x:.0f}" for x in report["pins_per_s_by_tenth"])),
        ("Redis bytes per pin and version", report["redis_bytes_per_pin_version"]),
        ("Milvus RSS MB / disk MB", f"{report['milvus_rss_mb']} / {report['milvus_disk_mb']}"),
        ("Milvus engine", report["milvus_engine"]),
        ("index settle s (after the drain)", report["index_settle_s"]),
        ("similar p50 / p99 ms, at rest", f"{report['similar_p50_ms']} / "
         f"{report['similar_p99_ms']}"),
        ("similar recall@10 at rest (null vectors)", report["similar_recall_at_10"]),
        (f"similar p50 / p99 ms, {stream_rate:g} updates/s streaming",
         f"{report['similar_streaming_p50_ms']} / {report['similar_streaming_p99_ms']}"),
        ("similar recall@10 while streaming", report["similar_streaming_recall_at_10"]),
        ("load average (1 min) while streaming", report["load_avg_1m_while_streaming"]),
        ("store verify s", report["verify_s"]),
        ("backfill pins/s", report["backfill_pins_per_s"]),
        (f"live freshness p99 s during backfill ({live_rate:g}/s)",
         report["freshness_p99_s_during_backfill"]),
    ]
    emit(f"pinfresh bench volume ({pins:,} pins)", rows, report, out, console)
    return report


def _engine_name(settings: Settings) -> str:
    if settings.stack.milvus == "lite":
        from importlib.metadata import version

        return f"milvus-lite {version('milvus-lite')}"
    from streams.runtime.milvus_server import release

    return f"milvus {release()} standalone"


def _milvus_pid(stack_dir: Path) -> int | None:
    from streams.runtime.stack import EmbeddedStack
    from streams.settings import StackSettings

    info = EmbeddedStack(StackSettings(data_dir=stack_dir)).read()
    return info.milvus.pid if info else None
