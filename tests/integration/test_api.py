"""The read API in-process (httpx ASGI transport) over the real embedded stores."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest

from store.api import create_app
from store.base import EmbeddingRecord
from store.client import ApiClientError, AsyncPinfreshClient
from store.config import ApiSettings, MilvusSettings, RedisSettings
from store.milvus import MilvusStore
from store.redis import RedisCache
from streams.runtime.stack import EmbeddedStack, StackSettings
from tests.integration.conftest import Relay

pytestmark = pytest.mark.integration
DIM = 16


def rec(pin: str, version: str, seed: int) -> EmbeddingRecord:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return EmbeddingRecord(pin, v / np.linalg.norm(v), version, "h" * 64, 1, time.time(),
                           time.time(), f"/img/{pin}.png", f"a {pin.split('-')[0]} picture")


async def _seed(redis_url: str, milvus_uri: str, prefix: str) -> dict[str, dict[str, np.ndarray]]:
    milvus = MilvusStore(MilvusSettings(uri=milvus_uri, collection_prefix=prefix))
    cache = RedisCache(RedisSettings(url=redis_url, key_prefix=prefix, vector_dtype="float32"))
    truth: dict[str, dict[str, np.ndarray]] = {}
    for vi, ver in enumerate(("va", "vb")):
        await milvus.ensure_version(ver, DIM)
        await cache.ensure_version(ver, DIM)
        records = [rec(f"{kind}-{i}", ver, 1000 * vi + 10 * i + j)
                   for j, kind in enumerate(("cat", "dog")) for i in range(10)]
        await milvus.upsert(ver, records)
        await cache.upsert(ver, records[:15])  # 5 only in Milvus: fallback + refill
        truth[ver] = {r.pin_id: r.vector for r in records}
    await cache.set_live("va")
    # the read path's Milvus fallback reads at Bounded consistency: wait until the
    # server's time has passed these writes (a fraction of a second) before reading
    deadline = time.monotonic() + 60
    for ver in ("va", "vb"):
        only = [f"dog-{i}" for i in range(5, 10)]
        while len(await milvus.get_many(ver, only, consistency="Bounded")) < len(only):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    await milvus.close()
    await cache.close()
    return truth


@asynccontextmanager
async def _serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client that calls it in process."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as http:
            yield http


@pytest.fixture
async def api(stack, request):
    prefix = f"api{abs(hash(request.node.name)) % 10**6}"
    truth = await _seed(stack.redis_url, stack.milvus_uri, prefix)
    app = create_app(ApiSettings(max_batch=50, max_k=20),
                     RedisSettings(url=stack.redis_url, key_prefix=prefix),
                     MilvusSettings(uri=stack.milvus_uri, collection_prefix=prefix))
    async with _serving(app) as http:
        yield http, truth, app


@pytest.mark.cluster
async def test_batch_get_json_and_base64_with_missing_ids(api):
    http, truth, _ = api
    ids = ["cat-1", "nope", "dog-9", "cat-9"]
    r = await http.post("/v1/embeddings:batchGet", json={"pin_ids": ids})
    body = r.json()
    assert r.status_code == 200 and body["version"] == "va" and body["dim"] == DIM
    assert body["found"] == [True, False, True, True] and body["missing"] == ["nope"]
    assert body["vectors"][1] is None
    assert np.allclose(body["vectors"][0], truth["va"]["cat-1"], atol=1e-6)
    r = await http.post("/v1/embeddings:batchGet",
                        json={"pin_ids": ids, "encoding": "base64", "dtype": "float16",
                              "version": "vb"})
    b = r.json()
    arr = np.frombuffer(base64.b64decode(b["vectors"]["data"]), "<f2").reshape(4, DIM)
    assert b["version"] == "vb" and b["vectors"]["shape"] == [4, DIM]
    assert np.allclose(arr[3], truth["vb"]["cat-9"], atol=2e-3) and not arr[1].any()


async def test_a_pin_asked_for_twice_is_found_at_both_places(api):
    """One response, one answer per pin: dog-7 is only in Milvus, and each of its two
    places gets its vector (the Milvus answer was mapped back to the last one only)."""
    http, truth, _ = api
    ids = ["dog-7", "cat-1", "dog-7", "nope", "nope"]
    body = (await http.post("/v1/embeddings:batchGet", json={"pin_ids": ids})).json()
    assert body["found"] == [True, True, True, False, False]
    assert body["missing"] == ["nope", "nope"]
    for i in (0, 2):
        assert np.allclose(body["vectors"][i], truth["va"]["dog-7"], atol=1e-6)


@pytest.mark.parametrize("encoding", ["binary", "base64"])
async def test_client_returns_array_mask_and_version(api, encoding):
    http, truth, app = api
    client = AsyncPinfreshClient("http://t", transport=httpx.ASGITransport(app=app),
                                 encoding=encoding)
    # 9 ids: the found mask spans two bytes of the binary answer's bit mask
    ids = ["dog-2", "zzz", "cat-3", "cat-4", "cat-5", "cat-6", "cat-7", "cat-8", "dog-1"]
    emb = await client.get_embeddings(ids)
    assert emb.version == "va" and emb.found.tolist() == [True, False] + [True] * 7
    assert emb.vectors.shape == (9, DIM) and emb.vectors.dtype == np.float32
    assert not emb.vectors[1].any()
    for i, p in enumerate(ids):
        if p != "zzz":  # float16 on the wire
            assert float(emb.vectors[i] @ truth["va"][p]) > 0.9999
    exact = AsyncPinfreshClient("http://t", transport=httpx.ASGITransport(app=app),
                                encoding=encoding, dtype="float32")
    emb = await exact.get_embeddings(["cat-4"], version="vb")
    assert emb.version == "vb" and emb.vectors.tobytes() == truth["vb"]["cat-4"].tobytes()
    with pytest.raises(ApiClientError) as err:
        await client.get_embeddings(["x"] * 51)
    assert err.value.status == 413 and err.value.code == "too_many_ids"
    await client.aclose()
    await exact.aclose()


async def test_sync_client_over_http(api, stack, request):
    """`PinfreshClient` (urllib3) against the app served by uvicorn on a loopback port."""
    from store.client import ApiUnreachable, PinfreshClient
    from tests.integration.conftest import served_over_http

    _, truth, _app = api
    prefix = f"api{abs(hash(request.node.name)) % 10**6}"
    served = create_app(ApiSettings(max_batch=50), RedisSettings(
        url=stack.redis_url, key_prefix=prefix), MilvusSettings(
        uri=stack.milvus_uri, collection_prefix=prefix))  # the fixture's data
    async with served_over_http(served) as url:
        client = PinfreshClient(url, timeout=10)

        def reads() -> list:
            out = [client.get_embeddings(["cat-1", "nope", "dog-7"]) for _ in range(3)]
            with pytest.raises(ApiClientError) as err:
                client.get_embeddings(["a"], version="nope")
            return [*out, err.value, client.similar("cat-1", k=3)]

        try:
            *embs, err, similar = await asyncio.to_thread(reads)
        finally:
            client.close()
    for emb in embs:
        assert emb.version == "va" and emb.found.tolist() == [True, False, True]
        assert float(emb.vectors[2] @ truth["va"]["dog-7"]) > 0.9999
    assert err.status == 404 and err.code == "unknown_version"
    assert len(similar["hits"]) == 3
    with PinfreshClient(url, timeout=5) as gone, pytest.raises(ApiUnreachable,
                                                               match="did not answer"):
        gone.get_embeddings(["cat-1"])  # stopped: nobody listens


async def test_similar_by_pin_and_vector_with_filters(api):
    http, truth, _ = api
    r = await http.post("/v1/similar", json={"pin_id": "cat-1", "k": 5})
    hits = r.json()["hits"]
    assert r.json()["version"] == "va" and len(hits) == 5
    assert "cat-1" not in [h["pin_id"] for h in hits]
    r = await http.post("/v1/similar", json={
        "vector": truth["va"]["dog-4"].tolist(), "k": 3,
        "filter": {"caption_contains": "dog", "exclude": ["dog-4"]}})
    hits = r.json()["hits"]
    assert len(hits) == 3 and all(h["pin_id"].startswith("dog") for h in hits)
    assert "dog-4" not in [h["pin_id"] for h in hits]


async def test_similar_leaves_out_many_excluded_pins_and_still_returns_k(api, stack, request):
    """The excluded pins go to the search: they used to be filtered from at most
    max_k * 5 hits afterwards, so excluding the nearest ten with max_k 2 left none."""
    _, truth, _ = api
    prefix = f"api{abs(hash(request.node.name)) % 10**6}"  # the fixture's data
    app = create_app(ApiSettings(max_k=2), RedisSettings(url=stack.redis_url, key_prefix=prefix),
                     MilvusSettings(uri=stack.milvus_uri, collection_prefix=prefix))
    q = truth["va"]["cat-1"]
    nearest = sorted((p for p in truth["va"] if p != "cat-1"),
                     key=lambda p: -float(truth["va"][p] @ q))
    async with _serving(app) as http:
        r = await http.post("/v1/similar", json={"pin_id": "cat-1", "k": 2,
                                                 "filter": {"exclude": nearest[:12]}})
    assert r.status_code == 200, r.text
    got = [h["pin_id"] for h in r.json()["hits"]]
    assert len(got) == 2 and set(got) <= set(nearest[12:15])  # the query read from fp16


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/embeddings:batchGet", {"pin_ids": []}, 422, "invalid_request"),
    ("/v1/embeddings:batchGet", {"pin_ids": ["a"] * 51}, 413, "too_many_ids"),
    ("/v1/embeddings:batchGet", {"pin_ids": ["x" * 200]}, 422, "invalid_request"),
    ("/v1/embeddings:batchGet", {"pin_ids": ["a"], "version": "nope"}, 404, "unknown_version"),
    ("/v1/embeddings:batchGet", {"pin_ids": "a"}, 422, "invalid_request"),
    ("/v1/similar", {"pin_id": "cat-1", "k": 500}, 422, "k_too_large"),
    ("/v1/similar", {"k": 3}, 422, "invalid_request"),
    ("/v1/similar", {"vector": [1.0, 2.0], "k": 3}, 422, "bad_vector"),
    ("/v1/similar", {"pin_id": "ghost", "k": 3}, 404, "pin_not_found"),
    ("/v1/embeddings:batchGet", {"pin_ids": ["a"], "encodng": "json"}, 422, "unknown_field"),
    ("/v1/similar", {"pin_id": "cat-1", "filter": {"captions": "x"}}, 422, "unknown_field"),
    # every field is bounded
    ("/v1/embeddings:batchGet", {"pin_ids": ["a"], "version": "v" * 200}, 422,
     "invalid_request"),
    ("/v1/similar", {"pin_id": "x" * 200}, 422, "invalid_request"),
    ("/v1/similar", {"vector": [0.5] * 5000}, 422, "invalid_request"),
    ("/v1/similar", {"pin_id": "cat-1", "filter": {"exclude": ["x" * 200]}}, 422,
     "invalid_request"),
])
async def test_limits_and_errors_use_one_envelope(api, path, body, status, code):
    http, _, _ = api
    r = await http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


async def _chunks():
    yield b'{"pin_ids": '
    yield b'["a"]}'


async def test_http_level_errors_use_the_envelope_too(api):
    http, _, _ = api
    cases = [
        (await http.post("/v1/embeddings:batchGet", content=b"{not json",
                         headers={"content-type": "application/json"}), 400, "invalid_json"),
        (await http.post("/v1/embeddings:batchGet", content=b"pin_ids=a",
                         headers={"content-type": "application/x-www-form-urlencoded"}),
         415, "unsupported_media_type"),
        (await http.get("/v1/no-such-route"), 404, "not_found"),
        (await http.get("/v1/embeddings:batchGet"), 405, "method_not_allowed"),
        # the body's size is checked before it is read or parsed
        (await http.post("/v1/embeddings:batchGet", content=b" " * (2 << 20),
                         headers={"content-type": "application/json"}), 413, "body_too_large"),
        (await http.post("/v1/embeddings:batchGet", content=_chunks(),
                         headers={"content-type": "application/json"}), 411, "length_required"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


async def test_health_ready_metrics(api):
    http, _, _ = api
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "milvus": "ok"}
    await http.post("/v1/embeddings:batchGet", json={"pin_ids": ["cat-1"]})
    text = (await http.get("/metrics")).text
    assert 'pinfresh_api_requests_total{route="/v1/embeddings:batchGet",status="200"}' in text
    # a scanner's paths are one series, not one per path
    for i in range(20):
        assert (await http.get(f"/wp-admin/{i}.php")).status_code == 404
    text = (await http.get("/metrics")).text
    assert "wp-admin" not in text
    assert 'pinfresh_api_requests_total{route="unmatched",status="404"} 20.0' in text
    # every route is in the OpenAPI document, batchGet (a plain Starlette route) too
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/v1/embeddings:batchGet", "/v1/similar", "/readyz"} <= set(paths)
    body = paths["/v1/embeddings:batchGet"]["post"]["requestBody"]["content"]
    assert "pin_ids" in body["application/json"]["schema"]["properties"]


@pytest.mark.cluster
async def test_a_response_never_mixes_versions(api):
    http, truth, app = api
    cache = app.state.reader.cache
    ids = [f"cat-{i}" for i in range(10)] + [f"dog-{i}" for i in range(10)]
    for flip in range(6):
        await cache.set_live("vb" if flip % 2 == 0 else "va")
        body = (await http.post("/v1/embeddings:batchGet", json={"pin_ids": ids})).json()
        want = np.stack([truth[body["version"]][p] for p in ids])
        got = np.asarray(body["vectors"], dtype=np.float32)
        assert np.allclose(got, want, atol=1e-6)


async def test_sixteen_readers_during_three_promote_rollback_flips_never_see_a_mix(api):
    """Under load: 16 concurrent readers while the live version flips six times (three
    promotions and their rollbacks); every response holds exactly one version's vectors,
    byte for byte, and both versions are seen."""
    import base64

    http, truth, app = api
    cache = app.state.reader.cache
    ids = [f"cat-{i}" for i in range(10)] + [f"dog-{i}" for i in range(10)]
    done, seen, stop = [0], {"va": 0, "vb": 0}, asyncio.Event()

    async def reader(i: int) -> None:
        # half read base64 JSON, half the client's binary answers
        client = AsyncPinfreshClient("http://t", transport=httpx.ASGITransport(app=app),
                                     dtype="float32")
        while not stop.is_set():
            if i % 2:
                emb = await client.get_embeddings(ids)
                version, got = emb.version, emb.vectors.astype("<f4")
            else:
                body = (await http.post("/v1/embeddings:batchGet", json={
                    "pin_ids": ids, "encoding": "base64", "dtype": "float32"})).json()
                version = body["version"]
                got = np.frombuffer(base64.b64decode(body["vectors"]["data"]), "<f4").reshape(
                    len(ids), DIM)
            want = np.stack([truth[version][p] for p in ids]).astype("<f4")
            assert got.tobytes() == want.tobytes(), version
            seen[version] += 1
            done[0] += 1
        await client.aclose()

    tasks = [asyncio.create_task(reader(i)) for i in range(16)]
    try:
        for flip in range(6):
            at = done[0]
            while done[0] < at + 32:  # readers ran between flips (none failed meanwhile)
                assert not any(t.done() for t in tasks), [t.exception() for t in tasks
                                                          if t.done()]
                await asyncio.sleep(0.01)
            await cache.set_live("vb" if flip % 2 == 0 else "va")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert seen["va"] and seen["vb"]


async def test_readiness_follows_redis_and_milvus(tmp_path):
    st = EmbeddedStack(StackSettings(data_dir=tmp_path, kafka_port=0, redis_port=0,
                                     milvus_port=0))
    info = st.start()
    try:
        app = create_app(ApiSettings(), RedisSettings(url=info.redis_url, timeout_s=2.0),
                         MilvusSettings(uri=info.milvus_uri, timeout_s=5))
        async with _serving(app) as http:
            assert (await http.get("/readyz")).status_code == 200
            for service in ("redis", "milvus"):
                st.kill_service(service)
                r = await http.get("/readyz")
                assert r.status_code == 503 and r.json()["checks"][service] != "ok"
                assert r.json()["error"]["code"] == "not_ready"
                # one readable line, not a Python dict repr
                assert r.json()["error"]["message"].startswith(f"{service} down: ")
                assert "{" not in r.json()["error"]["message"]
                st.start_service(service)
                deadline = time.monotonic() + 180  # a restart on a loaded machine
                while (await http.get("/readyz")).status_code != 200:
                    assert time.monotonic() < deadline, f"{service} did not recover"
                    await asyncio.sleep(0.2)
        # an API started while Milvus is down starts (a pod must), answers 503 and
        # connects once Milvus is back; it used to exit with three tracebacks
        st.kill_service("milvus")
        # `status` shows Milvus down and the rest (it aborted with a traceback)
        from streams.runtime.status import collect_status
        from streams.settings import Settings

        settings = Settings().with_stack(info)
        settings = settings.model_copy(update={"milvus": settings.milvus.model_copy(
            update={"timeout_s": 2})})
        status = await collect_status(settings, interval=0.2)
        assert status["health"]["milvus"].startswith("down: ")
        assert status["health"]["redis"] == "ok" and status["health"]["kafka"] == "ok"
        app = create_app(ApiSettings(), RedisSettings(url=info.redis_url, timeout_s=2.0),
                         MilvusSettings(uri=info.milvus_uri, timeout_s=2))
        async with _serving(app) as http:
            assert (await http.get("/healthz")).status_code == 200
            deadline = time.monotonic() + 120  # until the first attempt has failed
            while "Milvus" not in (r := await http.get("/readyz")).json()["error"][
                    "message"]:
                assert r.status_code == 503 and time.monotonic() < deadline, r.text
                await asyncio.sleep(0.2)
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            r = await http.post("/v1/embeddings:batchGet", json={"pin_ids": ["a"]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert int(r.headers["retry-after"]) >= 1
            st.start_service("milvus")
            deadline = time.monotonic() + 180
            while (await http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "the API did not connect"
                await asyncio.sleep(0.2)
            r = await http.post("/v1/embeddings:batchGet", json={"pin_ids": ["a"]})
            assert r.status_code != 503, r.text
    finally:
        st.stop()


@pytest.mark.slow
async def test_graft_ask_reads_the_cache_and_checks_the_version(api, stack, tmp_path, request):
    import asyncio

    import torch
    from click.testing import CliRunner

    from encoder.graft import Projector, VersionMismatch, save_projector
    from streams.cli import cli

    http, _, app = api
    reader = app.state.reader
    prefix = reader.cache.p
    torch.manual_seed(0)
    save_projector(Projector(DIM, 576, k=2), tmp_path / "va", "va", {})
    save_projector(Projector(DIM, 576, k=2), tmp_path / "vb", "vb", {})
    env = {"PINFRESH_REDIS__URL": stack.redis_url, "PINFRESH_REDIS__KEY_PREFIX": prefix,
           "PINFRESH_MILVUS__URI": stack.milvus_uri,
           "PINFRESH_MILVUS__COLLECTION_PREFIX": reader.milvus.settings.collection_prefix,
           "PINFRESH_STACK__DATA_DIR": str(tmp_path)}
    runner = CliRunner()
    ok = await asyncio.to_thread(runner.invoke, cli, ["graft", "ask", "cat-1", "What is this?",
                                                      "--projector", str(tmp_path / "va")],
                                 env=env)
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip()  # an answer, generated from the cached embedding
    bad = await asyncio.to_thread(runner.invoke, cli, ["graft", "ask", "cat-1", "What?",
                                                       "--projector", str(tmp_path / "vb")],
                                  env=env)
    assert isinstance(bad.exception, VersionMismatch)
    assert "trained on encoder version vb" in str(bad.exception)


async def test_reads_answer_within_their_deadline_when_a_store_freezes(stack, request):
    """A frozen Milvus (then a frozen Valkey): reads the cache can answer still answer;
    a miss, `similar` and /readyz answer 503 at the API's read deadline (1 s here), not
    after the writers' 30 s."""
    prefix = f"fz{abs(hash(request.node.name)) % 10**6}"
    await _seed(stack.redis_url, stack.milvus_uri, prefix)
    to_milvus = Relay(int(stack.milvus_uri.rsplit(":", 1)[1]))
    to_redis = Relay(int(stack.redis_url.rsplit(":", 1)[1].split("/")[0]))
    mport, rport = await to_milvus.start(), await to_redis.start()
    app = create_app(ApiSettings(read_deadline_s=1.0),
                     RedisSettings(url=f"redis://127.0.0.1:{rport}/0", key_prefix=prefix),
                     MilvusSettings(uri=f"http://127.0.0.1:{mport}", collection_prefix=prefix))
    cached = {"pin_ids": ["cat-1", "cat-2"]}
    try:
        async with _serving(app) as http:
            assert (await http.post("/v1/embeddings:batchGet", json=cached)).status_code == 200
            to_milvus.freeze()
            r = await http.post("/v1/embeddings:batchGet", json=cached)
            assert r.status_code == 200 and r.json()["found"] == [True, True]
            for path, body in (("/v1/embeddings:batchGet", {"pin_ids": ["dog-7"]}),
                               ("/v1/similar", {"pin_id": "cat-1", "k": 3})):
                r = await http.post(path, json=body)
                assert r.status_code == 503, r.text
                assert "read deadline (1 s" in r.json()["error"]["message"]
            r = await http.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["redis"] == "ok"
            assert r.json()["checks"]["milvus"].startswith("down")
            to_milvus.thaw()
            to_redis.freeze()
            r = await http.post("/v1/embeddings:batchGet", json=cached)
            assert r.status_code == 503 and "read deadline" in r.json()["error"]["message"]
            r = await http.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["redis"].startswith("down")
            to_redis.thaw()
    finally:
        await to_milvus.close()
        await to_redis.close()
