"""End-to-end: pin events -> real worker process -> Milvus + Valkey, on the embedded stack."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from streams.events import PinEvent, Reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.cluster
async def test_catalog_pins_readable_everywhere_and_match_direct_encode(
        pipeline, catalog, encoder):
    items = catalog[:200]
    ids = [it.pin_id for it in items]
    pipeline.start_worker()
    t0 = time.time()
    await pipeline.publish([it.event(version=1) for it in items])
    meta = await pipeline.wait(ids, timeout=300)
    assert len(meta) == 200, pipeline.worker_log()[-3000:]

    version = await pipeline.cache.get_live()
    assert version == encoder.version
    images = [Path(it.image).read_bytes() for it in items]
    direct = encoder.encode_images(images)
    cached, found = await pipeline.cache.get_vectors(version, ids)
    assert found.all()
    stored = await pipeline.milvus.get_many(version, ids)
    assert len(stored) == 200
    for i, it in enumerate(items):
        assert isinstance(direct[i], np.ndarray)
        assert cos(cached[i], direct[i]) >= 0.999, it.pin_id
        rec = stored[it.pin_id]
        assert cos(rec.vector, direct[i]) >= 0.999, it.pin_id
        assert rec.content_hash == hashlib.sha256(images[i]).hexdigest()
        assert rec.model_version == version and rec.pin_version == 1
        assert rec.caption == it.caption and rec.image_location == it.image
        # the event's metadata is stored in both stores
        assert it.metadata and rec.metadata == it.metadata
        assert json.loads(meta[it.pin_id]["metadata"]) == it.metadata
        assert t0 - 5 <= rec.event_time <= rec.encode_time
        assert float(meta[it.pin_id]["written_at"]) >= rec.encode_time
    assert await pipeline.milvus.count(version) == 200
    assert await pipeline.cache.count(version) == 200


async def _absent(pipeline, version: str, pin_id: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, found = await pipeline.cache.get_vectors(version, [pin_id])
        in_milvus = await pipeline.milvus.get_states(version, [pin_id])
        if not found[0] and not in_milvus:
            return True
        await asyncio.sleep(0.2)
    return False


@pytest.mark.cluster
async def test_new_image_replaces_old_version_ignored_delete_removes(
        pipeline, catalog, encoder):
    a, b = catalog[0], catalog[1]
    pin = "pin-update-1"
    pipeline.start_worker()
    await pipeline.publish([PinEvent.upsert(pin, a.image, 1, "first")])
    assert await pipeline.wait([pin], timeout=300)
    version = await pipeline.cache.get_live()
    vec_a, vec_b = encoder.encode_images([Path(a.image).read_bytes(),
                                          Path(b.image).read_bytes()])

    await pipeline.publish([PinEvent.upsert(pin, b.image, 2, "second")])
    assert await pipeline.wait([pin], timeout=180, min_pin_version=2)
    for vec in ((await pipeline.cache.get_vectors(version, [pin]))[0][0],
                (await pipeline.milvus.get_many(version, [pin]))[pin].vector):
        assert cos(vec, vec_b) >= 0.999 and cos(vec, vec_a) < 0.99

    # an older version arriving late changes nothing
    skipped = pipeline.metric("pinfresh_events_total", labels='{outcome="skipped"}')
    await pipeline.publish([PinEvent.upsert(pin, a.image, 1, "late")])
    assert pipeline.wait_metric("pinfresh_events_total", skipped + 1,
                                labels='{outcome="skipped"}') >= skipped + 1
    rec = (await pipeline.milvus.get_many(version, [pin]))[pin]
    assert rec.pin_version == 2 and rec.caption == "second" and cos(rec.vector, vec_b) >= 0.999
    meta = await pipeline.cache.get_meta(version, [pin])
    assert meta[pin]["pin_version"] == "2"

    # a delete removes the pin from both stores ...
    await pipeline.publish([PinEvent.delete(pin, 3)])
    assert await _absent(pipeline, version, pin)
    # ... and an upsert older than the delete does not bring it back
    skipped = pipeline.metric("pinfresh_events_total", labels='{outcome="skipped"}')
    await pipeline.publish([PinEvent.upsert(pin, b.image, 2, "zombie")])
    assert pipeline.wait_metric("pinfresh_events_total", skipped + 1,
                                labels='{outcome="skipped"}') >= skipped + 1
    assert await _absent(pipeline, version, pin, timeout=1)


async def test_same_event_twice_one_record_one_encode(pipeline, catalog):
    it = catalog[2]
    ev = PinEvent.upsert("pin-dup-1", it.image, 7, it.caption)
    pipeline.start_worker()
    await pipeline.publish([ev])
    assert await pipeline.wait([ev.pin_id], timeout=300)
    assert pipeline.wait_metric("pinfresh_images_encoded_total", 1) == 1
    await pipeline.publish_raw([(ev.pin_id.encode(), ev.to_bytes())])  # the same bytes again
    assert pipeline.wait_metric("pinfresh_events_total", 1, labels='{outcome="skipped"}') >= 1
    assert pipeline.metric("pinfresh_images_encoded_total") == 1
    version = await pipeline.cache.get_live()
    assert await pipeline.milvus.count(version) == 1
    assert await pipeline.cache.count(version) == 1


async def test_malformed_and_missing_image_dead_lettered_neighbours_processed(
        pipeline, catalog, stamps):
    good1, good2 = catalog[3], catalog[4]
    missing = PinEvent.upsert("pin-missing-1", str(stamps / "no" / "such.png"), 1)
    pipeline.start_worker()
    await pipeline.publish_raw([
        (good1.pin_id.encode(), good1.event(1).to_bytes()),
        (b"pin-bad-1", b'{"op": "upsert", "pin_id": "pin-bad-1", "version": "one"'),
        (missing.pin_id.encode(), missing.to_bytes()),
        (good2.pin_id.encode(), good2.event(1).to_bytes()),
    ])
    assert len(await pipeline.wait([good1.pin_id, good2.pin_id], timeout=300)) == 2
    letters = []
    deadline = time.monotonic() + 180
    while len(letters) < 2 and time.monotonic() < deadline:
        letters = await pipeline.dead_letters()
        await asyncio.sleep(0.3)
    by_pin = {dl.pin_id: dl for dl in letters}
    assert set(by_pin) == {"pin-bad-1", "pin-missing-1"}
    assert by_pin["pin-bad-1"].reason == Reason.MALFORMED_EVENT
    assert by_pin["pin-missing-1"].reason == Reason.NOT_FOUND
    assert json.loads(by_pin["pin-missing-1"].original)["image"] == missing.image
    version = await pipeline.cache.get_live()
    assert await pipeline.milvus.get_states(version, ["pin-missing-1", "pin-bad-1"]) == {}


async def test_worker_killed_mid_stream_restart_serves_every_pin_once(pipeline, catalog):
    items = catalog[200:400]
    ids = [it.pin_id for it in items]
    pipeline.start_worker("w1")
    await pipeline.publish([it.event(version=1) for it in items])
    deadline = time.monotonic() + 180
    version = None
    while time.monotonic() < deadline:
        version = await pipeline.cache.get_live()
        if version and await pipeline.cache.count(version) >= 40:
            break
        await asyncio.sleep(0.1)
    assert version is not None
    done_before = await pipeline.cache.count(version)
    assert 0 < done_before < 200, "kill must land mid-stream"
    pipeline.kill_worker("w1")  # SIGKILL: no drain, no commit
    in_milvus = await pipeline.milvus.count(version)  # written before the kill

    pipeline.start_worker("w2")
    meta, letters = await pipeline.settle(ids, timeout=300)
    assert len(meta) + len(letters) == 200, pipeline.worker_log("w2")[-3000:]
    # the catalog has one stamp too small to encode (39x7 px): dead-lettered, not lost
    assert all(dl.reason == Reason.IMAGE_TOO_SMALL for dl in letters.values())
    assert len(letters) <= 1
    rows = await pipeline.milvus.iter_pins(version)
    assert sorted(r["pin_id"] for r in rows) == sorted(meta)
    assert await pipeline.cache.count(version) == len(meta)
    # none written twice: w2 writes exactly the pins w1 had not written to Milvus (the
    # redelivered rest is skipped, and repaired in Redis where w1 died in between)
    written = pipeline.wait_metric("pinfresh_events_total", len(meta) - in_milvus,
                                   worker="w2", labels='{outcome="written"}')
    assert written == len(meta) - in_milvus
