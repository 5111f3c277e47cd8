"""``pinfresh bench pipeline --encoder null``: what feeders cost, with the encoder taken out.

Everything but the encoder is real: a private embedded stack (Kafka protocol
broker, Valkey, the Milvus server), ``pinfresh worker`` processes consuming,
validating, fetching, hashing, writing both stores and committing. The
encoder is the null stub (a unit vector from the image bytes, no decode), so
the rate measures the stream machinery a GPU host needs to feed its GPU.

Measured in one run, per image source (local files; a local HTTP server):

* **bare consumer**: a Faust agent that takes the same micro-batches and acks
  them with no work (one Redis INCRBY per batch so progress can be read) -
  the ceiling of one consuming process on this broker;
* **feeders**: ``pinfresh worker --devices cpu --feeders N`` with the null
  model, N = 1, 2, 4: one encoder process serving N feeders over the Unix
  socket, as on a GPU host;
* **in-process**: one plain worker with the null encoder in its own process,
  to show what the socket hop costs.

Each rate is pins readable in Redis per second while draining a backlog: the
``pins`` events are published first, then the processes start, and the rate
is taken between 10 % and 90 % of the backlog written (from the pins'
``written_at`` in Redis; for the bare consumer, from its acked count polled
every 20 ms), so process start-up, group joins and the tail are left out.
Each configuration runs ``repeat`` times (3), interleaved with the others;
the median is reported, every run is in the JSON with the machine's
conditions.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from store.lifecycle import open_stores
from store.redis import RedisCache
from streams.bench.cpu import CpuSampler, py_spy, scrape_stages, stage_shares, stage_wall_ms
from streams.bench.report import emit, machine
from streams.producer import ensure_topics, publish_events
from streams.runtime.catalog import (
    CatalogItem,
    catalog_root_of,
    load_catalog,
    prepare_sample_catalog,
)
from streams.runtime.processes import stop_group
from streams.runtime.stack import free_port, free_ports
from streams.settings import Settings

NULL_VERSION = "null_512"


# ------------------------------------------------------------ helper processes
def bare_consumer_main() -> None:
    """Entry of the bare consumer process (settings from the environment)."""
    import faust
    import redis.asyncio as aioredis

    from streams.runtime.logconf import configure_logging

    s = Settings()
    configure_logging("WARNING", as_json=False)
    k = s.kafka
    s.worker_state_dir().mkdir(parents=True, exist_ok=True)
    app = faust.App(f"{k.group_id}", broker=[f"kafka://{h}" for h in
                                            k.bootstrap_servers.split(",")],
                    value_serializer="raw", key_serializer="raw",
                    topic_partitions=k.partitions, broker_rebalance_timeout=k.rebalance_timeout_s,
                    broker_session_timeout=k.session_timeout_s,
                    broker_heartbeat_interval=k.heartbeat_interval_s,
                    broker_commit_interval=k.commit_interval_s,
                    consumer_auto_offset_reset="earliest", store="memory://",
                    web_enabled=False, datadir=str(s.worker_state_dir() / "{conf.name}-data"))
    topic = app.topic(k.topic, key_type=bytes, value_type=bytes, partitions=k.partitions)
    counter = f"{s.redis.key_prefix}:bench:bare"

    @app.agent(topic)
    async def consume(stream: Any) -> None:
        r = aioredis.Redis.from_url(s.redis.url)
        async for events in stream.noack_take(s.worker.batch_size,
                                              within=s.worker.batch_wait_s):
            for e in events:
                await stream.ack(e)
            await r.incrby(counter, len(events))

    faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False,
                 override_logging=False).execute_from_commandline()


@contextlib.contextmanager
def file_server(root: Path) -> Iterator[str]:
    """A local HTTP/1.1 keep-alive server over ``root`` (`streams.bench.fileserver`); its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streams.bench.fileserver", str(root),
                             str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------ one round
async def _progress(cache: RedisCache, r: Any, key: str | None) -> int:
    """Pins written (null version's id set) or, with ``key``, events the bare consumer acked."""
    if key is not None:
        return int(await r.get(key) or 0)
    return await cache.count(NULL_VERSION) if await cache.get_live() else 0


