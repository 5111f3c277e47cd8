"""Refresh: a second encoder version, dual writes, backfill, cutover, rollback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from encoder.config import EncoderSettings
from encoder.engine import ImageEncoder
from store.reader import EmbeddingReader
from store.registry import CoverageError, VersionRegistry
from streams.events import PinEvent
from streams.refresh import run_backfill
from tests.integration.conftest import feeder_pool

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def encoder_b():
    enc = ImageEncoder.load(EncoderSettings(seed=1))  # same towers, another projection
    yield enc
    enc.close()


async def _count(cache, version: str, n: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = await cache.count(version)
        if c >= n:
            return c
        await asyncio.sleep(0.2)
    return await cache.count(version)


@pytest.mark.cluster
async def test_backfill_dual_write_promote_and_rollback(pipeline, catalog, encoder, encoder_b):
    base, extra, swaps = catalog[600:660], catalog[660:680], catalog[700:705]
    pipeline.start_worker("w1")
    await pipeline.publish([it.event(1) for it in base])
    meta, letters = await pipeline.settle([it.pin_id for it in base], timeout=180)
    assert len(meta) == len(base) and not letters
    registry = VersionRegistry(pipeline.milvus, pipeline.cache)
    va = await pipeline.cache.get_live()
    assert va == encoder.version
    vb = encoder_b.version
    assert vb != va
    await registry.register(vb, encoder_b.dim, "pinfresh-effl0-minilm", None, 1)
    with pytest.raises(CoverageError, match="backfill"):
        await registry.promote(vb)
    # wait until the worker writes vb too: a probe pin becomes readable in vb
    probe = catalog[705]
    await pipeline.publish([probe.event(1)])
    deadline = time.monotonic() + 180
    while not (await pipeline.cache.get_vectors(vb, [probe.pin_id]))[1].all():
        assert time.monotonic() < deadline, "the worker never started writing vb"
        await pipeline.publish([probe.event(1)])  # a redelivery is a no-op in va
        await asyncio.sleep(0.5)

    # backfill while fresh traffic keeps coming: new pins, changed images, deletes
    settings = pipeline.settings
    backfill = asyncio.create_task(run_backfill(settings, vb, batch=16, progress=False,
                                                yield_lag=None))
    deleted = [it.pin_id for it in base[:5]]
    changed = {it.pin_id: swaps[i] for i, it in enumerate(base[5:10])}
    await pipeline.publish([it.event(1) for it in extra])
    await pipeline.publish([PinEvent.delete(p, 2) for p in deleted])
    await pipeline.publish([PinEvent.upsert(p, new.image, 2, new.caption)
                            for p, new in changed.items()])
    rep = await backfill
    assert rep.pins >= len(base) - len(deleted) and rep.dead_letters == 0
    alive = [it.pin_id for it in base[5:]] + [it.pin_id for it in extra] + [probe.pin_id]
    await pipeline.wait([it.pin_id for it in extra], timeout=300)
    await pipeline.wait(list(changed), timeout=120, min_pin_version=2)
    assert await _count(pipeline.cache, vb, len(alive)) == len(alive)

    # a reader hammering get_many across the cutover never mixes versions
    reader = EmbeddingReader(pipeline.milvus, pipeline.cache)
    truth = {v: await pipeline.milvus.get_many(v, alive) for v in (va, vb)}
    responses = []
    stop = asyncio.Event()

    async def hammer() -> None:
        while not stop.is_set():
            responses.append(await reader.get_many(alive))

    async def responses_from(version: str, n: int) -> None:
        deadline = time.monotonic() + 120
        while sum(r.version == version for r in responses) < n:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)

    task = asyncio.create_task(hammer())
    await responses_from(va, 3)  # reads before the cutover...
    cov = await registry.promote(vb)
    await responses_from(vb, 3)  # ...and after it
    stop.set()
    await task
    assert cov is not None and not cov.missing and cov.live == va
    seen = {r.version for r in responses}
    assert seen == {va, vb}, seen
    for r in responses:
        assert r.found.all()  # never a missing pin that existed before and after
        want = np.stack([truth[r.version][p].vector for p in alive])
        assert (np.einsum("ij,ij->i", r.vectors, want) >= 0.999).all()  # one version only

    # after cutover: every live pin in the new version, deletes gone everywhere,
    # vectors equal to direct calls of the new encoder
    assert await pipeline.cache.get_live() == vb
    for v in (va, vb):
        assert await pipeline.milvus.get_states(v, deleted) == {}
        assert not (await pipeline.cache.get_vectors(v, deleted))[1].any()
    images = {it.pin_id: it.image for it in base[5:] + extra + [probe]}
    images.update({p: new.image for p, new in changed.items()})
    direct = encoder_b.encode_images([Path(images[p]).read_bytes() for p in alive])
    res = await reader.get_many(alive)
    assert res.version == vb and res.found.all()
    assert all(float(a @ b) >= 0.999 for a, b in zip(res.vectors, direct, strict=True))

    # rollback restores the old version's answers exactly
    before = await reader.get_many(alive, version=va)
    assert await registry.rollback() == va
    after = await reader.get_many(alive)
    assert after.version == va and np.array_equal(after.vectors, before.vectors)
    assert await registry.rollback() == vb  # and forward again


@pytest.mark.long
async def test_killed_backfill_resumes_without_reencoding(pipeline, catalog, encoder_b):
    items = catalog[300:380]
    pipeline.start_worker("w1")
    await pipeline.publish([it.event(1) for it in items])
    meta, letters = await pipeline.settle([it.pin_id for it in items], timeout=180)
    n = len(meta)
    registry = VersionRegistry(pipeline.milvus, pipeline.cache)
    vb = encoder_b.version
    await registry.register(vb, encoder_b.dim, "pinfresh-effl0-minilm", None, 1)
    pipeline.kill_worker("w1")  # only the backfill writes the new version now

    env = pipeline.settings.child_environ(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "backfill", "--to", vb,
                             "--batch", "8", "--yield-lag", "1000000"], env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=open(pipeline.logs / "backfill.log", "wb"))
    done_at_kill = await _count(pipeline.cache, vb, 20, timeout=180)
    assert proc.poll() is None, (pipeline.logs / "backfill.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_at_kill = await pipeline.cache.count(vb)
    assert 0 < done_at_kill < n, "the kill must land midway"

    rep = await run_backfill(pipeline.settings, vb, batch=8, progress=False, yield_lag=None)
    assert await pipeline.cache.count(vb) == n
    # the rerun encodes only what was not written; with the killed run's own
    # encodes (done_at_kill + at most the batch in flight) every pin was encoded
    # at most once plus one batch
    assert rep.encoded == n - done_at_kill
    assert rep.skipped >= done_at_kill


async def _two_versions(pipeline, catalog, encoder_b, n: int = 40):
    items = catalog[100:100 + n]
    pipeline.start_worker("w1")
    await pipeline.publish([it.event(1) for it in items])
    meta, letters = await pipeline.settle([it.pin_id for it in items], timeout=240)
    assert len(meta) == n and not letters
    registry = VersionRegistry(pipeline.milvus, pipeline.cache)
    va, vb = await pipeline.cache.get_live(), encoder_b.version
    await registry.register(vb, encoder_b.dim, "pinfresh-effl0-minilm", None, 1)
    return items, registry, va, vb


async def test_promote_compares_every_pins_version_and_backfill_shards_cover_all(
        pipeline, catalog, encoder_b):
    """Coverage compares the pin version of every shared pin (a sample missed 1 % of pins
    left behind), and two backfill shards together fill the version exactly once."""
    items, registry, va, vb = await _two_versions(pipeline, catalog, encoder_b)
    pipeline.kill_worker("w1")  # only the backfills write vb now
    reps = [await run_backfill(pipeline.settings, vb, batch=8, page=7, progress=False,
                               yield_lag=None, shard=(i, 2), wait_workers_s=0)
            for i in range(2)]
    assert sum(r.pins for r in reps) == len(items) and all(r.pins for r in reps)
    assert sum(r.encoded for r in reps) == len(items)
    assert await pipeline.cache.count(vb) == len(items)
    # one pin of the new version left at an older pin version: promote refuses
    behind = items[7].pin_id
    rec = (await pipeline.cache.get_many(vb, [behind]))[behind]
    from dataclasses import replace
    await pipeline.cache.delete(vb, [behind])
    await pipeline.cache.upsert(vb, [replace(rec, pin_version=0)])
    report = await registry.coverage(vb)
    assert report.behind == [behind] and report.compared == len(items)
    with pytest.raises(CoverageError, match="older pin version"):
        await registry.promote(vb)
    # a backfill run repairs it (from Milvus, which still has v1: no encode), then
    # promote passes
    rep = await run_backfill(pipeline.settings, vb, batch=8, progress=False, yield_lag=None,
                             wait_workers_s=0)
    assert rep.encoded == 0 and (await registry.coverage(vb)).behind == []
    assert await registry.promote(vb) is not None


async def test_retire_under_a_live_stream_loses_nothing_and_leaves_no_keys(
        pipeline, catalog, encoder_b):
    """Retire is two-phase: the version leaves every worker's write set, then it is
    dropped. Events streaming meanwhile are all written to the live version, none is
    dead-lettered, and no key of the retired version survives."""
    items, registry, va, vb = await _two_versions(pipeline, catalog, encoder_b, n=20)
    probe = catalog[130]
    await pipeline.publish([probe.event(1)])
    assert await _count(pipeline.cache, vb, 1, timeout=240) >= 1  # the worker writes vb
    stream = [it for it in catalog[140:260] if "party-horn-out" not in it.pin_id]

    async def publish_slowly():
        for i in range(0, len(stream), 10):
            await pipeline.publish([it.event(1) for it in stream[i:i + 10]])
            await asyncio.sleep(0.2)

    feeder = asyncio.create_task(publish_slowly())
    clean = await registry.retire(vb, wait_s=120)
    await feeder
    assert clean
    ids = [it.pin_id for it in stream]
    meta, letters = await pipeline.settle(ids, timeout=300)
    assert len(meta) == len(ids) and not letters
    assert not await pipeline.milvus.has_version(vb)
    leftovers = [k async for k in pipeline.cache.client.scan_iter(
        match=f"{pipeline.cache.p}:{vb}:*")]
    assert leftovers == []
    log = pipeline.worker_log("w1")
    assert "internal_error" not in log and "Traceback" not in log, log[-3000:]


async def test_stale_requeue_keeps_the_metadata(pipeline, catalog):
    from streams.refresh import find_stale, requeue_stale

    it = catalog[90]
    pipeline.start_worker("w1")
    ev = PinEvent.upsert(it.pin_id, it.image, 1, caption="c", metadata={"board": "b1"})
    await pipeline.publish([ev])
    assert await pipeline.wait([it.pin_id], timeout=240)
    rows = [r for r in await find_stale(pipeline.settings, 0.0001, False)
            if r["pin_id"] == it.pin_id]
    assert rows
    assert await requeue_stale(pipeline.settings, rows) == 1
    version = await pipeline.cache.get_live()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # the re-encode rewrites the record (same version)
        m = (await pipeline.cache.get_meta(version, [it.pin_id]))[it.pin_id]
        if float(m["encode_time"]) > float(rows[0]["encode_time"]):
            break
        await asyncio.sleep(0.2)
    rec = (await pipeline.milvus.get_many(version, [it.pin_id]))[it.pin_id]
    assert rec.encode_time > float(rows[0]["encode_time"])
    assert rec.metadata == {"board": "b1"}


async def test_backfill_refuses_without_a_root_and_fails_loudly_on_dead_letters(
        pipeline, catalog, encoder_b, tmp_path):
    """A backfill of a file catalog without a catalog root dead-lettered almost every pin
    (each twice) and exited 0. Now: refused before anything is read or written; with a
    root the files are not under, one letter per pin and exit 1."""
    items, registry, va, vb = await _two_versions(pipeline, catalog, encoder_b, n=12)
    pipeline.kill_worker("w1")
    before = len(await pipeline.dead_letters())
    env = {k: v for k, v in pipeline.settings.child_environ(os.environ).items()
           if k != "PINFRESH_FETCH__CATALOG_ROOT"}
    cmd = [sys.executable, "-m", "streams.cli", "backfill", "--to", vb, "--yield-lag",
           "1000000"]
    no_root = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert no_root.returncode == 2, no_root.stderr[-2000:]
    assert "the catalog has file paths" in no_root.stderr and "--catalog-root" in no_root.stderr
    missing = subprocess.run(cmd + ["--catalog-root", str(tmp_path / "nope")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    assert await pipeline.cache.count(vb) == 0
    assert len(await pipeline.dead_letters()) == before
    # at 80 columns `versions list` shows both ids whole (cut ids looked the same)
    listed = subprocess.run([sys.executable, "-m", "streams.cli", "versions", "list"],
                            env={**env, "COLUMNS": "80"}, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and va in listed.stdout and vb in listed.stdout, listed.stdout

    wrong = subprocess.run(cmd + ["--catalog-root", str(tmp_path)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1, wrong.stderr[-2000:]
    assert f"{len(items)} pins were dead-lettered" in wrong.stderr
    letters = (await pipeline.dead_letters())[before:]
    assert sorted(d.pin_id for d in letters) == sorted(it.pin_id for it in items)
    assert {d.reason.value for d in letters} == {"forbidden_location"}


def _maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's native library mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


async def test_a_feeder_pool_writes_every_version_on_its_encoder_process(
        pipeline, catalog, encoder_b):
    """Issue 21 item 1: during a refresh (a second version registered, then backfilled)
    feeders import no torch; both versions are encoded by the pool's encoder process (the
    backfill too, through its socket), and retiring the version unloads it there."""

    from streams.runtime.stack import free_port

    items = [it for it in catalog[300:340] if "party-horn-out" not in it.pin_id]
    first, later = items[:20], items[20:]
    base_port = free_port()
    s = pipeline.settings.model_copy(update={"worker": pipeline.settings.worker.model_copy(
        update={"metrics_port": base_port, "progress_interval_s": 1.0,
                "version_release_s": 1.0})})
    with feeder_pool(s, pipeline.logs / "pool.log") as pool:
        async def encoder_versions() -> list[str]:
            reports = await pipeline.cache.encoders()
            return next(iter(reports.values()))["versions"] if reports else []

        async def until(cond, what: str, timeout: float = 240) -> None:
            deadline = time.monotonic() + timeout
            while not await cond():
                assert time.monotonic() < deadline, f"{what}: {pool.log()[-3000:]}"
                await asyncio.sleep(0.3)

        for slot in (0, 1):
            pipeline.metrics_ports[f"f{slot}"] = base_port + slot
            assert pipeline.wait_metric("pinfresh_worker_model_info", 1, timeout=300,
                                        worker=f"f{slot}", labels_prefix=True) >= 1
        await pipeline.publish([it.event(1) for it in first])
        meta, letters = await pipeline.settle([it.pin_id for it in first], timeout=240)
        assert len(meta) == len(first) and not letters
        registry = VersionRegistry(pipeline.milvus, pipeline.cache)
        va, vb = await pipeline.cache.get_live(), encoder_b.version
        await registry.register(vb, encoder_b.dim, "pinfresh-effl0-minilm", None, 1)
        # the feeders pick vb up from the registry, idle as they are: the encoder process
        # loads it, and then both versions are written
        for slot in (0, 1):
            assert pipeline.wait_metric("pinfresh_worker_model_info", 1, timeout=240,
                                        worker=f"f{slot}", labels=f'{{version="{vb}"}}') == 1
        await until(lambda: _has(encoder_versions(), vb), "vb loaded by the encoder process")
        await pipeline.publish([it.event(1) for it in later])
        assert await _count(pipeline.cache, vb, len(later), timeout=240) >= len(later)
        # the backfill through the pool's encoder process: it loads no model itself
        sock = s.stack.data_dir / "run" / "encoder-cpu.sock"
        bs = s.model_copy(update={"encoder": s.encoder.model_copy(update={"remote": sock})})
        rep = await run_backfill(bs, vb, yield_lag=None, progress=False, wait_workers_s=60)
        assert rep.encoded == len(first) and rep.dead_letters == 0
        assert await pipeline.cache.count(vb) == len(items)
        probe = [it.pin_id for it in items[::7]]
        stored = await pipeline.milvus.get_many(vb, probe)
        direct = encoder_b.encode_images([Path(it.image).read_bytes() for it in items[::7]])
        assert all(float(stored[p].vector @ v) >= 0.999
                   for p, v in zip(probe, direct, strict=True))
        # the feeders never loaded a model; the encoder process did, once per version
        feeders, encoders = pool.started("feeder"), pool.started("encoder")
        assert len(feeders) == 2 and len(encoders) == 1
        assert not any(_maps_torch(pid) for pid in feeders)
        assert _maps_torch(encoders[0])
        log_text = pool.log()
        assert log_text.count(f"loading version {vb}") == 1, log_text[-3000:]
        # retired: it leaves the write set and the encoder process unloads it
        assert await registry.retire(vb, wait_s=120)
        await until(lambda: _equals(encoder_versions(), [va]), "vb unloaded")
        assert f"unloading version {vb}" in pool.log()
        assert pool.stop() == 0, pool.log()[-3000:]


async def _has(versions, v: str) -> bool:
    return v in await versions


async def _equals(versions, want: list[str]) -> bool:
    return await versions == want


@pytest.mark.long
async def test_a_retired_version_stays_retired_when_workers_restart(
        pipeline, catalog, encoder_b):
    """After `promote vb` and `retire va`, a worker started with its default settings
    (va's encoder) writes vb only: va is not registered again, its collection is not
    recreated, and the worker says why in one line. `versions create` brings va back."""
    items, registry, va, vb = await _two_versions(pipeline, catalog, encoder_b, n=12)
    await run_backfill(pipeline.settings, vb, batch=8, progress=False, yield_lag=None)
    assert await registry.promote(vb) is not None
    assert await registry.retire(va, wait_s=120)
    pipeline.kill_worker("w1", signal.SIGTERM)
    pipeline.start_worker("w2")  # default settings: the encoder of the retired va
    fresh = catalog[200:206]
    await pipeline.publish([it.event(1) for it in fresh])
    meta, letters = await pipeline.settle([it.pin_id for it in fresh], timeout=240)
    assert len(meta) == len(fresh) and not letters
    assert va not in await pipeline.cache.versions()
    assert not await pipeline.milvus.has_version(va)
    assert (await pipeline.cache.get_vectors(vb, [it.pin_id for it in fresh]))[1].all()
    log = pipeline.worker_log("w2")
    assert log.count(f"this worker's encoder is version {va}, retired") == 1, log[-3000:]
    # an explicit `versions create` registers it again, as building
    await registry.register(va, encoder_b.dim, "pinfresh-effl0-minilm", None, 0)
    assert (await registry.get(va)).state == "building"
    assert va not in await pipeline.cache.retired()
