"""``pinfresh status``: the pipeline on one screen (or as JSON for scripts).

Everything is read from the shared systems, so it works against any
deployment, embedded or not: consumer lag from Kafka (committed offsets of the
workers' group vs log ends), in/out rates from two samples ``interval``
seconds apart, dead letters from the DLQ topic, freshness percentiles from the
last 10,000 samples the workers push to Redis, versions and their coverage
from the registry, and a real call to each store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table

from encoder.errors import StoreUnavailable, Unavailable
from store.lifecycle import open_stores
from store.redis import RedisCache
from store.registry import VersionRegistry
from streams.dlq import open_letters
from streams.kafka import aiokafka_kwargs
from streams.producer import consumer_lag, end_offsets, read_dead_letters
from streams.runtime.stack import check_kafka
from streams.runtime.stackstate import pid_reused
from streams.settings import Settings


async def _offsets(settings: Settings) -> tuple[dict[int, int], int]:
    lag = await consumer_lag(settings.kafka)
    return lag, sum(lag.values())


def stack_view(settings: Settings) -> dict[str, Any] | None:
    """The embedded stack's supervisor and its restarts (None: no embedded stack here)."""
    from streams.runtime.stackstate import StackFile, pid_alive

    info = StackFile(settings.stack.data_dir.resolve()).read()
    if info is None:
        return None
    return {"supervisor": (f"running (pid {info.supervisor_pid})"
                           if pid_alive(info.supervisor_pid, info.supervisor_started)
                           else "not running"),
            "restarts": info.restarts, "held_down": info.held,
            "kafka_log": kafka_log_view(settings.stack.data_dir.resolve() / "kafka")}