async def _track(cache: RedisCache, r: Any, key: str | None, start: int, n: int,
                 timeout: float, on_poll: Callable[[float, int], None] | None = None,
                 ) -> list[tuple[float, int]]:
    """Poll progress every 20 ms until ``n`` more are done; ``(time, done)`` samples."""
    deadline = time.monotonic() + timeout
    samples: list[tuple[float, int]] = []
    while True:
        got = await _progress(cache, r, key) - start
        now = time.time()
        samples.append((now, got))
        if on_poll is not None:
            on_poll(now, got)
        if got >= n:
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {got} of {n} after {timeout:.0f}s (see the logs)")
        await asyncio.sleep(0.02)


def _crossing(samples: list[tuple[float, int]], at: float) -> float:
    return next(t for t, done in samples if done >= at)


def _start(cmd: Sequence[str], s: Settings, log: Path,
           code: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd``; with ``code``, from that source tree (a baseline's checkout)."""
    env = s.child_environ(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    with open(log, "ab") as f:
        return subprocess.Popen(list(cmd), env=env, stdout=f, cwd=code,
                                stderr=subprocess.STDOUT, start_new_session=True)


async def _drop(s: Settings) -> None:
    """Drop the round's collection and keys, so rounds do not weigh on each other."""
    async with open_stores(s) as stores:
        try:
            await stores.cache.drop_version(NULL_VERSION)
            await stores.milvus.drop_version(NULL_VERSION)
        except Exception as exc:  # noqa: BLE001 - a benchmark's clean-up; say so and go on
            print(f"clean-up of round {s.milvus.collection_prefix} failed: {exc!r}")


async def _round(s: Settings, kind: str, n: int, items: list[CatalogItem], pins: int,
                 logs: Path, console: Console, code: Path | None = None,
                 profile: Path | None = None) -> dict[str, Any]:
    """Start the processes of one configuration, publish the backlog, time it.

    The stream processes' CPU time is sampled with the progress; ``profile``:
    also record a py-spy profile of the first stream process between 10 % and
    90 % of the backlog written. ``code``: run the processes from that tree.
    A kind ``name@B`` runs ``name`` with micro-batches of B events.
    """
    label = kind
    kind, _, batch = kind.partition("@")
    if batch:
        s = s.model_copy(update={"worker": s.worker.model_copy(update={
            "batch_size": int(batch)})})
    tag = f"{kind}-{batch or 'd'}-{n}-{int(time.time() * 1000) % 10_000_000}"
    # a fresh topic, group, collection and key prefix per round: Milvus Lite slows down as
    # a collection grows (its upserts timed out after 20 rounds into one collection), and
    # each round must start from the same store state
    prefix = "b" + tag.replace("-", "_")
    s = s.model_copy(update={
        "kafka": s.kafka.model_copy(update={
            "topic": f"bench-{tag}", "dlq_topic": f"bench-{tag}.dlq", "group_id": f"g-{tag}"}),
        "milvus": s.milvus.model_copy(update={"collection_prefix": prefix}),
        "redis": s.redis.model_copy(update={"key_prefix": prefix})})
    import redis.asyncio as aioredis

    await ensure_topics(s.kafka)
    cache = RedisCache(s.redis)
    r = aioredis.Redis.from_url(s.redis.url)
    py = [sys.executable, "-m", "streams.cli"]
    key: str | None = None
    procs: list[subprocess.Popen[bytes]] = []
    if kind == "bare":
        cmd = [sys.executable, "-c",
               "from streams.bench.null import bare_consumer_main as m; m()"]
        bare_key = f"{s.redis.key_prefix}:bench:bare"
        await r.delete(bare_key)
        key = bare_key
    elif kind == "in-process":
        cmd = [*py, "worker", "--devices", ",".join(["cpu"] * n)]
    else:
        cmd = [*py, "worker", "--devices", "cpu", "--feeders", str(n)]
    # the stream processes serve metrics on base, base + 1, ...: their stage times are
    # scraped at 10 % and 90 % of the backlog written
    base_port = free_ports(n) if kind != "bare" else 0
    ports = [base_port + i for i in range(n)] if base_port else []
    s = s.model_copy(update={"worker": s.worker.model_copy(update={"metrics_port": base_port})})
    scrapes: list[dict[str, tuple[float, float]]] = []
    try:
        # the backlog is published before the processes start; the rate is taken
        # between 10 % and 90 % of it done, so start-up, joins and the tail do not count
        before = await _progress(cache, r, key)
        backlog = [replace(items[i % len(items)], pin_id=f"p-{tag}-{i}") for i in range(pins)]
        await publish_events(s.kafka, (it.event(1) for it in backlog), progress=False)
        procs = [_start(cmd, s, logs / f"{tag}.log", code)]
        cpu = CpuSampler(procs[0].pid)
        spy: list[subprocess.Popen[bytes] | None] = []

        def on_poll(at: float, done: int) -> None:
            cpu.sample(at)
            if ports and len(scrapes) < 2 and done >= (0.1, 0.9)[len(scrapes)] * pins:
                scrapes.append(scrape_stages(ports))
            if profile is not None and not spy and done >= 0.1 * pins and cpu.pids:
                spy.append(py_spy(cpu.pids[0], profile))
            elif spy and spy[0] is not None and spy[0].poll() is None and done >= 0.9 * pins:
                spy[0].send_signal(signal.SIGINT)

        samples = await _track(cache, r, key, before, len(backlog), 1200, on_poll)
        if spy and spy[0] is not None:
            spy[0].wait(60)
        if key is None:  # Redis write times are exact: use them instead of the poll times
            metas = await cache.get_meta(NULL_VERSION, [it.pin_id for it in backlog])
            written = sorted(float(m["written_at"]) for m in metas.values())
            t0, t1 = written[len(written) // 10], written[len(written) * 9 // 10]
        else:
            t0, t1 = _crossing(samples, 0.1 * pins), _crossing(samples, 0.9 * pins)
    finally:
        for p in procs:
            stop_group(p)
        await cache.close()
        await r.aclose()
        if kind != "bare":  # it writes no collection and no keys but its counter
            await _drop(s)
    rate = 0.8 * len(backlog) / (t1 - t0)
    cpu_s, threads = cpu.between(t0, t1)
    cpu_ms = 1000 * cpu_s / (0.8 * len(backlog))
    console.print(f"{label} x{n}: {len(backlog)} pins, 10-90 % in {t1 - t0:.1f}s = "
                  f"{rate:.0f} pins/s, {cpu_ms:.3f} ms CPU per pin")
    return {"kind": label, "processes": n, "pins": len(backlog),
            "batch_size": s.worker.batch_size,
            "seconds_10_to_90_pct": round(t1 - t0, 2), "pins_per_s": round(rate, 1),
            "cpu_ms_per_pin": round(cpu_ms, 4),
            # cores the stream processes kept busy: 1.0 = one core all the time
            "busy_cores": round(cpu_ms * rate / 1000, 3),
            "stage_wall_ms_per_batch": stage_wall_ms(*scrapes) if len(scrapes) == 2 else None,
            "cpu_ms_per_pin_by_thread": {g: round(1000 * v / (0.8 * len(backlog)), 4)
                                         for g, v in sorted(threads.items())}}


@contextlib.contextmanager
def source_tree(ref: str) -> Iterator[tuple[Path, str]]:
    """This repository's files at ``ref`` in a temporary directory, and the commit."""
    import tarfile
    import tempfile

    repo = Path(__file__).resolve().parents[2]
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="pinfresh-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", sha],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp), sha


def run_null_bench(settings: Settings, pins: int, feeders: Sequence[int],
                   sources: Sequence[str], out: Path, console: Console,
                   repeat: int = 3, baseline: str | None = None,
                   profile: bool = True, cpu_batches: Sequence[int] = ()) -> dict[str, Any]:
    """Run every round, print the table and write the JSON (see the module docstring).

    ``baseline``: a git ref; one feeder run from that commit's code is
    measured beside the current code's, interleaved in the same run (before
    and after). ``profile``: one more feeder round per source (and per code)
    under py-spy, for the CPU breakdown by stage. ``cpu_batches``: also run
    one feeder (and the baseline's) with micro-batches of these sizes.
    """
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(source_tree(baseline)) if baseline else None
        return _run_null_bench(settings, pins, feeders, sources, out, console, repeat,
                               tree, profile, baseline, cpu_batches)


def _run_null_bench(settings: Settings, pins: int, feeders: Sequence[int],
                    sources: Sequence[str], out: Path, console: Console, repeat: int,
                    tree: tuple[Path, str] | None, profile: bool,
                    baseline_ref: str | None = None,
                    cpu_batches: Sequence[int] = ()) -> dict[str, Any]:
    data_dir = settings.stack.data_dir.resolve()
    path = prepare_sample_catalog(data_dir)
    items = [it for it in load_catalog(path) if "party-horn-out" not in it.pin_id]
    root = catalog_root_of(path)
    base = settings.model_copy(update={
        "encoder": settings.encoder.model_copy(update={"model": "null"}),
        "worker": settings.worker.model_copy(update={"metrics_port": 0}),
        "log_level": "WARNING"})
    rounds: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    from streams.bench.runs import private_stack  # imports torch: not in the consumer processes

    def code_for(kind: str) -> Path | None:
        """The baseline's source tree for its rounds; None: this code."""
        return tree[0] if tree is not None and kind.startswith("baseline") else None

    logs = data_dir / "logs" / "bench-null"
    logs.mkdir(parents=True, exist_ok=True)
    console.print(f"process logs: {logs}")
    with private_stack(base, root) as (s, _tmp):
        s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"partitions": 8})})
        # what a look-up would wait at each consistency level in a process that writes
        consistency = asyncio.run(read_after_write_ms(s))
        console.print(f"query right after an upsert, median ms: {consistency}")
        for source in sources:
            src_items = items
            ctx: contextlib.AbstractContextManager[str | None] = contextlib.nullcontext(None)
            if source == "http":
                ctx = file_server(root)
            with ctx as url:
                ss = s
                if url is not None:
                    src_items = [replace(it, image=url + "/" + str(Path(it.image)
                                                                 .relative_to(root)))
                                 for it in items]
                    ss = s.model_copy(update={"fetch": s.fetch.model_copy(update={
                        "allowed_hosts": ["127.0.0.1"]})})
                configs = [("bare", 1), ("in-process", 1)] + [("feeders", n) for n in feeders]
                if tree is not None:
                    configs.append(("baseline", 1))
                for b in cpu_batches:
                    configs += [(f"feeders@{b}", 1)] + ([(f"baseline@{b}", 1)] if tree else [])
                for _ in range(repeat):  # interleaved, so drift hits every configuration alike
                    for kind, n in configs:
                        # 40 batches at least: a window of a few batches would be all edges
                        k_pins = max(pins, 40 * int(kind.partition("@")[2] or 0))
                        res = asyncio.run(_round(ss, kind, n, src_items, k_pins, logs, console,
                                                 code=code_for(kind)))
                        res["source"] = source
                        rounds.append(res)
                for kind in (["feeders"] + (["baseline"] if tree else [])) if profile else []:
                    raw = logs / f"profile-{source}-{kind}.txt"
                    raw.unlink(missing_ok=True)
                    res = asyncio.run(_round(ss, kind, 1, src_items, pins, logs, console,
                                             code=code_for(kind), profile=raw))
                    shares, n_samples = (stage_shares(raw.read_text().splitlines())
                                         if raw.exists() else ({}, 0))
                    profiles.append({**res, "source": source, "profile": str(raw),
                                     "gil_samples": n_samples, "stage_share": shares})

    def rate(kind: str, n: int, source: str, what: str = "pins_per_s") -> float | None:
        got = [r[what] for r in rounds if r["kind"] == kind
               and r["processes"] == n and r["source"] == source]
        return round(statistics.median(got), 4 if what != "pins_per_s" else 1) if got else None

    def cpu(kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for src in sources:
            per = rate(kind, 1, src, "cpu_ms_per_pin")
            runs = [r for r in rounds if r["kind"] == kind and r["processes"] == 1
                    and r["source"] == src]
            groups = sorted({g for r in runs for g in r["cpu_ms_per_pin_by_thread"]})
            prof = next((p for p in profiles if p["kind"] == kind and p["source"] == src),
                        None)
            out[src] = {
                "ms_per_pin": per,
                "runs": [r["cpu_ms_per_pin"] for r in runs],
                "by_thread": {g: round(statistics.median(
                    r["cpu_ms_per_pin_by_thread"].get(g, 0.0) for r in runs), 4)
                    for g in groups},
                "stages": None if prof is None or per is None else {
                    "gil_samples": prof["gil_samples"],
                    "profiled_run_ms_per_pin": prof["cpu_ms_per_pin"],
                    "share_of_gil_samples": prof["stage_share"],
                    "ms_per_pin": {st: round(sh * per, 4)
                                   for st, sh in prof["stage_share"].items()}},
            }
        return out

    def stages(kind: str, n: int, source: str) -> dict[str, float] | None:
        runs = [r["stage_wall_ms_per_batch"] for r in rounds if r["kind"] == kind
                and r["processes"] == n and r["source"] == source
                and r.get("stage_wall_ms_per_batch")]
        names = sorted({st for run in runs for st in run})
        return {st: round(statistics.median(run.get(st, 0.0) for run in runs), 2)
                for st in names} if runs else None

    src0 = sources[0]
    bare = rate("bare", 1, src0)
    one = rate("feeders", 1, src0)
    report: dict[str, Any] = {
        "bare_consumer_events_per_s": bare,
        "null_pins_per_s": {str(n): rate("feeders", n, src0) for n in feeders},
        "null_pins_per_s_http": ({str(n): rate("feeders", n, "http") for n in feeders}
                                 if "http" in sources else None),
        "in_process_null_pins_per_s": rate("in-process", 1, src0),
        "one_feeder_vs_bare_consumer": round(one / bare, 3) if one and bare else None,
        "feeder_cpu_ms_per_pin": cpu("feeders"),
        "feeder_cpu_target_ms_per_pin": 0.35,
        # median ms of a query by id right after the same client's upsert, per level
        "read_after_write_ms_by_consistency": consistency,
        # CPU per pin x pins/s: the share of a core the stream processes kept busy
        "busy_cores": {src: {f"{kind}x{n}": rate(kind, n, src, "busy_cores")
                             for kind, n in [("bare", 1), ("in-process", 1)]
                             + [("feeders", n) for n in feeders]} for src in sources},
        # mean wall ms per batch of each stage, waits included (the processor's
        # pinfresh_stage_seconds between 10 % and 90 % of the backlog); several feeders:
        # every feeder's batches together
        "stage_wall_ms_per_batch": {src: {f"{kind}x{n}": stages(kind, n, src)
                                          for kind, n in [("in-process", 1)]
                                          + [("feeders", n) for n in feeders]}
                                    for src in sources},
        "bare_consumer_cpu_ms_per_event": {src: rate("bare", 1, src, "cpu_ms_per_pin")
                                           for src in sources},
        "in_process_cpu_ms_per_pin": {src: rate("in-process", 1, src, "cpu_ms_per_pin")
                                      for src in sources},
        "feeder_cpu_ms_per_pin_by_batch_size": {str(b): cpu(f"feeders@{b}")
                                                for b in cpu_batches},
        "baseline": None if tree is None else {
            "ref": baseline_ref, "commit": tree[1],
            "null_pins_per_s": {src: rate("baseline", 1, src) for src in sources},
            "feeder_cpu_ms_per_pin": cpu("baseline"),
            "feeder_cpu_ms_per_pin_by_batch_size": {str(b): cpu(f"baseline@{b}")
                                                    for b in cpu_batches}},
        "cpu_method": "utime+stime of the stream processes (a pool's children, less the "
                      "encoder process) from /proc, between the times 10 % and 90 % of the "
                      "backlog was written, per pin written; by thread from /proc/PID/task. "
                      "Stages: py-spy record --gil (samples of the thread holding the GIL) "
                      "in one extra run per source, each sample given to the stage of its "
                      "innermost stage frame (streams/bench/cpu.py STAGES); ms_per_pin = "
                      "share x the median CPU per pin of the unprofiled runs, which assumes "
                      "CPU outside the GIL (syscalls, gRPC C threads) splits alike",
        "rounds": rounds,
        "profiled_rounds": profiles,
        "pins_per_round": pins,
        "runs_per_configuration": repeat,
        "statistic": "median of the runs",
        "partitions": 8,
        "worker_batch_size": settings.worker.batch_size,
        "images": "Tux Paint stamps (PNG), local files or a local HTTP/1.1 keep-alive server "
                  "(one asyncio event loop) in a separate process",
        "note": "every configuration runs `runs_per_configuration` times, interleaved; "
                "everything (broker, Valkey, the Milvus server, HTTP server, processes under test, "
                "this driver) shares this machine's cores",
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows: list[tuple[str, object]] = []
    for source in sources:
        for kind, n in [("bare", 1), ("in-process", 1)] + [("feeders", n) for n in feeders] + (
                [("baseline", 1)] if tree else []):
            label = {"bare": "bare Faust consumer (ack only)", "in-process":
                     "1 worker, null encoder in-process", "feeders":
                     f"{n} feeder(s) + null encoder process", "baseline":
                     f"1 feeder at {tree[1][:10] if tree else ''} (before)"}[kind]
            runs = [r["pins_per_s"] for r in rounds if r["kind"] == kind
                    and r["processes"] == n and r["source"] == source]
            rows.append((f"{source}: {label}, pins/s (median; runs)",
                         f"{rate(kind, n, source)} ({', '.join(f'{x:.0f}' for x in runs)})"))
    rows.append(("1 feeder / bare consumer", report["one_feeder_vs_bare_consumer"]))
    rows.append(("query right after an upsert, median ms by consistency",
                 " ".join(f"{k}={v}" for k, v in consistency.items())))
    for source in sources:
        for label, busy in report["busy_cores"][source].items():
            rows.append((f"{source}: {label} busy cores (CPU per pin x pins/s)", busy))
        for label, st in report["stage_wall_ms_per_batch"][source].items():
            if st:
                rows.append((f"{source}: {label} wall ms per batch by stage",
                             " ".join(f"{k}={v}" for k, v in st.items())))
    blocks = [("feeder", report["feeder_cpu_ms_per_pin"]),
              ("baseline feeder", (report["baseline"] or {}).get("feeder_cpu_ms_per_pin", {}))]
    for b in cpu_batches:
        blocks += [(f"feeder, batches of {b},", report["feeder_cpu_ms_per_pin_by_batch_size"][
            str(b)]), (f"baseline feeder, batches of {b},", ((report["baseline"] or {}).get(
                "feeder_cpu_ms_per_pin_by_batch_size") or {}).get(str(b), {}))]
    for label, block in blocks:
        for src, got in block.items():
            rows.append((f"{src}: {label} CPU ms per pin (median; runs)",
                         f"{got['ms_per_pin']} ({', '.join(f'{x:.3f}' for x in got['runs'])})"))
            for st, ms in ((got.get("stages") or {}).get("ms_per_pin") or {}).items():
                rows.append((f"    {st}", ms))
    rows.append(("bare consumer CPU ms per event", str(report["bare_consumer_cpu_ms_per_event"])))
    emit(f"pinfresh bench pipeline --encoder null ({pins} pins per round, median of {repeat})",
         rows, report, out, console)
    return report


async def read_after_write_ms(s: Settings, samples: int = 15) -> dict[str, float]:
    """Median ms of a by-id query issued right after the same client's upsert, per level.

    What a look-up costs at each consistency level in a process that writes
    all the time (a feeder): Session and Strong wait for the server's next
    time tick, Bounded and Eventually do not.
    """
    import numpy as np

    from store.base import EmbeddingRecord
    from store.milvus import MilvusStore

    prefix = f"cons{int(time.time() * 1000) % 10_000_000}"
    store = MilvusStore(s.milvus.model_copy(update={"collection_prefix": prefix}))
    out: dict[str, float] = {}
    try:
        await store.ensure_version("c", 8)
        vec = np.ones(8, dtype=np.float32) / np.sqrt(8)
        for level in ("Strong", "Session", "Bounded", "Eventually"):
            times = []
            for i in range(samples):
                rec = EmbeddingRecord(f"p{i}", vec, "c", "h", i, time.time(), time.time(), "",
                                      "", {})
                await store.upsert("c", [rec])
                t = time.perf_counter()
                await store.get_states("c", [f"p{i}"], consistency=level)  # type: ignore[arg-type]
                times.append(1000 * (time.perf_counter() - t))
            out[level] = round(statistics.median(times), 1)
        await store.drop_version("c")
    finally:
        await store.close()
    return out
