"""``pinfresh bench similar``: `similar` on the embedded Milvus while the stream writes.

Run on each engine given (``--engines server,lite``: the `milvus` 2.3.5
standalone server and Milvus Lite), one after the other in one run, each on a
private embedded stack (the launcher the CLI uses). Milvus Lite scans its
unsealed rows one by one on every search (see `store.milvus`); a store can
seal a collection every ``seal_rows`` rows it writes
(`MilvusSettings.seal_rows`, off by default), so per engine the benchmark
measures that policy against writing with no seals:

1. **write cost**: ``cost_rows`` rows upserted as fast as ``writers``
   concurrent writers go (batches of ``batch``, as a feeder writes), into a
   fresh collection per policy: rows/s, the number of seals and their time;
2. **fill**: ``rows`` rows into the collection under test (sealed);
3. **search while the stream writes**: per policy, ``stream_rows`` new rows
   written at ``rate`` rows/s while one reader runs ``similar`` (k=10) back
   to back: p50/p99 of its latency and the write rate reached;
4. **at rest**: after a flush and the background index builds, ``queries``
   searches: p50/p99, and recall@10 against an exact search (numpy, every
   stored vector) for the same queries; a get of 25 pins by id (Bounded, as
   the read path's fallback, and Session, as a worker's lookup); the engine's
   resident memory (its whole process tree);
5. **restart**: the engine SIGKILLed and started again on its data, timed
   until it answers a search on the collection (the launcher's readiness).

The vectors are synthetic, not model output: L2-normalised points around
``clusters`` random centres, so the nearest neighbours are not ties; queries
are stored vectors with noise added. Latency is the client's (pymilvus over
gRPC to the server process), as `similar` sees it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from store.base import EmbeddingRecord
from store.milvus import MilvusStore
from streams.bench.report import emit, machine, percentile
from streams.settings import Settings

DIM = 512


def clustered(n: int, rng: np.random.Generator, clusters: int, dim: int = DIM) -> np.ndarray:
    """``n`` unit vectors scattered around ``clusters`` random unit centres."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    v = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(
        np.float32) / np.sqrt(dim)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _records(version: str, vecs: np.ndarray, first: int) -> list[EmbeddingRecord]:
    now = time.time()
    return [EmbeddingRecord(pin_id=f"b{first + i}", vector=v, model_version=version,
                            content_hash="0" * 64, pin_version=1, event_time=now,
                            encode_time=now, image_location=f"bench://{first + i}",
                            caption="", metadata={})
            for i, v in enumerate(vecs)]


def _pct(xs: list[float], q: float) -> float:
    return round(percentile(xs, q), 1)


async def _write(store: MilvusStore, version: str, vecs: np.ndarray, first: int, batch: int,
                 writers: int, rate: float | None, progress: Progress | None = None,
                 label: str = "") -> float:
    """Upsert ``vecs`` as pins ``first..``; at ``rate`` rows/s if given. Returns seconds."""
    starts = list(range(0, len(vecs), batch))
    task = progress.add_task(label, total=len(vecs)) if progress else None
    t0 = time.perf_counter()

    async def writer(k: int) -> None:
        for j in starts[k::writers]:
            if rate:  # the schedule says when row j is due
                await asyncio.sleep(max(0.0, t0 + j / rate - time.perf_counter()))
            chunk = vecs[j:j + batch]
            await store.upsert(version, _records(version, chunk, first + j))
            if progress is not None and task is not None:
                progress.advance(task, len(chunk))

    await asyncio.gather(*(writer(k) for k in range(writers)))
    return time.perf_counter() - t0


async def _search_loop(store: MilvusStore, version: str, queries: np.ndarray,
                       stop: asyncio.Event) -> list[float]:
    lat: list[float] = []
    i = 0
    while not stop.is_set():
        t = time.perf_counter()
        await store.search(version, queries[i % len(queries)], 10)
        lat.append((time.perf_counter() - t) * 1000)
        i += 1
    return lat


async def _settle(store: MilvusStore, version: str) -> float:
    """Seal, then wait for the background index builds; returns the seconds it took."""
    t0 = time.perf_counter()
    await store.settle(version)
    return time.perf_counter() - t0


