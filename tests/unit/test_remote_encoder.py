"""The encoder process and its feeders' client, over a real Unix socket (CPU model)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from encoder.config import EncoderSettings
from encoder.engine import ImageEncoder
from encoder.errors import ConfigError, EncoderUnavailable, ImageError, Reason
from encoder.null import NullEncoder
from encoder.remote import RemoteEncoder, decode_request, encode_request, frame, split_by_bytes
from encoder.server import EncoderServer
from tests.unit.test_prepare_paths import jpeg, photo, png


def _serve(tmp_path_factory, **settings):
    enc = ImageEncoder.load(EncoderSettings(device="cpu", **settings))
    path = tmp_path_factory.mktemp("sock") / "enc.sock"
    server = EncoderServer(enc, path)
    ready = threading.Event()
    t = threading.Thread(target=server.serve_forever, args=(ready,), daemon=True)
    t.start()
    assert ready.wait(30)
    return enc, server, path, t


def _stop(enc, server, t):
    server.stop()
    t.join(10)
    enc.close()


# one xdist process starts the module's encoder servers once
pytestmark = pytest.mark.xdist_group("remote_encoder")


@pytest.fixture(scope="module", params=["pil", "tensor"])
def served(request, tmp_path_factory):
    """An encoder process in a thread: ``pil`` makes feeders decode, ``tensor`` decodes here."""
    enc, server, path, t = _serve(tmp_path_factory, prepare=request.param, batch_size=8)
    yield enc, server, path
    _stop(enc, server, t)


@pytest.fixture(params=["pil", "tensor"])
def patient(request, tmp_path_factory):
    """An encoder whose batch of 12 waits up to 10 s to fill: batching does not race the clock."""
    enc, server, path, t = _serve(tmp_path_factory, prepare=request.param, batch_size=12,
                                  max_wait_s=10.0)
    yield enc, server, path
    _stop(enc, server, t)


def test_request_frames_round_trip():
    items = [(0, b"abc"), (1, bytes(12)), (0, b"")]
    buf = b"".join(encode_request(7, items))
    req_id, got = decode_request(memoryview(buf)[4:])
    assert req_id == 7 and [(k, bytes(b)) for k, b in got] == items


async def test_remote_vectors_equal_in_process_ones(served):
    enc, server, path = served
    items = [jpeg(photo(s)) for s in range(5)] + [png(photo(7, 120, 90)), b"junk"]
    direct = enc.encode_images(items)
    remote = RemoteEncoder(path)
    hello = await remote.connect(wait_s=10)
    assert hello.decode == ("server" if enc.prepare_kind == "tensor" else "client")
    assert remote.version == enc.version and remote.dim == enc.dim
    got = await remote.encode_images_async(items)
    assert isinstance(got[6], ImageError) and got[6].reason is Reason.NOT_AN_IMAGE
    for a, b in zip(direct[:6], got[:6], strict=True):
        assert float(a @ b) >= 0.9999
    await remote.close()


async def test_many_feeders_share_batches(patient):
    enc, server, path = patient
    feeders = [RemoteEncoder(path) for _ in range(4)]
    for f in feeders:
        await f.connect(wait_s=10)
    before = enc.pipeline_stats.batches
    calls = [f.encode_images_async([jpeg(photo(s + 10 * i)) for s in range(3)])
             for i, f in enumerate(feeders)]
    results = await asyncio.gather(*calls)
    assert all(isinstance(v, np.ndarray) for r in results for v in r)
    # 12 images from 4 feeders, batch 12: one full batch, however the requests
    # were spread in time (the batch would wait 10 s for them)
    stats = enc.pipeline_stats
    assert stats.batches - before == 1 and stats.batch_sizes[-1] == 12
    for f in feeders:
        await f.close()


async def test_a_missing_encoder_is_an_outage_not_an_image_error(tmp_path):
    remote = RemoteEncoder(tmp_path / "nobody.sock", connect_timeout_s=1)
    with pytest.raises(EncoderUnavailable):
        await remote.connect(wait_s=0)
    with pytest.raises(EncoderUnavailable):
        await remote.encode_images_async([b"x"])


# ---------------------------------------------------- nothing hangs, nothing too big
class _Broken(NullEncoder):
    """A device that fails every batch (a sticky CUDA error) until ``healed``; with
    ``one_batch`` every request's items are in the same failed batch (one exception)."""

    healed = False
    one_batch: BaseException | None = None

    def submit(self, items):
        if self.healed:
            return super().submit(items)
        exc = self.one_batch or RuntimeError("CUDA error: an illegal memory access")
        out = []
        for _ in items:
            fut = Future()
            fut.set_exception(exc)
            out.append(fut)
        return out