def kafka_log_view(kdir: Path) -> dict[str, Any] | None:
    """The disk log's retention and its lost offsets, from the broker wrapper's reports.

    None when there is no disk log here (the memory engine, or a Kafka cluster).
    """
    try:
        report = json.loads((kdir / "retention.json").read_text())
    except (OSError, ValueError):
        return None
    lost: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for line in (kdir / "quarantine.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line torn by a crash: the others count
                rec = json.loads(line)
                if isinstance(rec, dict):
                    lost.append(rec)
    pol = report.get("policy", {})
    return {"retention": f"{pol.get('max_age_s', 0) / 3600:g} h, "
                         f"{pol.get('max_bytes', 0) / (1 << 20):g} MiB, "
                         f"{pol.get('max_batches', 0):,} batches per partition",
            "checked_at": report.get("checked_at"),
            "partitions": report.get("partitions", {}),
            "removed_unread": report.get("forced", []),
            "quarantined": lost}


def pid_gone(report: Mapping[str, Any], host: str | None = None) -> bool:
    """Whether a report comes from a process of this host that no longer exists."""
    pid = report.get("pid")
    if report.get("host") != (host or socket.gethostname()) or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: it exists
        pass
    # the pid is another process's now (the report's process started at another time)
    started = report.get("proc_started")
    return isinstance(started, int) and pid_reused(pid, started)


def pipeline_state(lag: Mapping[int, int], progress: Mapping[int, Mapping[str, Any]],
                   now: float, stalled_after_s: float,
                   live: Mapping[str, Mapping[str, Any]], join_s: float = 60.0,
                   ) -> tuple[str, list[int], str]:
    """``("ok" | "idle" | "stalled", stalled partitions, why)``.

    ``live``: the reports of the workers that reported lately (their process
    runs). A partition with lag is stalled when:

    * no worker runs at all;
    * a live worker holds it and, as its progress reports saw it, its committed
      offset has not moved for ``stalled_after_s``, or its last progress
      report is that old;
    * no live worker holds it although every live worker started more than
      ``join_s`` ago (a join takes seconds): it is consumed by nobody.
      Reports without the partitions a worker holds (an older pinfresh) fall
      back to the progress records.
    """
    behind = sorted(p for p, n in lag.items() if n > 0)
    if not behind:
        return "idle", [], ""
    if not live:
        return "stalled", behind, "no worker is running"
    held: set[int] = set()
    for rep in live.values():
        held.update(int(p) for p in rep.get("partitions") or [])
    partial = any("partitions" not in rep for rep in live.values())
    joined = all(now - float(rep.get("started_at", 0.0)) > join_s for rep in live.values())
    stalled, why = [], set()
    for part in behind:
        rec = progress.get(part)
        owned = part in held or (partial and rec is not None and rec.get("worker") in live)
        if not owned:
            if joined and not partial:
                stalled.append(part)
                why.add("partitions with lag held by no running worker")
            continue
        if rec is not None and (now - float(rec["moved_at"]) > stalled_after_s
                                or now - float(rec["at"]) > stalled_after_s):
            stalled.append(part)
            why.add(f"committed offset not moving for over {stalled_after_s:g} s")
    if stalled:
        return "stalled", stalled, "; ".join(sorted(why))
    return "ok", [], ""


def worker_view(writers: Mapping[str, Mapping[str, Any]], progress: Mapping[int, Any],
                now: float, fresh_s: float, stuck_s: float,
                ) -> tuple[dict[str, dict[str, Any]], dict[str, Mapping[str, Any]], list[str]]:
    """``(rows, live reports, reports to forget)`` of the stream workers.

    A worker is ``ok`` while it reports (every progress interval, busy or
    idle; `fresh_s` is three intervals and some); ``down`` once its process is
    gone from this host (its report is then forgotten) or silent for longer;
    ``stuck`` when it has held no partition for ``stuck_s`` while partitions
    with lag have no live worker. A drained worker removes its own report.
    Only live workers are shown holding partitions.
    """
    rows: dict[str, dict[str, Any]] = {}
    live: dict[str, Mapping[str, Any]] = {}
    forget: list[str] = []
    for name, rep in sorted(writers.items()):
        if name.startswith("backfill:"):
            continue
        ago = now - float(rep.get("at", 0.0))
        if pid_gone(rep) or ago > max(3600.0, 10 * fresh_s):
            forget.append(name)
            continue
        parts: list[int] = []
        if ago > fresh_s:
            state = f"down: no report for {ago:.0f} s"
        else:
            live[name] = rep
            since = rep.get("unassigned_since")
            state = (f"stuck: no partition for {now - float(since):.0f} s while partitions "
                     "with lag have no live worker"
                     if since is not None and now - float(since) > stuck_s else "ok")
            parts = sorted(int(p) for p in rep["partitions"]) if "partitions" in rep else \
                sorted(p for p, rec in progress.items() if rec.get("worker") == name)
        rows[name] = {"state": state, "last_report_s_ago": round(ago, 1),
                      "writes": rep.get("write_set", []), "partitions": parts}
    return rows, live, forget


async def collect_status(settings: Settings, interval: float = 1.0,
                         window_s: float = 300.0, stalled_after_s: float = 120.0,
                         ) -> dict[str, Any]:
    """One status snapshot.

    Rates are measured over ``interval`` seconds, freshness over the samples
    the workers wrote in the last ``window_s`` seconds; the pipeline is
    ``stalled`` when a partition with lag has not moved for ``stalled_after_s``
    (see `pipeline_state`).
    """
    out: dict[str, Any] = {"time": time.time(), "health": {}, "freshness_window_s": window_s}
    async with AsyncExitStack() as stack:
        milvus_down = None
        try:
            stores = await stack.enter_async_context(open_stores(settings))
            cache, milvus = stores.cache, stores.milvus
        except Unavailable as exc:  # Milvus cannot be reached: the rest is still shown
            milvus_down, milvus = str(exc), None
            cache = RedisCache(settings.redis)
            stack.push_async_callback(cache.close)

        async def milvus_ping() -> None:
            if milvus is None:
                raise StoreUnavailable(milvus_down or "not connected")
            await milvus.ping()

        # every check has a deadline: a frozen store is "down", not a hung status
        deadline = {"kafka": 10.0, "redis": settings.redis.timeout_s + 1,
                    "milvus": settings.milvus.timeout_s + 1}
        for name, check in (("kafka", lambda: asyncio.to_thread(
                check_kafka, settings.kafka.bootstrap_servers.split(",")[0])),
                ("redis", cache.ping), ("milvus", milvus_ping)):
            try:
                await asyncio.wait_for(check(), deadline[name])
                out["health"][name] = "ok"
            except TimeoutError:
                out["health"][name] = f"down: no answer in {deadline[name]:g}s"
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                out["health"][name] = f"down: {exc}"[:200]
        if out["health"]["kafka"] == "ok":
            from aiokafka import AIOKafkaConsumer, TopicPartition

            c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False,
                                 **aiokafka_kwargs(settings.kafka))
            await c.start()
            try:
                parts = c.partitions_for_topic(settings.kafka.topic) or set()
                tps = [TopicPartition(settings.kafka.topic, p) for p in sorted(parts)]
                # log ends read from the log (the embedded broker's ListOffsets is off)
                ends1 = sum((await end_offsets(c, tps)).values()) if tps else 0
                lag1, total1 = await _offsets(settings)
                enc1 = await cache.encoded_total() if out["health"]["redis"] == "ok" else 0
                await asyncio.sleep(interval)
                ends2 = sum((await end_offsets(c, tps)).values()) if tps else 0
                lag2, total2 = await _offsets(settings)
                enc2 = await cache.encoded_total() if out["health"]["redis"] == "ok" else 0
            finally:
                await c.stop()
            consumed = (ends1 - total1, ends2 - total2)
            out.update({
                "partitions": len(tps), "lag": lag2, "lag_total": total2,
                # never negative: the two samples read log ends and commits separately
                "events_in_per_s": round(max(0, ends2 - ends1) / interval, 2),
                "events_out_per_s": round(max(0, consumed[1] - consumed[0]) / interval, 2),
                "pins_encoded_per_s": round(max(0, enc2 - enc1) / interval, 2),
            })
            letters = await read_dead_letters(settings.kafka, stall_s=5.0)
            redis_ok = out["health"]["redis"] == "ok"
            marks = await cache.dlq_marks() if redis_ok else {}
            opened = [o.letter for o in open_letters(letters, marks)]
            # open letters, one per original event (unknown without the marks in Redis)
            out["dlq_total"] = len(opened) if redis_ok else None
            out["dlq_letters_on_topic"] = len(letters)
            out["dlq_by_reason"] = dict(Counter(d.reason.value for d in opened))
        if out["health"]["redis"] == "ok":
            now = time.time()
            w = settings.worker
            fresh_s = 3 * w.progress_interval_s + 10  # reports come every interval
            progress = await cache.progress()
            rows, running, gone = worker_view(await cache.writers(), progress, now, fresh_s,
                                              w.unassigned_stall_s)
            await cache.forget_writers(gone)
            out["workers"] = rows
            reports = await cache.encoders()
            for name, rep in list(reports.items()):
                # a process gone for an hour (a replaced pod: a new host name) is forgotten
                if now - float(rep["at"]) > max(3600.0, 10 * stalled_after_s):
                    await cache.forget_encoder(name)
                    del reports[name]
            out["encoders"] = encoder_view(reports, now, fresh_s)
            if "lag" in out:
                state, stalled, why = pipeline_state(out["lag"], progress, now,
                                                     stalled_after_s, running,
                                                     w.unassigned_stall_s)
                out["pipeline"], out["partitions_stalled"] = state, stalled
                out["pipeline_why"] = why or None
            fresh, encoded = await cache.batch_stats(window_s=window_s)
            out["pins_encoded_total"] = encoded
            if fresh:
                arr = np.array(fresh)
                out.update({f"freshness_p{q}_s": round(float(np.percentile(arr, q)), 3)
                            for q in (50, 95, 99)})
                out["freshness_samples"] = len(fresh)
        if out["health"]["redis"] == "ok" and out["health"]["milvus"] == "ok" and milvus:
            reg = VersionRegistry(milvus, cache)
            versions = await reg.all()
            live = next((v.version for v in versions if v.live), None)
            live_n = await cache.count(live) if live else 0
            out["live_version"] = live
            out["versions"] = [
                {"version": v.version, "state": v.state, "pins": (n := await cache.count(
                    v.version)),
                 # at most 1: a version may hold pins the live one has not yet (or no more)
                 "coverage": round(min(1.0, n / live_n), 4) if live_n else None}
                for v in versions if v.state != "retired"
            ]
    out["stack"] = stack_view(settings)
    for key in ("lag_total", "freshness_p99_s", "live_version", "dlq_total", "pipeline",
                "partitions_stalled", "workers", "encoders"):
        out.setdefault(key, None)  # None: not known (its service is down)
    out["stalled_after_s"] = stalled_after_s
    return out