async def _run(settings: Settings, rows: int, stream_rows: int, cost_rows: int, rate: float,
               queries: int, writers: int, batch: int, clusters: int, seal_rows: int,
               console: Console, restart: Any = None) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    base = settings.milvus
    policies = {"seal": seal_rows, "no seal": 0}
    report: dict[str, Any] = {"rows": rows, "stream_rows": stream_rows, "rate_rows_per_s": rate,
                              "batch": batch, "writers": writers, "dim": DIM,
                              "index_type": base.index_type, "index_params": base.index_params,
                              "search_params": base.search_params}
    stores = {p: MilvusStore(base.model_copy(update={"seal_rows": v}))
              for p, v in policies.items()}
    try:
        report["seal_rows"] = seal_rows
        with Progress(console=console, transient=True) as progress:
            # 1. the write cost of sealing
            cost: dict[str, Any] = {}
            for p, st in stores.items():
                version = f"cost_{'seal' if p == 'seal' else 'noseal'}"
                await st.ensure_version(version, DIM)
                seals0, secs0 = st.seals, st.seal_seconds
                s = await _write(st, version, clustered(cost_rows, rng, clusters), 0, batch,
                                 writers, None, progress, f"write cost, {p}")
                cost[p] = {"rows_per_s": round(cost_rows / s), "seals": st.seals - seals0,
                           "seal_seconds": round(st.seal_seconds - secs0, 2)}
                await st.drop_version(version)
            report["write_cost"] = cost

            # 2. fill the collection under test
            vecs = clustered(rows + stream_rows * len(policies), rng, clusters)
            sealed = stores["seal"]
            await sealed.ensure_version("sim", DIM)
            fill_s = await _write(sealed, "sim", vecs[:rows], 0, batch, writers, None, progress,
                                  f"fill {rows:,} rows")
            report["fill_rows_per_s"] = round(rows / fill_s)
            report["settle_after_fill_s"] = round(await _settle(sealed, "sim"), 1)

            # 3. similar while the stream writes, per policy
            picks = rng.integers(0, rows, max(queries, 1000))
            q = vecs[picks] + 0.3 * rng.standard_normal((len(picks), DIM)).astype(
                np.float32) / np.sqrt(DIM)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            reader = MilvusStore(base.model_copy(update={"seal_rows": 0}))
            try:
                await reader.ensure_version("sim", DIM)
                during: dict[str, Any] = {}
                first = rows
                for p, st in stores.items():
                    await st.ensure_version("sim", DIM)
                    await _settle(st, "sim")
                    stop = asyncio.Event()
                    probe = asyncio.create_task(_search_loop(reader, "sim", q, stop))
                    s = await _write(st, "sim", vecs[first:first + stream_rows], first, batch,
                                     writers, rate, progress, f"stream, {p}")
                    stop.set()
                    lat = await probe
                    during[p] = {"similar_p50_ms": _pct(lat, 0.5),
                                 "similar_p99_ms": _pct(lat, 0.99), "searches": len(lat),
                                 "write_rows_per_s": round(stream_rows / s)}
                    first += stream_rows
                report["during_stream"] = during

                # 4. at rest: latency and recall against an exact search
                report["settle_s"] = round(await _settle(sealed, "sim"), 1)
                stored = vecs[:first]
                hits: list[list[str]] = []
                lat = []
                for i in range(queries):
                    t = time.perf_counter()
                    res = await reader.search("sim", q[i], 10)
                    lat.append((time.perf_counter() - t) * 1000)
                    hits.append([h.pin_id for h in res])
                exact = np.argsort(-(q[:queries] @ stored.T), axis=1)[:, :10]
                recall = statistics.fmean(
                    len({f"b{j}" for j in exact[i]} & set(hits[i])) / 10 for i in range(queries))
                gets: dict[str, list[float]] = {"Bounded": [], "Session": []}
                for _ in range(200):
                    ids = [f"b{j}" for j in rng.integers(0, rows, 25)]
                    for level, xs in gets.items():
                        t = time.perf_counter()
                        await reader.get_many("sim", ids, consistency=level)  # type: ignore[arg-type]
                        xs.append((time.perf_counter() - t) * 1000)
                report["at_rest"] = {"similar_p50_ms": _pct(lat, 0.5),
                                     "similar_p99_ms": _pct(lat, 0.99),
                                     "recall_at_10": round(recall, 4), "queries": queries,
                                     "rows": int(len(stored)),
                                     "get25_bounded_p50_ms": _pct(gets["Bounded"], 0.5),
                                     "get25_session_p50_ms": _pct(gets["Session"], 0.5)}
                if restart is not None:
                    report["rss_mb"] = round(restart("rss"), 1)
                    report["restart_to_search_s"] = round(restart("restart"), 1)
                await sealed.drop_version("sim")
            finally:
                await reader.close()
    finally:
        for st in stores.values():
            await st.close()
    return report