class _Slow(NullEncoder):
    """Answers each request ``delay`` seconds after the previous one (a busy encoder)."""

    delay = 0.5

    def submit(self, items):
        time.sleep(self.delay)
        return super().submit(items)


def _serve_null(path, encoder=None, **kw):
    server = EncoderServer(encoder or NullEncoder(dim=8), path, **kw)
    ready = threading.Event()
    t = threading.Thread(target=server.serve_forever, args=(ready,), daemon=True)
    t.start()
    assert ready.wait(30)
    return server, t


@contextlib.asynccontextmanager
async def _serving_null(path, encoder, remote):
    """An encoder process at ``path`` for ``remote``; closes both after."""
    server, t = _serve_null(path, encoder)
    try:
        yield server
    finally:
        await remote.close()
        server.stop()
        t.join(10)


def _hung_encoder(path, hello: bytes, stop: threading.Event) -> threading.Thread:
    """Accepts feeders, says hello, reads their requests and never answers (a hung GPU)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    sock.settimeout(0.2)

    def run():
        conns = []
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            conn.sendall(frame(hello))
            conn.setblocking(False)
            conns.append(conn)
        for c in conns:
            c.close()
        sock.close()
        path.unlink()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


async def test_a_hung_encoder_times_out_drops_and_the_next_call_reconnects(tmp_path):
    path = tmp_path / "enc.sock"
    null = NullEncoder(dim=8)
    stop = threading.Event()
    hung = _hung_encoder(path, EncoderServer(null, path).hello(), stop)
    remote = RemoteEncoder(path, request_timeout_s=0.5)
    await remote.connect(wait_s=10)
    calls = [remote.encode_images_async([b"a", b"b"]) for _ in range(3)]
    # (bounded here too: without the client's deadline these would wait for ever)
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 120)
    assert all(isinstance(o, EncoderUnavailable) and "sent nothing for 0.5 s" in str(o)
               for o in outcomes), outcomes
    # an item larger than the socket buffers: the send itself cannot finish, and the
    # watchdog's drop ends it too
    big = await asyncio.wait_for(asyncio.gather(
        remote.encode_images_async([b"x" * (8 << 20)]), return_exceptions=True), 120)
    assert isinstance(big[0], EncoderUnavailable) and "sent nothing" in str(big[0]), big
    assert remote.in_flight == 0 and remote._link is None  # dropped, nothing pending
    # a cancelled call leaves nothing pending either
    task = asyncio.create_task(remote.encode_images_async([b"c"]))
    while remote.in_flight == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert remote.in_flight == 0
    stop.set()
    hung.join(10)
    deadline = time.monotonic() + 30
    while remote._link is not None:  # the feeder saw the encoder go
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    # the pool restarted the encoder: the same call now goes through, same vectors
    remote.request_timeout_s = 60  # a healthy answer on a loaded machine
    async with _serving_null(path, NullEncoder(dim=8), remote):
        got = await remote.encode_images_async([b"a", b"b"])
    want = null.encode_images([b"a", b"b"])
    assert all(np.array_equal(g, w.astype(np.float32)) for g, w in zip(got, want, strict=True))


async def test_an_encoder_failing_every_batch_is_an_outage_then_exits(tmp_path):
    path = tmp_path / "enc.sock"
    broken = _Broken(dim=8)
    server, t = _serve_null(path, broken, max_failed_batches=3)
    remote = RemoteEncoder(path, request_timeout_s=30)
    await remote.connect(wait_s=10)
    for _ in range(3):
        with pytest.raises(EncoderUnavailable, match="failed this batch"):
            await remote.encode_images_async([b"x", b"y"])
    await asyncio.to_thread(t.join, 30)
    assert not t.is_alive() and server.unhealthy and "3 batches in a row" in server.unhealthy
    await remote.close()
    # its replacement (the pool's restart) serves the same pins: nothing was lost
    broken.healed = True
    async with _serving_null(path, broken, remote):
        got = await remote.encode_images_async([b"x", b"y"])
    assert all(isinstance(v, np.ndarray) for v in got)


async def test_a_batch_over_the_byte_cap_goes_as_several_requests(tmp_path):
    path = tmp_path / "enc.sock"
    null = NullEncoder(dim=8)
    # 10 images of 400 bytes under a 1,000-byte cap: 5 requests of 2; one of 3,000 alone
    items = [bytes([i]) * 400 for i in range(10)] + [b"z" * 3000]
    assert split_by_bytes([(0, b) for b in items], 1000) == [
        [0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]
    remote = RemoteEncoder(path, max_request_bytes=1000)
    async with _serving_null(path, null, remote):
        await remote.connect(wait_s=10)
        got = await remote.encode_images_async(items)
    assert remote.requests_sent == 6
    want = null.encode_images(items)  # float64 here, float32 on the wire
    assert all(np.array_equal(g, w.astype(np.float32)) for g, w in zip(got, want, strict=True))


async def test_a_slow_encoder_that_keeps_answering_is_not_cut_off(tmp_path):
    """Six requests answered 0.5 s apart (3 s in all) under a 2 s silence limit."""
    path = tmp_path / "enc.sock"
    remote = RemoteEncoder(path, request_timeout_s=2.0)
    async with _serving_null(path, _Slow(dim=8), remote):
        await remote.connect(wait_s=10)
        got = await asyncio.gather(*(remote.encode_images_async([bytes([i])])
                                     for i in range(6)))
    assert all(isinstance(r[0], np.ndarray) for r in got)


async def test_one_failed_batch_spanning_requests_counts_once(tmp_path):
    path = tmp_path / "enc.sock"
    broken = _Broken(dim=8)
    broken.one_batch = RuntimeError("CUDA out of memory (one batch)")
    remote = RemoteEncoder(path, request_timeout_s=60)
    async with _serving_null(path, broken, remote) as server:
        server.max_failed_batches = 2
        await remote.connect(wait_s=10)
        outcomes = await asyncio.gather(*(remote.encode_images_async([b"x"])
                                          for _ in range(3)), return_exceptions=True)
        assert all(isinstance(o, EncoderUnavailable) for o in outcomes)
        # three requests, one failed batch: still serving
        assert server.failed_in_row == 1 and server.unhealthy is None


# ------------------------------------------------------ what status and metrics see
class _Never(NullEncoder):
    """Takes images and never finishes them (a hung device)."""

    def submit(self, items):
        return [Future() for _ in items]


async def test_an_encoder_process_counts_what_it_does(tmp_path):
    from prometheus_client import REGISTRY

    def sample(name):
        return REGISTRY.get_sample_value(name) or 0.0

    before = sample("pinfresh_encoder_images_total")
    batches_before = sample("pinfresh_encoder_batch_size_count")
    remote = RemoteEncoder(tmp_path / "enc.sock")
    async with _serving_null(tmp_path / "enc.sock", NullEncoder(dim=8), remote) as server:
        await remote.connect(wait_s=10)
        await remote.encode_images_async([b"a", b"b", b"c"])
        await remote.encode_images_async([b"d"])
        snap = server.snapshot()
        assert (snap["images_total"], snap["requests_total"], snap["batches_total"]) == (4, 2, 2)
        assert snap["queue_depth"] == 0 and snap["feeders"] == 1
        assert snap["version"] == "null_8" and snap["device"] == "cpu"
        assert snap["last_answer_at"] is not None and server.check() == (True, "ok")
        assert sample("pinfresh_encoder_images_total") - before == 4
        assert sample("pinfresh_encoder_batch_size_count") - batches_before == 2
        assert REGISTRY.get_sample_value("pinfresh_encoder_info",
                                         {"version": "null_8", "device": "cpu"}) == 1


async def test_an_encoder_holding_images_without_answers_fails_its_health(tmp_path):
    server = EncoderServer(_Never(dim=8), tmp_path / "x.sock", stall_s=60)
    assert server.check()[0]  # idle: nothing held, nothing owed
    server._request(memoryview(b"".join(encode_request(1, [(0, b"img")]))[4:]), None)
    assert server.snapshot()["queue_depth"] == 1
    t0 = time.time()
    assert server.check(now=t0 + 30)[0]  # held 30 s: within stall_s
    alive, why = server.check(now=t0 + 120)
    assert not alive and "1 images held and none answered" in why


def test_status_marks_silent_or_unhealthy_encoders_down():
    from streams.runtime.status import encoder_view

    now = 1_000.0
    view = encoder_view({
        "h:encoder-0": {"at": now - 5, "version": "v", "device": "cuda (GPU 0)",
                        "queue_depth": 3, "last_answer_at": now - 1, "images_per_s": 900.0},
        "h:encoder-1": {"at": now - 500, "version": "v", "device": "cuda (GPU 1)"},
        "h:encoder-2": {"at": now - 1, "version": "v", "device": "cpu",
                        "unhealthy": "3 batches in a row failed"},
        "h:encoder-3": {"at": now - 50, "version": "v", "device": "cpu"},
    }, now, fresh_s=40)
    assert view["h:encoder-0"]["state"] == "ok"
    assert view["h:encoder-0"]["last_answer_s_ago"] == 1.0
    assert view["h:encoder-1"]["state"] == "down: no report for 500 s"
    assert view["h:encoder-2"]["state"].startswith("down: 3 batches")
    # silent for longer than three report intervals: down (after 2 minutes before)
    assert view["h:encoder-3"]["state"] == "down: no report for 50 s"


def test_status_marks_an_encoder_whose_process_is_gone_down_at_once():
    import socket
    import subprocess
    import sys

    from streams.runtime.status import encoder_view

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(gone.stdout)
    now = 1_000.0
    host = socket.gethostname()
    view = encoder_view({f"{host}:encoder-cpu": {"at": now - 1, "pid": pid},
                         f"{host}:encoder-0": {"at": now - 1, "pid": os.getpid()},
                         "elsewhere:encoder-0": {"at": now - 1, "pid": pid}}, now, fresh_s=40)
    assert view[f"{host}:encoder-cpu"]["state"] == f"down: process {pid} is gone"
    assert view[f"{host}:encoder-0"]["state"] == "ok"
    assert view["elsewhere:encoder-0"]["state"] == "ok"  # another host's: its report decides


# ------------------------------------------------ a refresh's versions, on the encoder
def _version(seed: int, state: str = "building") -> dict:
    from dataclasses import asdict

    from store.registry import VersionInfo

    return asdict(VersionInfo(f"null_8_s{seed}", state, 8, "null", "", seed, 0.0, False))


def _null_loader(calls: list):
    def load(request):
        calls.append(request["version"])
        if request["model"] != "null":
            raise ConfigError(f"no model {request['model']}")
        return NullEncoder(dim=8, seed=int(request["seed"]))
    return load


async def test_feeders_select_a_version_loaded_once_and_unloaded_after_the_last(tmp_path):
    from prometheus_client import REGISTRY

    from encoder.null import null_vector

    calls: list = []
    path = tmp_path / "enc.sock"
    server, t = _serve_null(path, loader=_null_loader(calls))
    a, b = (RemoteEncoder(path, select=_version(1)) for _ in range(2))
    primary = RemoteEncoder(path)
    try:
        await asyncio.gather(a.connect(wait_s=10), b.connect(wait_s=10), primary.connect())
        assert a.version == b.version == "null_8_s1" and primary.version == "null_8"
        got_a, got_p = await asyncio.gather(a.encode_images_async([b"img"]),
                                            primary.encode_images_async([b"img"]))
        assert np.allclose(got_a[0], null_vector(b"img", 8, 1))  # the selected version's
        assert np.allclose(got_p[0], null_vector(b"img", 8, 0))  # the started one's
        assert calls == ["null_8_s1"] and server.versions() == ["null_8", "null_8_s1"]
        assert REGISTRY.get_sample_value(
            "pinfresh_encoder_info", {"version": "null_8_s1", "device": "cpu"}) == 1
        await a.close()
        await asyncio.sleep(0.2)
        assert server.versions() == ["null_8", "null_8_s1"]  # b still writes it
        await b.close()
        deadline = time.monotonic() + 10
        while server.versions() != ["null_8"]:
            assert time.monotonic() < deadline, server.versions()
            await asyncio.sleep(0.05)
        assert REGISTRY.get_sample_value(
            "pinfresh_encoder_info", {"version": "null_8_s1", "device": "cpu"}) is None
        # a version the encoder process cannot build is a configuration error, not an outage
        bad = RemoteEncoder(path, select={**_version(2), "model": "no-such-model"})
        with pytest.raises(ConfigError, match="no-such-model"):
            await bad.connect()
        assert (await primary.encode_images_async([b"x"]))[0].shape == (8,)  # unaffected
    finally:
        for c in (a, b, primary):
            await c.close()
        server.stop()
        t.join(10)


async def _feeder_versions(path, seed: int, read_s: float = 0.0):
    """A feeder's `RegistryVersions` over the encoder process at ``path``: its base encoder,
    the registry's list of written versions (live null_8 and null_8_s<seed>; edit it to
    retire one) and the write set reader (no caching, immediate release)."""
    from encoder.config import EncoderSettings
    from store.registry import VersionInfo
    from streams.refresh import RegistryVersions

    base = RemoteEncoder(path)
    await base.connect(wait_s=10)
    written = [VersionInfo("null_8", "live", 8, "null", "", 0, 0.0, True),
               VersionInfo(**_version(seed))]

    class Registry:
        async def written(self):
            await asyncio.sleep(read_s)
            return list(written)

    rv = RegistryVersions(Registry(), base, EncoderSettings(remote=path), refresh_s=0,
                          release_after_s=0)
    return base, written, rv


async def test_a_feeders_write_set_goes_through_the_encoder_process(tmp_path):
    """RegistryVersions in a feeder: versions opened on the encoder process, released once
    they leave the write set, and no model code imported here for them."""
    calls: list = []
    path = tmp_path / "enc.sock"
    server, t = _serve_null(path, loader=_null_loader(calls))
    base, written, rv = await _feeder_versions(path, seed=3)
    try:
        encs = await rv.write_set()
        assert list(encs) == ["null_8", "null_8_s3"]
        assert isinstance(encs["null_8_s3"], RemoteEncoder)
        assert calls == ["null_8_s3"] and "null_8_s3" in server.versions()
        await rv.write_set()
        assert calls == ["null_8_s3"]  # opened once
        written.pop()  # retired: it leaves the write set
        assert list(await rv.write_set()) == ["null_8"]
        deadline = time.monotonic() + 10
        while server.versions() != ["null_8"]:
            assert time.monotonic() < deadline, server.versions()
            await asyncio.sleep(0.05)
    finally:
        await rv.close()
        await base.close()
        server.stop()
        t.join(10)


class _Later(NullEncoder):
    """Finishes each request's futures 0.5 s later, from another thread (a busy GPU)."""

    def submit(self, items):
        done = super().submit(items)
        out = [Future() for _ in items]

        def finish():
            time.sleep(0.5)
            for f, d in zip(out, done, strict=True):
                f.set_result(d.result())
        threading.Thread(target=finish, daemon=True).start()
        return out


