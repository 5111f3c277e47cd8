"""Operating the pipeline: drain on SIGTERM, scaling the pool, partitions, status."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from streams.producer import committed_offsets, consumer_lag, scale_partitions
from streams.runtime.status import collect_status

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _wait_count(pipeline, n: int, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = await pipeline.cache.get_live()
        if version and await pipeline.cache.count(version) >= n:
            return version
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {n} pins readable after {timeout}s")


@pytest.mark.faults
async def test_sigterm_drains_in_flight_batch_and_commits(pipeline, catalog, fault_case):
    items = [it for it in catalog[100:300] if "party-horn-out" not in it.pin_id]
    ids = [it.pin_id for it in items]
    pipeline.start_worker("w1")
    await pipeline.publish([it.event(1) for it in items])
    version = await _wait_count(pipeline, 30)
    pipeline.procs["w1"].send_signal(signal.SIGTERM)
    rc = pipeline.procs["w1"].wait(timeout=120)
    pipeline.procs.pop("w1")
    written = await pipeline.milvus.count(version)
    assert await pipeline.cache.count(version) == written
    log = pipeline.worker_log("w1")
    assert rc == 0, log[-3000:]
    # logs are text: no terminal escapes (Faust's spinner wrote ESC[?25h on shutdown),
    # in the worker's log or the stack's
    stack_logs = sorted((pipeline.settings.stack.data_dir / "logs").glob("*.log"))
    for path in [pipeline.logs / "w1.log", *stack_logs]:
        assert "\x1b[" not in path.read_text(errors="replace"), path
    # the drain logs the offsets the broker confirmed, per partition
    line = re.search(r"drain: commit confirmed for group \S+: (.*)", log)
    assert line, log[-3000:]
    # a lone worker is its group's leader: it does not leave (the embedded broker would
    # keep a departed leader of a forming group for good, see _leave_group); a follower
    # leaves, so its partitions move now, not after the session timeout
    g = pipeline.settings.kafka.group_id
    assert f"drain: the group's leader does not leave {g}" in log, log[-3000:]
    assert f"drain: left consumer group {g}" not in log
    logged = {int(p): int(o) for p, o in re.findall(r"\[(\d+)\]=(\d+)", line.group(1))}
    k = pipeline.settings.kafka
    tps = [TopicPartition(k.topic, p) for p in range(k.partitions)]
    committed = await committed_offsets(k, k.group_id, tps)
    # the next worker starts exactly where the log says (partitions w1 never acked: at 0)
    assert {p: o for p, o in committed.items() if o is not None} == logged
    # every event before those offsets was written, every event after them was not
    assert sum(logged.values()) == written
    assert sum((await consumer_lag(k)).values()) == len(items) - written

    pipeline.start_worker("w2")
    meta = await pipeline.wait(ids, timeout=180)
    assert len(meta) == len(items)
    assert pipeline.wait_metric("pinfresh_images_encoded_total", len(items) - written,
                                worker="w2") == len(items) - written
    rows = await pipeline.milvus.iter_pins(version)
    assert sorted(r["pin_id"] for r in rows) == sorted(ids)
    # everything w1 wrote was committed and nothing else: w2 starts exactly there,
    # so it receives only the events w1 had not written (none skipped, none lost)
    assert pipeline.metric("pinfresh_events_total", "w2", '{outcome="skipped"}') == 0
    assert pipeline.metric("pinfresh_events_total", "w2",
                           '{outcome="written"}') == len(items) - written
    fault_case.add("SIGTERM drain under load", "exit 0, logged offsets = the group's committed "
                   "offsets, the next worker writes only the rest and skips nothing",
                   f"exit {rc}; {written} written and committed by w1 ({line.group(1)}); "
                   f"w2 wrote {len(items) - written}, skipped 0")


@pytest.mark.long
async def test_scaling_one_two_three_workers_rebalances_cleanly(pipeline, catalog):
    from dataclasses import replace

    usable = [it for it in catalog if "party-horn-out" not in it.pin_id]
    items = [replace(usable[i % len(usable)], pin_id=f"scale-{i}") for i in range(1600)]
    ids = [it.pin_id for it in items]
    await pipeline.publish([it.event(1) for it in items])  # a backlog
    phases = []
    for n in (1, 2, 3):
        pipeline.start_worker(f"w{n}")
        # joined: its agent started (the group rebalanced to include it)
        assert pipeline.wait_metric("pinfresh_worker_model_info", 1, timeout=240,
                                    worker=f"w{n}", labels_prefix=True) >= 1
        version = await pipeline.cache.get_live()
        c0, t0 = await pipeline.cache.count(version), time.monotonic()
        await asyncio.sleep(10)  # a measurement window, not a wait for a condition
        c1, t1 = await pipeline.cache.count(version), time.monotonic()
        # a fast machine may finish the backlog inside the window: the rate is then a floor
        phases.append({"workers": n, "pins_per_s": round((c1 - c0) / (t1 - t0), 2),
                       "done_before": c0, "backlog_left": len(ids) - c1})
    meta = await pipeline.wait(ids, timeout=400)
    assert len(meta) == len(ids)
    rows = await pipeline.milvus.iter_pins(version)
    assert sorted(r["pin_id"] for r in rows) == sorted(ids)  # none lost
    assert await pipeline.cache.count(version) == len(ids)
    # every phase with a backlog left made progress
    for ph in phases:
        assert ph["backlog_left"] == 0 or ph["pins_per_s"] > 0, phases
    # writes: each pin once, except a batch in flight on a partition that moved at one of
    # the two rebalances (its events are redelivered to the new owner and may be written
    # by both); duplicates beyond that would show here
    w = pipeline.settings.worker
    written = sum(pipeline.wait_metric("pinfresh_events_total", 0, worker=f"w{n}",
                                       labels='{outcome="written"}') for n in (1, 2, 3))
    assert len(ids) <= written <= len(ids) + 2 * 3 * w.batch_size * w.batches_in_flight
    out = os.environ.get("PINFRESH_SCALING_REPORT")
    if out:
        Path(out).write_text(json.dumps({
            "phases": phases, "backlog": len(ids), "partitions": 4,
            "note": "2-core machine: shows clean rebalances, not linear speed-up"}, indent=2))
    print("scaling:", phases)


async def test_topics_scale_and_status(pipeline, catalog):
    from encoder.errors import PinfreshError

    with pytest.raises(PinfreshError, match="cannot shrink"):
        await scale_partitions(pipeline.settings.kafka, 2)
    # the embedded broker lacks CreatePartitions: the error says so and what to do
    with pytest.raises(PinfreshError, match="PINFRESH_KAFKA__PARTITIONS"):
        await scale_partitions(pipeline.settings.kafka, 6)
    w1 = pipeline.start_worker("w1", progress_interval_s=1.0)
    items = catalog[60:90]
    await pipeline.publish([it.event(1) for it in items])
    assert len(await pipeline.wait([it.pin_id for it in items], timeout=180)) == len(items)
    st = await collect_status(pipeline.settings, interval=0.5)
    assert st["health"] == {"kafka": "ok", "redis": "ok", "milvus": "ok"}
    assert st["partitions"] == 4 and st["live_version"]
    assert st["freshness_p99_s"] is not None and st["freshness_p99_s"] > 0
    assert st["dlq_total"] == 0 and isinstance(st["lag_total"], int)
    assert st["versions"][0]["coverage"] == 1.0
    # the worker shows with the partitions it holds; lag per partition is a metric
    deadline = time.monotonic() + 120
    while sorted(p for w in st["workers"].values() for p in w["partitions"]) != [0, 1, 2, 3]:
        assert time.monotonic() < deadline, st["workers"]
        await asyncio.sleep(0.5)
        st = await collect_status(pipeline.settings, interval=0.1)
    assert st["pipeline"] in ("ok", "idle"), st
    import httpx

    deadline = time.monotonic() + 60
    while True:  # the gauges of the partitions it holds (set at each report)
        text = httpx.get(f"http://127.0.0.1:{pipeline.metrics_ports['w1']}/metrics").text
        held = sorted(int(p) for p in re.findall(
            r'^pinfresh_consumer_lag\{partition="(\d+)"\}', text, re.M))
        if held == [0, 1, 2, 3]:
            break
        assert time.monotonic() < deadline, text[-2000:]
        await asyncio.sleep(0.5)

    # a frozen worker: lag grows, no offset moves; status says stalled (it said "ok")
    os.kill(w1.pid, signal.SIGSTOP)
    try:
        more = catalog[90:110]
        await pipeline.publish([it.event(1) for it in more])
        deadline = time.monotonic() + 180
        while (st := await collect_status(pipeline.settings, interval=0.1,
                                          stalled_after_s=5))["pipeline"] != "stalled":
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.5)
        assert st["partitions_stalled"] and all(st["lag"][p] > 0
                                                for p in st["partitions_stalled"])
    finally:
        os.kill(w1.pid, signal.SIGCONT)
    assert len(await pipeline.wait([it.pin_id for it in more], timeout=240)) == len(more)
    deadline = time.monotonic() + 180
    while (st := await collect_status(pipeline.settings, interval=0.1,
                                      stalled_after_s=30))["pipeline"] == "stalled":
        assert time.monotonic() < deadline, st
        await asyncio.sleep(0.5)


@pytest.mark.faults
async def test_lag_is_exact_on_the_embedded_broker(pipeline, catalog, fault_case):
    items = catalog[300:337]  # 37 events over 4 partitions, published in batches
    await pipeline.publish([it.event(1) for it in items])
    lag = await consumer_lag(pipeline.settings.kafka)
    fault_case.add("lag with no worker running", f"{len(items)} (events published)",
                   str(sum(lag.values())), ok=sum(lag.values()) == len(items))
    assert sum(lag.values()) == len(items), lag
    pipeline.start_worker("w1")
    assert len(await pipeline.wait([it.pin_id for it in items], timeout=180)) == len(items)
    deadline = time.monotonic() + 120  # offsets commit every commit_interval_s
    while sum((await consumer_lag(pipeline.settings.kafka)).values()) and \
            time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    after = sum((await consumer_lag(pipeline.settings.kafka)).values())
    fault_case.add("lag after the worker consumed everything", "0", str(after), ok=after == 0)
    assert after == 0


@pytest.mark.faults
async def test_worker_started_first_creates_topics_with_the_configured_count(
        pipeline, catalog, fault_case):
    from aiokafka.admin import AIOKafkaAdminClient

    k = pipeline.settings.kafka.model_copy(update={
        "topic": pipeline.settings.kafka.topic + "-first", "partitions": 6,
        "dlq_topic": pipeline.settings.kafka.topic + "-first.dlq"})
    pipeline.settings = pipeline.settings.model_copy(update={"kafka": k})
    pipeline.start_worker("w1")  # before anything created the topics
    admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap_servers)
    await admin.start()
    try:
        deadline = time.monotonic() + 180
        counts: dict[str, int] = {}
        while time.monotonic() < deadline and len(counts) < 2:
            if pipeline.procs["w1"].poll() is not None:
                raise AssertionError(pipeline.worker_log("w1")[-3000:])
            existing = set(await admin.list_topics())
            if {k.topic, k.dlq_topic} <= existing:
                for d in await admin.describe_topics([k.topic, k.dlq_topic]):
                    counts[d["topic"]] = len(d["partitions"])
            else:
                await asyncio.sleep(0.5)
    finally:
        await admin.close()
    fault_case.add("partition count when the worker starts first", "6 and 6 (configured)",
                   f"{counts.get(k.topic)} and {counts.get(k.dlq_topic)}",
                   ok=counts == {k.topic: 6, k.dlq_topic: 6})
    assert counts == {k.topic: 6, k.dlq_topic: 6}
    # Faust's state folder is under the data dir, never in the working directory
    assert not list(Path.cwd().glob("*-data"))
    assert list(pipeline.settings.worker_state_dir().glob("*-data"))


async def test_down_stops_a_worker_started_by_hand(pipeline):
    import subprocess
    import sys

    from streams.runtime.processes import stop_workers, workers_dir
    from streams.runtime.stack import free_port

    port = free_port()
    s = pipeline.settings.model_copy(update={
        "worker": pipeline.settings.worker.model_copy(update={"metrics_port": port})})
    env = s.child_environ(os.environ)
    log = open(pipeline.logs / "by-hand.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        pid_file = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and pid_file is None:
            assert proc.poll() is None, (pipeline.logs / "by-hand.log").read_text()[-2000:]
            found = list(workers_dir(pipeline.settings).glob(f"*-{proc.pid}.pid"))
            pid_file = found[0] if found else None
            await asyncio.sleep(0.2)
        assert pid_file is not None, "the worker records its own pid"
        pipeline.metrics_ports["by-hand"] = port  # wait until its agent runs, then drain it
        assert pipeline.wait_metric("pinfresh_worker_model_info", 1, timeout=180,
                                    worker="by-hand", labels_prefix=True) >= 1
        # `pinfresh down` calls this: it finds the hand-started worker and drains it
        assert await asyncio.to_thread(stop_workers, pipeline.settings) == 1
        assert proc.wait(timeout=60) == 0
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


async def test_dlq_replay_reads_the_whole_topic_and_refuses_letters_past_the_tombstone_ttl(
        pipeline, catalog):
    """`dlq replay` acts on every letter (the read goes to the log's end however long it
    takes), and skips letters older than the tombstone TTL unless --force: their pin's
    delete may be forgotten, and replaying an old upsert would bring the pin back."""
    import subprocess
    import sys

    from streams.events import DeadLetter, PinEvent, Reason

    k = pipeline.settings.kafka
    now = time.time()
    fresh = [DeadLetter.build(Reason.NOT_FOUND, "gone", PinEvent.upsert(
        f"fresh-{i}", catalog[i].image, 1).to_bytes(), pin_id=f"fresh-{i}") for i in range(300)]
    ancient = [DeadLetter.build(Reason.NOT_FOUND, "gone", PinEvent.upsert(
        f"old-{i}", catalog[i].image, 1).to_bytes(), pin_id=f"old-{i}").model_copy(
            update={"failed_at": now - 8 * 24 * 3600}) for i in range(3)]
    from streams.producer import publish_raw

    await publish_raw(k, [((d.pin_id or "").encode(), d.model_dump_json().encode())
                          for d in fresh + ancient], topic=k.dlq_topic)
    letters = await pipeline.dead_letters()
    assert len(letters) == 303  # every one, in one read
    env = pipeline.settings.child_environ(os.environ)

    def replay(*extra: str) -> str:
        out = subprocess.run([sys.executable, "-m", "streams.cli", "dlq", "replay", *extra],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    dry = replay("--dry-run")
    assert "300 of 303 open dead letters selected" in dry and "skipped 3 letter(s)" in dry
    forced = replay("--dry-run", "--force")
    assert "303 of 303 open dead letters selected" in forced

    # the lifecycle: a replayed letter that fails again is still one open letter,
    # resolve and purge close letters, status counts the open ones
    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def open_keys() -> dict[str, int]:
        rows = [json.loads(line) for line in cli("dlq", "list", "--json").splitlines()]
        return {r["pin_id"]: r["copies"] for r in rows}

    assert "2 of 303 open dead letters replayed" in replay("--pin", "fresh-0", "--pin",
                                                           "fresh-1")
    assert len(open_keys()) == 301 and "fresh-0" not in open_keys()
    again = DeadLetter.build(Reason.NOT_FOUND, "gone again", fresh[0].original_bytes(),
                             pin_id="fresh-0")  # what the worker writes when it fails again
    await publish_raw(k, [(b"fresh-0", again.model_dump_json().encode())], topic=k.dlq_topic)
    opened = open_keys()
    assert len(opened) == 302 and opened["fresh-0"] == 2  # one letter, two copies
    assert (await collect_status(pipeline.settings, interval=0.1))["dlq_total"] == 302
    assert "purged 3 open dead letter(s)" in cli("dlq", "purge", "--older-than",
                                                   str(7 * 24 * 3600))
    assert len(open_keys()) == 299
    assert "resolved 299" in cli("dlq", "resolve", "--reason", "not_found")
    assert open_keys() == {}
    status = await collect_status(pipeline.settings, interval=0.1)
    assert status["dlq_total"] == 0 and status["dlq_letters_on_topic"] == 304


@pytest.mark.long(4)
async def test_a_pool_stopped_and_started_20_times_with_a_backlog_consumes_every_time(
        pipeline, catalog):
    """A 2-feeder pool drained (SIGTERM) and started again, 20 times, each time with new
    events waiting: every start consumes them, within 90 s (observed 9-23 s on the dev
    machine). Before, when the group's leader left while the group was re-forming, the
    embedded broker kept it as leader for good and a later start never consumed."""
    from tests.integration.conftest import feeder_pool

    s = pipeline.settings.model_copy(update={
        "encoder": pipeline.settings.encoder.model_copy(update={"model": "null"})})
    took = []
    for r in range(20):
        items = [replace(it, pin_id=f"restart{r}-{i}") for i, it in enumerate(catalog[:10])]
        await pipeline.publish([it.event(1) for it in items])
        t0 = time.monotonic()
        with feeder_pool(s, pipeline.logs / f"pool-{r}.log") as pool:
            meta = await pipeline.wait([it.pin_id for it in items], timeout=90)
            assert len(meta) == len(items), f"start {r} consumed nothing: {pool.log()[-3000:]}"
            took.append(round(time.monotonic() - t0, 1))
            assert pool.stop() == 0, pool.log()[-3000:]  # drained and committed
    assert len(took) == 20, took


async def test_a_pool_whose_parent_is_killed_leaves_no_children(pipeline):
    """SIGKILL of a pool's own process: its encoder process and feeders go with it (they
    kept running before, and a new pool started beside them)."""
    from tests.integration.conftest import feeder_pool

    s = pipeline.settings.model_copy(update={
        "encoder": pipeline.settings.encoder.model_copy(update={"model": "null"})})
    with feeder_pool(s, pipeline.logs / "pool.log") as pool:
        deadline = time.monotonic() + 120
        while len(pool.started("feeder")) < 2 or not pool.started("encoder"):
            assert time.monotonic() < deadline, pool.log()[-3000:]
            await asyncio.sleep(0.1)
        children = pool.started("encoder") + pool.started("feeder")
        pool.proc.send_signal(signal.SIGKILL)
        pool.proc.wait(30)

        def alive(pid: int) -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return False
            return state != "Z"

        deadline = time.monotonic() + 120
        while any(alive(p) for p in children):
            assert time.monotonic() < deadline, [p for p in children if alive(p)]
            await asyncio.sleep(0.2)