def _engine_probe(stack_dir: Path) -> Any:
    """Probes of the stack's Milvus.

    ``probe("rss")``: its process tree's RSS in MB; ``probe("restart")``:
    SIGKILL it, start it on its data, seconds until it answers a search again.
    """
    from streams.bench.volume import _rss_mb
    from streams.runtime.stack import EmbeddedStack
    from streams.settings import StackSettings

    def probe(what: str) -> float:
        st = EmbeddedStack(StackSettings(data_dir=stack_dir))
        info = st.read()
        assert info is not None
        if what == "rss":
            return _rss_mb(info.milvus.pid)
        st = EmbeddedStack(StackSettings(data_dir=stack_dir, milvus=info.milvus_engine,
                                         start_timeout_s=1800))
        st.kill_service("milvus")
        t = time.perf_counter()
        st.start_service("milvus")  # returns once every collection answers a search
        return time.perf_counter() - t

    return probe


def engine_name(engine: str) -> str:
    """The engine and its release, as the reports name it."""
    from importlib.metadata import version

    if engine == "lite":
        return f"milvus-lite {version('milvus-lite')}"
    return f"milvus {version('milvus')} standalone"


def run_similar_bench(settings: Settings, rows: int, stream_rows: int, cost_rows: int,
                      rate: float, queries: int, writers: int, batch: int, clusters: int,
                      seal_rows: int, out: Path, console: Console,
                      engines: tuple[str, ...] = ("server", "lite")) -> dict[str, Any]:
    """Run on a private embedded stack per engine; print the table, write JSON to ``out``."""
    from streams.bench.runs import private_stack

    report: dict[str, Any] = {"engines": {}}
    for engine in engines:
        s0 = settings.model_copy(update={"stack": settings.stack.model_copy(
            update={"milvus": engine})})
        console.print(f"[bold]{engine_name(engine)}[/]")
        with private_stack(s0, Path(".")) as (s, tmp):
            report["engines"][engine_name(engine)] = asyncio.run(_run(
                s, rows, stream_rows, cost_rows, rate, queries, writers, batch, clusters,
                seal_rows, console, restart=_engine_probe(tmp)))
    report["machine"] = machine()
    names = list(report["engines"])
    e = report["engines"]

    def col(f: Any) -> str:
        return " | ".join(str(f(e[n])) for n in names)

    rows_out: list[tuple[str, object]] = [
        ("engine", " | ".join(names)),
        ("write rows/s (seal every "
         f"{seal_rows} / no seal)", col(lambda r: f"{r['write_cost']['seal']['rows_per_s']:,}"
                                         f" / {r['write_cost']['no seal']['rows_per_s']:,}")),
        (f"fill rows/s, growing to {rows:,}", col(lambda r: f"{r['fill_rows_per_s']:,}")),
        (f"similar p50/p99 ms, {rate:g} rows/s streaming, no seal",
         col(lambda r: f"{r['during_stream']['no seal']['similar_p50_ms']} / "
                       f"{r['during_stream']['no seal']['similar_p99_ms']}")),
        ("  the same, seal", col(lambda r: f"{r['during_stream']['seal']['similar_p50_ms']} / "
                                           f"{r['during_stream']['seal']['similar_p99_ms']}")),
        ("similar p50/p99 ms at rest", col(lambda r: f"{r['at_rest']['similar_p50_ms']} / "
                                                     f"{r['at_rest']['similar_p99_ms']}")),
        ("recall@10 against exact", col(lambda r: r["at_rest"]["recall_at_10"])),
        ("get 25 by id p50 ms, Bounded / Session",
         col(lambda r: f"{r['at_rest']['get25_bounded_p50_ms']} / "
                       f"{r['at_rest']['get25_session_p50_ms']}")),
        ("RSS MB at rest", col(lambda r: r.get("rss_mb"))),
        ("restart until a search answers, s", col(lambda r: r.get("restart_to_search_s"))),
    ]
    emit("similar on the embedded Milvus engines", rows_out, report, out, console)
    return report