async def test_images_of_a_feeder_gone_mid_request_are_not_held_for_ever(tmp_path):
    path = tmp_path / "enc.sock"
    server, t = _serve_null(path, _Later(dim=8), stall_s=60)
    remote = RemoteEncoder(path)
    try:
        await remote.connect(wait_s=10)
        call = asyncio.create_task(remote.encode_images_async([b"a", b"b"]))
        deadline = time.monotonic() + 10
        while server.snapshot()["queue_depth"] != 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await remote.close()  # the feeder goes away before the answer
        with pytest.raises(EncoderUnavailable):
            await call
        deadline = time.monotonic() + 10
        while server.snapshot()["queue_depth"]:
            assert time.monotonic() < deadline, server.snapshot()
            await asyncio.sleep(0.05)
        assert server.check(now=time.time() + 3600) == (True, "ok")
    finally:
        server.stop()
        t.join(10)


async def test_concurrent_write_set_readers_open_a_version_once_and_busy_ones_stay(tmp_path):
    """The idle refresher and batches read the write set at once: one open, no leaked
    connection; a retired version a batch in flight still writes is not released under it."""
    calls: list = []
    path = tmp_path / "enc.sock"
    server, t = _serve_null(path, loader=_null_loader(calls))
    # a registry read takes a while: readers overlap
    base, written, rv = await _feeder_versions(path, seed=4, read_s=0.05)
    busy = {"null_8_s4"}
    rv.in_use = lambda: set(busy)
    try:
        sets = await asyncio.gather(*(rv.write_set() for _ in range(5)))
        assert all(list(s) == ["null_8", "null_8_s4"] for s in sets)
        assert calls == ["null_8_s4"]
        assert len({id(s["null_8_s4"]) for s in sets}) == 1  # one encoder for all
        written.pop()
        assert list(await rv.write_set()) == ["null_8"]
        await asyncio.sleep(0.2)
        assert "null_8_s4" in server.versions()  # a batch still writes it: kept
        busy.clear()
        await rv.write_set()
        deadline = time.monotonic() + 10
        while server.versions() != ["null_8"]:  # released: the only connection closed
            assert time.monotonic() < deadline, server.versions()
            await asyncio.sleep(0.05)
    finally:
        await rv.close()
        await base.close()
        server.stop()
        t.join(10)


async def test_a_failed_reselect_after_a_restart_is_an_outage_not_a_config_error(tmp_path):
    """The encoder process restarted and cannot load the version now (out of memory, say):
    mid-batch that is an outage to wait out, not a reason to dead-letter the batch."""
    path = tmp_path / "enc.sock"
    calls: list = []
    server, t = _serve_null(path, loader=_null_loader(calls))
    remote = RemoteEncoder(path, select=_version(5))
    try:
        await remote.connect(wait_s=10)
        assert (await remote.encode_images_async([b"x"]))[0].shape == (8,)
        server.stop()
        t.join(10)
        await remote.close()  # the old process is gone
        server, t = _serve_null(path, loader=lambda req: 1 / 0)
        with pytest.raises(EncoderUnavailable):
            await remote.encode_images_async([b"x"])
    finally:
        await remote.close()
        server.stop()
        t.join(10)