def encoder_view(reports: dict[str, dict[str, Any]], now: float, fresh_s: float
                 ) -> dict[str, dict[str, Any]]:
    """Encoder processes from their Redis reports.

    ``down`` when its process is gone from this host, or silent for ``fresh_s``
    (it reports every progress interval). A process that stopped on purpose
    removed its report; one that was killed or hangs keeps its last one, so it
    shows as down until the pool's new one reports under the same name.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, rep in sorted(reports.items()):
        ago = now - float(rep["at"])
        host = name.rpartition(":")[0]
        state = ("down: " + rep["unhealthy"] if rep.get("unhealthy") else
                 f"down: process {rep.get('pid')} is gone" if pid_gone({**rep, "host": host})
                 else f"down: no report for {ago:.0f} s" if ago > fresh_s else "ok")
        last = rep.get("last_answer_at")
        out[name] = {"state": state, "last_report_s_ago": round(ago, 1),
                     "version": rep.get("version"), "device": rep.get("device"),
                     "feeders": rep.get("feeders"), "queue_depth": rep.get("queue_depth"),
                     "images_total": rep.get("images_total"),
                     "images_per_s": rep.get("images_per_s"),
                     "batches_total": rep.get("batches_total"),
                     "last_answer_s_ago": round(now - float(last), 1) if last else None}
    return out


#: ``pinfresh status`` exit codes (docs/operations.md): scripts can act on them.
EXIT_OK, EXIT_DEGRADED, EXIT_UNREACHABLE = 0, 1, 3


def exit_code(st: Mapping[str, Any]) -> int:
    """The exit code of a snapshot.

    ``EXIT_UNREACHABLE`` when a service does not answer; ``EXIT_DEGRADED`` when
    the pipeline is stalled or a worker or encoder process is down or stuck;
    else ``EXIT_OK`` (running, or idle).
    """
    if any(v != "ok" for v in st.get("health", {}).values()):
        return EXIT_UNREACHABLE
    rows = [*(st.get("workers") or {}).values(), *(st.get("encoders") or {}).values()]
    if st.get("pipeline") == "stalled" or any(r["state"] != "ok" for r in rows):
        return EXIT_DEGRADED
    return EXIT_OK


def render(st: dict[str, Any]) -> Group:
    """The rich one-screen view of a snapshot."""
    head = Table(title="pinfresh status", show_header=False)
    head.add_column("k")
    head.add_column("v", justify="right")
    for key in ("pipeline", "lag_total", "events_in_per_s", "events_out_per_s",
                "pins_encoded_per_s", "freshness_p50_s", "freshness_p95_s", "freshness_p99_s",
                "dlq_total", "live_version"):
        value = st.get(key)
        head.add_row(key, "-" if value is None else str(value))  # "-": nothing known
    if st.get("partitions_stalled"):
        head.add_row("partitions stalled", ", ".join(map(str, st["partitions_stalled"])))
    if st.get("pipeline_why"):
        head.add_row("why", st["pipeline_why"])
    for name, state in st["health"].items():
        head.add_row(f"health: {name}", state)
    stack = st.get("stack") or {}
    if stack:
        head.add_row("stack supervisor", stack["supervisor"])
        for name, rec in sorted(stack["restarts"].items()):
            when = time.strftime("%H:%M:%S", time.localtime(rec.get("last_at", 0)))
            head.add_row(f"stack restarts: {name}", f"{rec.get('count', 0)} (last at {when}"
                         + (f": {rec['last_error'][:80]}" if rec.get("last_error") else "")
                         + ")")
        log = stack.get("kafka_log")
        if log:
            checked = log.get("checked_at")
            head.add_row("broker log retention", log["retention"] + (
                f" (checked {time.time() - checked:.0f} s ago)" if checked else ""))
            for f in log["removed_unread"][-3:]:
                end = f.get("to")
                head.add_row("broker log: removed unread",
                             f"{f.get('topic')}[{f.get('partition')}] offsets {f.get('from')}"
                             f" to {end - 1 if isinstance(end, int) else 'its end'} (groups "
                             f"{', '.join(sorted(f.get('groups_behind') or {}))})")
            for q in log["quarantined"][-3:]:
                base = q.get("base_offset")
                head.add_row("broker log: torn batch lost",
                             f"{str(q.get('key', '?')).split('/topics/')[-1]} from offset "
                             f"{'?' if base is None else base} ({str(q.get('reason'))[:60]})")
    parts = Table(title="consumer lag by partition")
    parts.add_column("partition")
    parts.add_column("lag", justify="right")
    for p, lag in sorted((st.get("lag") or {}).items()):
        parts.add_row(str(p), str(lag))
    vers = Table(title="model versions")
    for col in ("version", "state", "pins", "coverage of live"):
        vers.add_column(col)
    for v in st.get("versions", []):
        vers.add_row(v["version"], v["state"], str(v["pins"]), str(v["coverage"]))
    dlq = Table(title="dead letters by reason")
    dlq.add_column("reason")
    dlq.add_column("count", justify="right")
    for r, n in sorted((st.get("dlq_by_reason") or {}).items()):
        dlq.add_row(r, str(n))
    workers = Table(title="workers (their last report; partitions held)")
    for col in ("worker", "state", "last report, s ago", "writes", "partitions"):
        workers.add_column(col, overflow="fold")
    for name, w in sorted((st.get("workers") or {}).items()):
        workers.add_row(name, w["state"], str(w["last_report_s_ago"]), ", ".join(w["writes"]),
                        " ".join(map(str, w["partitions"])) or "-")
    encoders = Table(title="encoder processes (their last report)")
    for col in ("encoder", "state", "version", "device", "feeders", "queue", "images/s",
                "last answer, s ago"):
        encoders.add_column(col, overflow="fold")
    for name, e in (st.get("encoders") or {}).items():
        encoders.add_row(name, e["state"], str(e["version"]), str(e["device"]),
                         str(e["feeders"]), str(e["queue_depth"]), str(e["images_per_s"]),
                         str(e["last_answer_s_ago"] if e["last_answer_s_ago"] is not None
                             else "-"))
    return Group(head, workers, encoders, parts, vers, dlq)
