"""Faults and hostile input against real workers on the real embedded stack.

Each test records a ``case``/``outcome`` row; ``make faults`` runs this file
and writes the table to ``bench/results/faults.json``.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from store.verify import verify_cache
from streams.events import PinEvent, Reason
from streams.producer import publish_raw
from streams.runtime.status import collect_status
from tests.integration.conftest import feeder_pool

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]


def _png(color=(200, 40, 40), size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


async def _aof_synced(url: str) -> None:
    """Block until Valkey's AOF is fsynced past every write made so far (every node).

    WAITAOF waits for this connection's own writes; the AOF is one file
    appended in order, so once a write made now is on disk, so is every
    earlier write of the workers. On a cluster each master gets a marker key
    in a slot it owns.
    """
    import redis.asyncio as aioredis

    from store.redis import CLUSTER_SCHEMES, as_text, slot_tag

    if url.startswith(CLUSTER_SCHEMES):
        from redis.asyncio.cluster import RedisCluster

        rc = RedisCluster.from_url(url.replace("+cluster", "", 1))
        try:
            slots = await rc.execute_command("CLUSTER SLOTS")  # {(lo, hi): {"primary": ...}}
            nodes = [(lo, *v["primary"][:2]) for (lo, _hi), v in slots.items()]
        finally:
            await rc.aclose()
    else:
        nodes = [(None, None, None)]
    for slot, host, port in nodes:
        r = (aioredis.Redis.from_url(url) if slot is None
             else aioredis.Redis(host=as_text(host), port=int(port)))
        try:
            tag = "" if slot is None else "{" + slot_tag(int(slot)) + "}"
            await r.set(f"pinfresh:test:aof-marker:{tag}", "1")
            local, _ = await r.execute_command("WAITAOF", 1, 0, 30_000)
            assert int(local) == 1, "AOF not fsynced within 30 s"
        finally:
            await r.aclose()


async def _stores_agree(p, version: str) -> None:
    rep = await verify_cache(p.milvus, p.cache, version)
    assert rep.ok, rep


# ----------------------------------------------------------- crash points
@pytest.mark.parametrize("point", ["after_encode", "after_milvus", "after_redis"])
async def test_sigkill_between_side_effects(pipeline, catalog, encoder, point, fault_case):
    items = catalog[400:440]
    ids = [it.pin_id for it in items]
    w1 = pipeline.start_worker("w1", crash_at=point)
    await pipeline.publish([it.event(1) for it in items])
    assert w1.wait(timeout=180) == -9, "the worker should have killed itself"
    pipeline.procs.pop("w1")
    version = await pipeline.cache.get_live()
    in_milvus = await pipeline.milvus.count(version)
    in_cache = await pipeline.cache.count(version)
    expected = {"after_encode": (0, 0), "after_milvus": (in_milvus, 0),
                "after_redis": (in_milvus, in_milvus)}[point]
    assert (in_milvus, in_cache) == expected and (point == "after_encode" or in_milvus > 0)

    pipeline.start_worker("w2")
    meta = await pipeline.wait(ids, timeout=180)
    assert len(meta) == len(ids)
    assert await pipeline.milvus.count(version) == len(ids)
    await _stores_agree(pipeline, version)
    # a batch written to Milvus before the crash is not encoded again
    encoded = pipeline.wait_metric("pinfresh_images_encoded_total", len(ids) - in_milvus,
                                   worker="w2")
    assert encoded == len(ids) - in_milvus
    direct = encoder.encode_images([Path(it.image).read_bytes() for it in items])
    stored = await pipeline.milvus.get_many(version, ids)
    assert all(float(stored[it.pin_id].vector @ d) >= 0.999 for it, d in zip(items, direct,
                                                                             strict=True))
    fault_case.add(f"kill point: SIGKILL {point}",
                   "a restarted worker serves every pin once, stores agree, only pins not "
                   "in Milvus are encoded again",
                   f"{in_milvus} in Milvus / {in_cache} in Redis at death; after restart "
                   f"{len(ids)}/{len(ids)} servable once, stores agree, {int(encoded)} "
                   "re-encoded")


async def test_kill_one_of_two_workers(pipeline, catalog, fault_case):
    items = catalog[440:640]
    ids = [it.pin_id for it in items]
    pipeline.start_worker("w1")
    pipeline.start_worker("w2")
    for w in ("w1", "w2"):  # both agents started (joined the group)
        assert pipeline.wait_metric("pinfresh_worker_model_info", 1, timeout=180, worker=w,
                                    labels_prefix=True) >= 1
    await pipeline.publish([it.event(1) for it in items])
    version = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        version = await pipeline.cache.get_live()
        if version and await pipeline.cache.count(version) >= 40:
            break
        await asyncio.sleep(0.1)
    w1_written = pipeline.metric("pinfresh_events_total", "w1", '{outcome="written"}')
    pipeline.kill_worker("w1")
    meta, letters = await pipeline.settle(ids, timeout=300)
    assert len(meta) + len(letters) == len(ids)
    rows = await pipeline.milvus.iter_pins(version)
    assert sorted(r["pin_id"] for r in rows) == sorted(meta)
    await _stores_agree(pipeline, version)
    # no pin written twice: the survivor skips what w1 wrote (w1 may finish a batch
    # between the metric read and the kill: those pins are counted by neither)
    w2_written = pipeline.metric("pinfresh_events_total", "w2", '{outcome="written"}')
    w = pipeline.settings.worker
    assert len(meta) - w.batch_size * w.batches_in_flight <= w1_written + w2_written \
        <= len(meta)
    fault_case.add("kill point: one of two workers SIGKILLed mid-stream",
                   "the survivor takes over; every pin servable once or dead-lettered",
                   f"{len(meta)} servable once, {len(letters)} dead-lettered, stores agree")


# ------------------------------------------------------ backend outages
@pytest.mark.long
@pytest.mark.parametrize(("private_pipeline", "service", "node"),
                         [(0, "redis", 0), (0, "milvus", 0), (3, "redis", 1)], indirect=[
                             "private_pipeline"], ids=["redis", "milvus", "redis-cluster-node"])
async def test_backend_down_then_back(private_pipeline, catalog, service, node, fault_case):
    """A backend SIGKILLed mid-stream, then restarted from its own data.

    ``redis-cluster-node``: one master of a 3-master Valkey Cluster (no
    replicas) dies; its slots fail, the other two keep serving, and after the
    restart it rejoins with its AOF.
    """
    p = private_pipeline
    first, second = catalog[0:20], catalog[20:40]
    p.start_worker("w1", retry_backoff_s=0.2, retry_backoff_max_s=1.0)
    await p.publish([it.event(1) for it in first])
    assert len(await p.wait([it.pin_id for it in first], timeout=180)) == 20
    version = await p.cache.get_live()
    await _aof_synced(p.settings.redis.url)  # the first 20 pins are on disk before the kill
    p.stack.kill_service(service, node)
    await p.publish([it.event(1) for it in second])
    # the worker's first call to a dead Redis may be its registry read (the write set)
    stages = ("redis", "registry") if service == "redis" else ("milvus",)

    def retried() -> float:
        try:
            return sum(p.metric("pinfresh_retries_total", "w1", f'{{stage="{st}"}}')
                       for st in stages)
        except Exception:  # noqa: BLE001 - the metrics endpoint is busy; ask again
            return 0.0

    deadline = time.monotonic() + 120
    while (retries := retried()) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert retries >= 3
    p.stack.start_service(service, node)
    ids = [it.pin_id for it in first + second]
    meta = await p.wait(ids, timeout=120)
    assert len(meta) == 40
    assert await p.milvus.count(version) == 40
    await _stores_agree(p, version)
    what = f"Valkey Cluster master {node} of 3" if p.settings.redis.url.startswith(
        "redis+cluster") else service
    fault_case.add(f"outage: {what} SIGKILLed, then restarted",
                   "the stream pauses with capped backoff and resumes; nothing lost",
                   f"worker retried {int(retries)}+ times, then all 40 servable and stores "
                   "agree after restart")


@pytest.mark.long
async def test_broker_sigkilled_keeps_its_log(private_pipeline, catalog, fault_case):
    """The embedded broker SIGKILLed with events not yet consumed, then restarted.

    Its log is files (`streams.runtime.broker`): the unconsumed events, the
    dead letters and the group's committed offsets are all there afterwards.
    """
    p = private_pipeline
    first, second = catalog[40:60], catalog[60:100]
    p.start_worker("w1", retry_backoff_s=0.2, retry_backoff_max_s=1.0)
    await p.publish([it.event(1) for it in first])
    await p.publish_raw([(b"not-json", b"{this is not an event")])
    meta, letters = await p.settle([it.pin_id for it in first] + ["not-json"], timeout=180)
    assert len(meta) == 20 and set(letters) == {"not-json"}
    version = await p.cache.get_live()
    p.kill_worker("w1", signal.SIGTERM)  # drains and commits; the next events wait in the log
    await p.publish([it.event(1) for it in second])
    p.stack.kill_service("kafka")
    p.stack.start_service("kafka")
    letters_after = [dl.pin_id for dl in await p.dead_letters()]
    assert letters_after == ["not-json"], letters_after  # listed, one copy
    p.start_worker("w1", retry_backoff_s=0.2, retry_backoff_max_s=1.0)
    ids = [it.pin_id for it in first + second]
    meta = await p.wait(ids, timeout=180)
    assert len(meta) == 60
    assert await p.milvus.count(version) == 60
    await _stores_agree(p, version)
    # the restarted worker resumed from the committed offsets: the first 20 were not
    # consumed again
    written = p.wait_metric("pinfresh_events_total", len(second), labels='{outcome="written"}')
    consumed = sum(p.metric("pinfresh_events_total", "w1", f'{{outcome="{o}"}}')
                   for o in ("written", "skipped", "deleted", "dead_letter"))
    assert written == consumed == len(second), (written, consumed)
    assert [dl.pin_id for dl in await p.dead_letters()] == ["not-json"]
    fault_case.add("outage: the embedded broker SIGKILLed with 40 events unconsumed, "
                   "then restarted",
                   "its log is on disk: nothing lost, nothing consumed twice, dead letters kept",
                   f"all 60 servable, stores agree, the restarted worker consumed "
                   f"{int(consumed)} events (the 40 waiting), 1 dead letter listed before and "
                   "after")


# ------------------------------------------------------ hostile servers
class _ImageServer:
    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.fixed = False
        png = _png()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path == "/hang":
                    time.sleep(20)  # far past the fetch timeout
                    return
                if self.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    for b in png:  # one byte every 50 ms: 7.75 s, never in time
                        self.wfile.write(bytes([b]))
                        time.sleep(0.05)
                    return
                if self.path == "/500" and not server.fixed:
                    self.send_error(500)
                    return
                if self.path == "/flaky" and server.hits[self.path] == 1:
                    self.send_error(503)
                    return
                if self.path == "/html":
                    body = b"<html><body>not an image</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path == "/redirect-internal":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()


async def test_slow_hanging_and_failing_image_servers(pipeline, fault_case):
    srv = _ImageServer()
    try:
        # a timeout that a loaded machine's local fetches stay well inside (with 1 s, a
        # redirect's first fetch once timed out under CPU load and took 2 attempts)
        pipeline.settings = pipeline.settings.model_copy(update={
            "fetch": pipeline.settings.fetch.model_copy(update={
                "timeout_s": 3.0, "allowed_hosts": ["127.0.0.1"]})})
        pipeline.start_worker("w1", retry_backoff_s=0.1, fetch_attempts=3)
        cases = {"img-ok": "/ok", "img-hang": "/hang", "img-slow": "/slow", "img-500": "/500",
                 "img-flaky": "/flaky", "img-html": "/html",
                 "img-redirect": "/redirect-internal"}
        await pipeline.publish([PinEvent.upsert(pid, srv.url(path), 1)
                                for pid, path in cases.items()])
        meta, letters = await pipeline.settle(list(cases), timeout=300)
        assert set(meta) == {"img-ok", "img-flaky"}
        reasons = {pid: (dl.reason, dl.attempts) for pid, dl in letters.items()}
        expected = {
            "img-hang": (Reason.FETCH_FAILED, 3), "img-slow": (Reason.FETCH_FAILED, 3),
            "img-500": (Reason.FETCH_FAILED, 3), "img-html": (Reason.NOT_AN_IMAGE, 1),
            "img-redirect": (Reason.FORBIDDEN_LOCATION, 1),
        }
        for pid, path in cases.items():
            want = ("encoded" if pid not in expected
                    else f"{expected[pid][0].value} after {expected[pid][1]} attempt(s)")
            got = ("encoded" if pid in meta else
                   f"{reasons[pid][0].value} after {reasons[pid][1]} attempt(s)"
                   if pid in reasons else "missing")
            fault_case.add(f"image server: {path}", want, got, ok=want == got)
        assert reasons == expected

        srv.fixed = True  # the operator fixes the image server, then replays
        from click.testing import CliRunner

        from streams.cli import cli

        env = pipeline.settings.to_env()  # the test's broker, Redis (letter marks), topics
        res = await asyncio.to_thread(CliRunner().invoke, cli,
                                      ["dlq", "replay", "--pin", "img-500"], env=env)
        assert res.exit_code == 0, res.output
        assert "1 of 5 open dead letters replayed" in res.output
        assert await pipeline.wait(["img-500"], timeout=180)
        fault_case.add("dlq replay after the image server is fixed",
                       "the replayed pin becomes servable", "servable")
    finally:
        srv.close()


# ------------------------------------------------------ hostile images
def _hostile_files(root: Path) -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected dead-letter reason or None if it must encode)."""
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 200, 30)).save(jpeg, format="JPEG")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    gif = io.BytesIO()
    frames = [Image.new("RGB", (60, 60), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    cmyk = io.BytesIO()
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    png16 = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(
        png16, format="PNG")
    rgba = io.BytesIO()
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(rgba, format="PNG")
    return {
        "truncated.jpg": (jpeg.getvalue()[:400], Reason.DECODE_FAILED),
        "corrupt.png": (_png()[:30] + b"\x00" * 200, Reason.DECODE_FAILED),
        "empty.jpg": (b"", Reason.NOT_AN_IMAGE),
        "bomb.png": (bomb.getvalue(), Reason.TOO_MANY_PIXELS),
        "one-pixel.png": (_png(size=(1, 1)), Reason.IMAGE_TOO_SMALL),
        "vector.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                       Reason.NOT_AN_IMAGE),
        "page.jpg": (b"<html>hello</html>", Reason.NOT_AN_IMAGE),
        "huge.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * (3 * 1024 * 1024), Reason.TOO_LARGE),
        "wide.png": (_png(size=(4000, 9)), None),
        "animated.gif": (gif.getvalue(), None),
        "cmyk.jpg": (cmyk.getvalue(), None),
        "sixteen-bit.png": (png16.getvalue(), None),
        "transparent.png": (rgba.getvalue(), None),
    }


async def test_hostile_images_and_events(pipeline, tmp_path, fault_case):
    root = tmp_path / "catalog"
    root.mkdir()
    files = _hostile_files(root)
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    pipeline.settings = pipeline.settings.model_copy(update={
        "fetch": pipeline.settings.fetch.model_copy(update={
            "catalog_root": root, "max_bytes": 2 * 1024 * 1024})})
    pipeline.start_worker("w1")
    events = [PinEvent.upsert(f"h-{name.replace('.', '-')}", str(root / name), 1)
              for name in files]
    events.append(PinEvent.upsert("h-outside-root", "/etc/hostname", 1))
    events.append(PinEvent.upsert("h-file-url", "file:///etc/passwd", 1))
    await pipeline.publish(events)
    bad_events = [
        (b"e-1", b"\xff\xfe\x00garbage"),
        (b"e-2", b'{"op": "explode", "pin_id": "e-2", "version": 1, "event_time": 1}'),
        (b"e-3", b'{"op": "upsert", "pin_id": "e 3", "version": 1, "event_time": 1, '
                 b'"image": "/x.png"}'),
        (b"e-4", b'{"op": "upsert", "pin_id": "e-4", "version": "1", "event_time": 1, '
                 b'"image": "/x.png"}'),
        (b"e-5", b'{"op": "upsert", "pin_id": "e-5", "version": 1, "event_time": 1, '
                 b'"image": "/x.png", "caption": "' + b"x" * 5000 + b'"}'),
    ]
    await publish_raw(pipeline.settings.kafka, bad_events)
    ids = [e.pin_id for e in events] + [k.decode() for k, _ in bad_events]
    meta, letters = await pipeline.settle(ids, timeout=180)
    assert len(meta) + len(letters) == len(ids)
    expected = {f"h-{n.replace('.', '-')}": r for n, (_, r) in files.items()}
    expected.update({"h-outside-root": Reason.FORBIDDEN_LOCATION,
                     "h-file-url": Reason.FORBIDDEN_LOCATION})
    expected.update({k.decode(): Reason.MALFORMED_EVENT for k, _ in bad_events})
    got = {pid: (letters[pid].reason if pid in letters else None) for pid in ids}
    labels = {f"h-{n.replace('.', '-')}": f"hostile file: {n}" for n in files}
    labels.update({"h-outside-root": "path outside the catalog root (/etc/hostname)",
                   "h-file-url": "file:// URL outside the root (/etc/passwd)",
                   "e-1": "malformed event: not JSON", "e-2": "malformed event: unknown op",
                   "e-3": "malformed event: bad pin id", "e-4": "malformed event: version "
                   "as a string", "e-5": "malformed event: caption over 4000 chars"})
    for pid in ids:
        want = expected[pid].value if expected[pid] else "encoded"
        seen = got[pid].value if got[pid] else ("encoded" if pid in meta else "missing")
        fault_case.add(labels[pid], want, seen, ok=want == seen)
    assert got == expected
    assert pipeline.procs["w1"].poll() is None  # the worker is still running


def _memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak since the last reset) of a process, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


async def test_decoding_stays_within_its_memory_budget(pipeline, catalog, tmp_path, fault_case):
    """Hostile images that are small files and huge decodes go through a real worker with
    one decode thread: its peak memory grows by less than its documented budget
    (`PINFRESH_ENCODER__MAX_DECODE_MIB`, 256 MiB, per decode thread, plus 64 MiB), and the
    one over the budget is dead-lettered before it is decoded."""
    root = tmp_path / "deep"
    root.mkdir()
    grey16 = np.zeros((6000, 6000), np.uint16)  # 36 MP at 16 bits: 80 KiB as a PNG
    grey16[::7, ::5] = 60000
    Image.fromarray(grey16).save(root / "grey16.png", "PNG", compress_level=9)
    alpha = np.zeros((4000, 6000, 4), np.uint8)  # 24 MP RGBA: 199 MiB to decode
    alpha[::9, ::7] = (200, 10, 10, 120)
    Image.fromarray(alpha, "RGBA").save(root / "alpha.png", "PNG", compress_level=9)
    Image.new("RGBA", (6000, 6000), (0, 0, 255, 40)).save(root / "over.png", "PNG")  # 291 MiB
    for item in catalog[:16]:  # warm-up images, under the same root
        (root / Path(item.image).name).write_bytes(Path(item.image).read_bytes())
    pipeline.settings = pipeline.settings.model_copy(update={
        "fetch": pipeline.settings.fetch.model_copy(update={"catalog_root": root}),
        "encoder": pipeline.settings.encoder.model_copy(update={"prepare_workers": 1})})
    proc = pipeline.start_worker("w1")
    warm = [PinEvent.upsert(f"warm-{i}", str(root / Path(it.image).name), 1)
            for i, it in enumerate(catalog[:16])]
    await pipeline.publish(warm)
    assert len(await pipeline.wait([e.pin_id for e in warm], timeout=180)) == 16
    try:
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS from here
    except OSError as exc:  # a kernel or sandbox without it: nothing to measure against
        pytest.skip(f"cannot reset the peak RSS: {exc}")
    before = _memory_mib(proc.pid)
    deep = [PinEvent.upsert(f"deep-{n}", str(root / f"{n}.png"), 1)
            for n in ("grey16", "alpha", "over")]
    await pipeline.publish(deep)
    meta, letters = await pipeline.settle([e.pin_id for e in deep], timeout=300)
    after = _memory_mib(proc.pid)
    grew = after["VmHWM"] - before["VmRSS"]
    assert set(meta) == {"deep-grey16", "deep-alpha"}
    assert letters["deep-over"].reason == Reason.TOO_MANY_PIXELS
    assert "6000x6000 RGBA would take about 291 MiB to decode > limit 256 MiB" in \
        letters["deep-over"].error
    fault_case.add("36 MP 16-bit PNG + 24 MP RGBA PNG through a worker (1 decode thread)",
                   "peak RSS grows < 320 MiB", f"grew {grew:.0f} MiB", ok=grew < 320)
    fault_case.add("36 MP RGBA PNG (291 MiB to decode)", "too_many_pixels, not decoded",
                   letters["deep-over"].reason.value)
    print(f"decode memory: peak RSS grew {grew:.0f} MiB")
    assert grew < 256 + 64, (before, after)


@pytest.mark.cluster
async def test_verify_detects_and_repairs_a_corrupted_cache(pipeline, catalog, fault_case):
    items = catalog[40:60]
    pipeline.start_worker("w1")
    await pipeline.publish([it.event(1) for it in items])
    assert len(await pipeline.wait([it.pin_id for it in items], timeout=180)) == 20
    version = await pipeline.cache.get_live()
    a, b, c = (it.pin_id for it in items[:3])
    await pipeline.cache.delete(version, [a])                          # missing
    r = pipeline.cache._r
    await r.hset(pipeline.cache.meta_key(version, b), "pin_version", 99)  # stale
    other = (await pipeline.cache.get_vectors(version, [items[5].pin_id]))[0][0]
    await r.set(pipeline.cache.vec_key(version, c), other.astype("<f2").tobytes())  # wrong
    ghost = (await pipeline.milvus.get_many(version, [items[6].pin_id]))[items[6].pin_id]
    from dataclasses import replace

    await pipeline.cache.upsert(version, [replace(ghost, pin_id="ghost-pin")])     # extra
    rep = await verify_cache(pipeline.milvus, pipeline.cache, version)
    assert (rep.missing_in_cache, rep.stale_in_cache, rep.vector_mismatch,
            rep.extra_in_cache) == ([a], [b], [c], ["ghost-pin"])
    fixed = await verify_cache(pipeline.milvus, pipeline.cache, version, repair=True)
    assert fixed.repaired == 4
    assert (await verify_cache(pipeline.milvus, pipeline.cache, version)).ok
    for kind, pid in (("missing", a), ("stale", b), ("wrong vector", c), ("extra", "ghost-pin")):
        fault_case.add(f"cache corruption: {kind} entry", "verify finds it, repair fixes it",
                       f"found {pid}; repaired (re-verify clean)")


# ------------------------------------------------------ poison events
async def test_poison_events_do_not_stop_the_stream(pipeline, catalog, fault_case):
    import hashlib

    before, after = catalog[700:710], catalog[710:720]
    pipeline.start_worker("w1", raise_for_pin="bug-pin")
    await pipeline.publish([it.event(1) for it in before])
    now = int(time.time())
    big = (b'{"op": "upsert", "pin_id": "big-caption", "version": 1, "event_time": '
           + str(now).encode() + b', "image": "/x.png", "caption": "'
           + b"x" * 1_000_000 + b'"}')
    binary = bytes([0xFF, 0xFE]) * 400_000  # 800 kB, not UTF-8
    bug = PinEvent.upsert("bug-pin", catalog[720].image, 1)
    await publish_raw(pipeline.settings.kafka, [(b"big-caption", big), (b"non-utf8", binary),
                                                (b"bug-pin", bug.to_bytes())])
    await pipeline.publish([it.event(1) for it in after])
    ids = [it.pin_id for it in before + after]
    poison = ["big-caption", "non-utf8", "bug-pin"]
    meta, letters = await pipeline.settle(ids + poison, timeout=300)
    assert set(meta) == set(ids), "events after the poison ones must be applied"
    assert set(letters) == set(poison)
    per_pin = {}
    for dl in await pipeline.dead_letters():
        per_pin[dl.pin_id] = per_pin.get(dl.pin_id, 0) + 1
    dup = {p: n for p, n in per_pin.items() if n != 1}
    cases = {
        "big-caption": ("oversized event (10^6-byte caption)", big, Reason.MALFORMED_EVENT),
        "non-utf8": ("800 kB event that is not UTF-8", binary, Reason.MALFORMED_EVENT),
        "bug-pin": ("injected bug: processing the pin raises", bug.to_bytes(),
                    Reason.INTERNAL_ERROR),
    }
    for pid, (label, raw, reason) in cases.items():
        dl = letters[pid]
        ok = (dl.reason is reason and dl.original_size == len(raw)
              and dl.original_sha256 == hashlib.sha256(raw).hexdigest()
              and per_pin.get(pid) == 1)
        if reason is Reason.INTERNAL_ERROR:
            ok = ok and dl.attempts == 3 and "fault injection" in (dl.traceback or "") \
                and dl.replayable and json.loads(dl.original_bytes())["pin_id"] == pid
        else:
            ok = ok and dl.original_truncated
        fault_case.add(label, f"one {reason.value} dead letter (bounded, with size and "
                       "sha256); later events applied",
                       f"{per_pin.get(pid)} x {dl.reason.value}, {len(dl.model_dump_json())} "
                       f"bytes on the wire for a {len(raw)}-byte event, attempts "
                       f"{dl.attempts}; {len(meta)}/{len(ids)} other pins applied", ok=ok)
        assert ok, dl.model_dump_json()[:2000]
    assert not dup, f"dead letters written more than once: {dup}"
    assert pipeline.procs["w1"].poll() is None


# ------------------------------------------------- feeders and the encoder process
async def test_feeders_share_one_encoder_process_and_survive_kills(pipeline, catalog,
                                                                   fault_case):
    import os
    import signal

    from streams.runtime.stack import free_port

    items = catalog[100:220]
    ids = [it.pin_id for it in items]
    base_port = free_port()
    s = pipeline.settings.model_copy(update={
        "worker": pipeline.settings.worker.model_copy(update={"metrics_port": base_port})})
    with feeder_pool(s, pipeline.logs / "pool.log") as pool:
        for slot in (0, 1):  # the feeders' agents run (their encoder process answered)
            pipeline.metrics_ports[f"f{slot}"] = base_port + slot
            assert pipeline.wait_metric("pinfresh_worker_model_info", 1, timeout=300,
                                        worker=f"f{slot}", labels_prefix=True) >= 1, \
                pool.log()[-3000:]
        await pipeline.publish([it.event(1) for it in items])
        version = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            version = await pipeline.cache.get_live()
            if version and await pipeline.cache.count(version) >= 20:
                break
            await asyncio.sleep(0.1)
        encoders = pool.started("encoder")
        os.kill(encoders[-1], signal.SIGKILL)  # the encoder process, mid-stream
        deadline = time.monotonic() + 300
        while len(pool.started("encoder")) < 2:  # the pool restarts it
            assert time.monotonic() < deadline, pool.log()[-3000:]
            await asyncio.sleep(0.2)
        os.kill(pool.started("feeder")[0], signal.SIGKILL)  # and one feeder
        meta = await pipeline.wait(ids, timeout=400)
        assert len(meta) == len(ids), pool.log()[-3000:]
        rows = await pipeline.milvus.iter_pins(version)
        assert sorted(r["pin_id"] for r in rows) == sorted(ids)  # none lost, none twice
        await _stores_agree(pipeline, version)
        direct = {it.pin_id: v for it, v in zip(
            items[:10], ImageEncoderForCheck.encode([it.image for it in items[:10]]),
            strict=True)}
        stored = await pipeline.milvus.get_many(version, list(direct))
        assert all(float(stored[p].vector @ v) >= 0.999 for p, v in direct.items())
        for case in ("kill point: SIGKILL the encoder process mid-stream",
                     "kill point: SIGKILL one of two feeders"):
            fault_case.add(case, "the pool restarts it; every pin servable once, stores agree",
                           f"{len(meta)}/{len(ids)} servable once, stores agree, vectors equal "
                           "the in-process encoder's")
        # the restarted encoder process: its metrics (on the port after the feeders') and
        # its report in `status`
        pipeline.metrics_ports["enc"] = base_port + 2
        assert pipeline.wait_metric("pinfresh_encoder_images_total", 1, worker="enc",
                                    timeout=120) >= 1
        assert pipeline.wait_metric("pinfresh_encoder_feeders", 2, worker="enc",
                                    timeout=120) == 2  # the restarted feeder reconnected
        deadline = time.monotonic() + 120
        while True:
            st = await collect_status(pipeline.settings, interval=0.1)
            enc = next(iter((st["encoders"] or {}).values()), None)
            if enc and enc["state"] == "ok" and enc["images_total"] and enc["feeders"] == 2:
                break
            assert time.monotonic() < deadline, st["encoders"]
            await asyncio.sleep(0.5)
        assert enc["device"] == "cpu" and enc["version"] == version
        assert pool.stop() == 0, pool.log()[-3000:]
        # stopped on purpose: its report is gone, not left to read as "down"
        assert await pipeline.cache.encoders() == {}


class ImageEncoderForCheck:
    """The in-process CPU encoder, to check what the encoder process wrote."""

    @staticmethod
    def encode(paths: list[str]) -> list[np.ndarray]:
        from encoder.config import EncoderSettings
        from encoder.engine import ImageEncoder

        enc = ImageEncoder.load(EncoderSettings(device="cpu"))
        try:
            return enc.encode_images([Path(p).read_bytes() for p in paths])
        finally:
            enc.close()
