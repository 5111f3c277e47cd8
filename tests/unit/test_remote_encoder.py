"""The encoder process and its feeders' client, over a real Unix socket (CPU model)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from encoder.config import EncoderSettings
from encoder.engine import ImageEncoder
from encoder.errors import EncoderUnavailable, ImageError, Reason
from encoder.remote import RemoteEncoder, decode_request, encode_request
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
