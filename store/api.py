"""The read API for ranking services: an app factory over the reader.

Routes (JSON in and out, one error envelope ``{"error": {"code", "message"}}``
for every error: a bad body (422, ``unknown_field`` for a field the route does
not know), invalid JSON (400), another content type (415), an unknown route
(404) or method (405), an unknown or absent version, an unknown pin (404), a
store that is down (503 with ``Retry-After``)):

* ``POST /v1/embeddings:batchGet`` ``{"pin_ids": [...], "version": null,
  "encoding": "json" | "base64" | "binary", "dtype": "float32" | "float16"}``
  returns ``{"version", "dim", "found": [bool], "missing": [ids], "vectors": ...}``.
  ``vectors`` is a list of lists (``null`` for missing pins) or, with
  ``base64``, ``{"dtype", "shape", "data"}`` holding a little-endian
  ``(n, dim)`` array whose missing rows are zeros. With ``binary`` the body is
  that array's bytes (``application/octet-stream``) and the rest travels in
  headers: ``X-Pinfresh-Version``, ``X-Pinfresh-Dtype``, ``X-Pinfresh-Shape``
  (``n,dim``) and ``X-Pinfresh-Found`` (hex of the found mask, one bit per pin,
  most significant bit first: numpy's ``packbits``). Missing pins are
  reported, not errors.
* ``POST /v1/similar`` ``{"pin_id" | "vector", "k", "version", "filter":
  {"caption_contains", "exclude"}}`` returns ``{"version", "hits": [...]}``.
* ``GET /healthz`` (the process is up), ``GET /readyz`` (Redis and Milvus
  answer, for real), ``GET /metrics`` (Prometheus).

Every response names the model version it was read from; one request reads
one version (resolved once).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from encoder.errors import (
    NoLiveVersion,
    PinfreshError,
    PinNotFound,
    StoreUnavailable,
    Unavailable,
    UnknownVersion,
)
from store.config import ApiSettings, MilvusSettings, RedisSettings
from store.lifecycle import open_stores
from store.reader import EmbeddingReader

T = TypeVar("T")
logger = logging.getLogger(__name__)


class _Body(BaseModel):
    """Request bodies refuse fields they do not know (a typo is an error, not ignored)."""

    model_config = ConfigDict(extra="forbid")


# Every input is bounded: ids as the event schema bounds them, versions as the
# registry names them, vectors by the largest dimension a model may have.
PinId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
VersionId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
MAX_DIM = 4096


class BatchGetRequest(_Body):
    """Body of ``/v1/embeddings:batchGet``."""

    pin_ids: list[PinId] = Field(min_length=1)
    version: VersionId | None = None
    encoding: Literal["json", "base64", "binary"] = "json"
    dtype: Literal["float32", "float16"] = "float32"


class SimilarFilter(_Body):
    """Simple metadata filters for ``/v1/similar``."""

    caption_contains: str | None = Field(None, max_length=200)
    exclude: list[PinId] = Field(default_factory=list, max_length=1000)


class SimilarRequest(_Body):
    """Body of ``/v1/similar``: a pin id or a vector."""

    pin_id: PinId | None = None
    vector: list[float] | None = Field(None, max_length=MAX_DIM)
    k: int = Field(10, ge=1)
    version: VersionId | None = None
    filter: SimilarFilter = Field(default_factory=SimilarFilter)


class ApiError(Exception):
    """An error with an HTTP status and a stable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _envelope(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _route_paths(app: FastAPI) -> set[str]:
    """The app's route paths (computed once; the routes do not change after start)."""
    paths: set[str] | None = getattr(app.state, "route_paths", None)
    if paths is None:
        paths = {str(getattr(r, "path", "")) for r in app.routes}
        app.state.route_paths = paths
    return paths


def _reader(request: Request) -> EmbeddingReader:
    reader: EmbeddingReader | None = request.app.state.reader
    if reader is None:
        raise StoreUnavailable(request.app.state.stores_down, retry_after=2.0)
    return reader


class _Edge:
    """The API's edge, as plain ASGI: refuse bad POST framing, observe every response.

    A POST must be ``application/json`` (415) with a ``Content-Length`` (411) of
    at most ``max_body`` bytes (413), checked before anything is read. Every
    response, a refusal included, is counted and timed by route template
    (``observe(route, status, seconds)``): the matched route's path, else the
    raw path when it is a route's (a refusal comes before routing), else
    ``unmatched`` (a scanned URL must not become a metric series).
    """

    def __init__(self, app: ASGIApp, *, max_body: int, routes: Callable[[], set[str]],
                 observe: Callable[[str, int, float], None]) -> None:
        self.app, self.max_body, self.routes, self.observe = app, max_body, routes, observe

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        if scope["method"] != "POST":
            return None
        headers = Headers(scope=scope)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _envelope(415, "unsupported_media_type",
                             f"send the body as application/json, not {ctype or 'nothing'}")
        length = headers.get("content-length")
        if length is None or not length.isdigit():
            return _envelope(411, "length_required",
                             "send a Content-Length header (chunked bodies are refused)")
        if int(length) > self.max_body:
            return _envelope(413, "body_too_large",
                             f"body of {length} bytes > limit {self.max_body}: split the request")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t = time.perf_counter()
        status = 500  # an exception that escapes the app is answered 500 outside

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            matched = scope.get("route")  # set on this scope by the router
            path = scope["path"]
            route = getattr(matched, "path", None) or (
                path if path in self.routes() else "unmatched")
            self.observe(route, status, time.perf_counter() - t)


@dataclass(frozen=True)
class _Sections:
    redis: RedisSettings
    milvus: MilvusSettings


#: The longest /readyz waits for a store's ping.
READY_PING_S = 1.5


async def _within(deadline_s: float, call: Awaitable[T], left_s: float | None = None) -> T:
    """``call``'s result, or `StoreUnavailable` once the read's deadline has passed.

    A ranking service times out long before a writer's Milvus deadline: a read
    answers 503 (retry later) within its own deadline, ``PINFRESH_API__READ_DEADLINE_S``.
    ``left_s``: what is left of it (a read of several calls), default all of it.
    """
    limit = max(0.0, deadline_s if left_s is None else left_s)
    started = time.monotonic()
    try:
        return await asyncio.wait_for(call, limit)
    except TimeoutError:
        raise _late(deadline_s) from None
    except StoreUnavailable as exc:
        # the store clients time out at the read deadline too (`create_app`): on a
        # busy loop their error can be seen before this timer; it is the same answer
        if time.monotonic() - started >= limit:
            raise _late(deadline_s, exc) from exc
        raise


def _late(deadline_s: float, cause: Exception | None = None) -> StoreUnavailable:
    return StoreUnavailable(
        f"the stores gave no answer within the read deadline ({deadline_s:g} s, "
        "PINFRESH_API__READ_DEADLINE_S)" + (f"; the store said: {cause}" if cause else ""),
        retry_after=1.0)


def create_app(api: ApiSettings, redis: RedisSettings, milvus: MilvusSettings) -> FastAPI:
    """Build the read API; clients are opened and closed by the app's lifespan.

    The API's store clients wait at most ``api.read_deadline_s`` per call (the
    workers keep their longer write deadlines), and every read answers within
    that deadline: a store that is frozen makes it answer 503, not hang.
    """
    deadline = api.read_deadline_s
    redis = redis.model_copy(update={"timeout_s": min(redis.timeout_s, deadline)})
    milvus = milvus.model_copy(update={"timeout_s": min(milvus.timeout_s, deadline),
                                       "deadline_s": min(milvus.deadline_s, deadline)})
    registry = CollectorRegistry()
    requests = Counter("pinfresh_api_requests_total", "API requests", ["route", "status"],
                       registry=registry)
    latency = Histogram("pinfresh_api_seconds", "API latency", ["route"], registry=registry,
                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A store that is down at start does not stop the API from starting (a pod
        # must come up while Milvus is down): the stores connect in the background,
        # and until they do /healthz answers, /readyz and reads answer 503.
        app.state.reader = None
        app.state.stores_down = "connecting to the stores"
        async with AsyncExitStack() as stack:
            async def connect() -> None:
                delay, failures = 1.0, 0
                while True:
                    try:
                        stores = await stack.enter_async_context(
                            open_stores(_Sections(redis, milvus)))
                    except Exception as exc:  # noqa: BLE001 - logged, retried; the API stays up
                        app.state.stores_down = f"stores not connected: {exc}"
                        failures += 1
                        if failures == 1 or failures % 10 == 0:
                            logger.warning("read API: stores not connected (%s, %d tries); "
                                           "/readyz answers 503 until they are", exc, failures)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 15.0)
                        continue
                    app.state.reader = stores.reader
                    if failures:
                        logger.info("read API: stores connected after %d tries", failures + 1)
                    return

            task = asyncio.create_task(connect())
            # serve at once when the stores answer at once; never wait long for them
            await asyncio.wait([task], timeout=min(5.0, milvus.timeout_s))
            try:
                yield
            finally:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="pinfresh read API", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _envelope(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = dict(exc.errors()[0]) if exc.errors() else {
            "loc": [], "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            ctx: dict[str, Any] = first.get("ctx") or {}
            return _envelope(400, "invalid_json",
                             f"the body is not valid JSON: {ctx.get('error', first.get('msg'))}")
        where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        if first.get("type") == "extra_forbidden":
            return _envelope(422, "unknown_field", f"{where}: no such field")
        return _envelope(422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        resp = _envelope(exc.status_code, code, str(exc.detail))
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v  # e.g. Allow on a 405
        return resp

    # the store's typed errors, mapped here at the boundary (httpx-style), never by message
    @app.exception_handler(NoLiveVersion)
    async def no_live(_: Request, exc: NoLiveVersion) -> JSONResponse:
        return _envelope(404, "no_live_version", str(exc))

    @app.exception_handler(UnknownVersion)
    async def unknown(_: Request, exc: UnknownVersion) -> JSONResponse:
        return _envelope(404, "unknown_version", str(exc))

    @app.exception_handler(PinNotFound)
    async def pin_not_found(_: Request, exc: PinNotFound) -> JSONResponse:
        return _envelope(404, "pin_not_found", str(exc))

    @app.exception_handler(Unavailable)
    async def unavailable(_: Request, exc: Unavailable) -> JSONResponse:
        resp = _envelope(503, "store_unavailable", str(exc))
        resp.headers["Retry-After"] = str(int(max(1, exc.retry_after)))
        return resp

    @app.exception_handler(PinfreshError)
    async def store_error(_: Request, exc: PinfreshError) -> JSONResponse:
        return _envelope(500, "store_error", str(exc))

    # pure ASGI, not BaseHTTPMiddleware: each of those costs a task and a stream per
    # request (measured: most of an API read's own time); added last = outermost
    def observe(route: str, status: int, seconds: float) -> None:
        latency.labels(route=route).observe(seconds)
        requests.labels(route=route, status=str(status)).inc()

    app.add_middleware(_Edge, max_body=api.max_body_bytes, routes=lambda: _route_paths(app),
                       observe=observe)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        reader: EmbeddingReader | None = request.app.state.reader
        if reader is None:
            return JSONResponse({"error": {"code": "not_ready",
                                           "message": request.app.state.stores_down}},
                                status_code=503)
        async def check(ping: Callable[[], Awaitable[None]]) -> str:
            try:
                await asyncio.wait_for(ping(), READY_PING_S)
                return "ok"
            except TimeoutError:
                return f"down: no answer in {READY_PING_S:g} s"
            except PinfreshError as exc:
                return f"down: {exc}"[:200]

        # both at once, each with a short deadline: /readyz answers within 2 s
        got = await asyncio.gather(check(reader.cache.ping), check(reader.milvus.ping))
        checks = dict(zip(("redis", "milvus"), got, strict=True))
        if all(v == "ok" for v in checks.values()):
            return JSONResponse({"status": "ready", "checks": checks})
        down = "; ".join(f"{name} {state}" for name, state in checks.items() if state != "ok")
        return JSONResponse({"error": {"code": "not_ready", "message": down},
                             "checks": checks}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def batch_get(request: Request) -> Response:
        # the body is parsed and validated by pydantic-core in one pass, and the answer
        # is encoded here: FastAPI's body and response machinery cost more than the read
        try:
            body = BatchGetRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        if len(body.pin_ids) > api.max_batch:
            raise ApiError(413, "too_many_ids",
                           f"{len(body.pin_ids)} pin ids > limit {api.max_batch}: split the batch")
        reader = _reader(request)
        res = await _within(deadline, reader.get_many(body.pin_ids, body.version))
        if body.encoding == "binary":
            arr = res.vectors.astype(np.dtype(body.dtype).newbyteorder("<"))
            return Response(arr.tobytes(), media_type="application/octet-stream", headers={
                "X-Pinfresh-Version": res.version, "X-Pinfresh-Dtype": body.dtype,
                "X-Pinfresh-Shape": f"{arr.shape[0]},{arr.shape[1]}",
                "X-Pinfresh-Found": np.packbits(res.found).tobytes().hex()})
        found = res.found.tolist()
        out: dict[str, Any] = {
            "version": res.version, "dim": int(res.vectors.shape[1]), "found": found,
            "missing": [p for p, f in zip(res.pin_ids, found, strict=True) if not f],
        }
        if body.encoding == "base64":
            arr = res.vectors.astype(np.dtype(body.dtype).newbyteorder("<"))
            out["vectors"] = {"dtype": body.dtype, "shape": list(arr.shape),
                              "data": base64.b64encode(arr.tobytes()).decode()}
        else:
            out["vectors"] = [v.astype(body.dtype).tolist() if f else None
                              for v, f in zip(res.vectors, found, strict=True)]
        return Response(json.dumps(out, separators=(",", ":")).encode(),
                        media_type="application/json")

    # a plain Starlette route: FastAPI's request handling (dependencies, body, response
    # model) cost about a fifth of the server's time per read (measured); the schema is
    # added to the OpenAPI document by hand
    app.add_route("/v1/embeddings:batchGet", batch_get, methods=["POST"])
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = fastapi_openapi()
            schema["paths"]["/v1/embeddings:batchGet"] = {"post": {
                "summary": "Vectors of pin ids, from one model version",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": BatchGetRequest.model_json_schema()}}},
                "responses": {"200": {"description": "JSON (json, base64) or the array "
                                                     "(binary; see X-Pinfresh-* headers)"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.post("/v1/similar")
    async def similar(body: SimilarRequest, request: Request) -> dict[str, Any]:
        if body.k > api.max_k:
            raise ApiError(422, "k_too_large", f"k={body.k} > limit {api.max_k}")
        if (body.pin_id is None) == (body.vector is None):
            raise ApiError(422, "invalid_request", "give exactly one of pin_id or vector")
        reader = _reader(request)
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline  # one deadline for the read's every store call
        version = await _within(deadline, reader.resolve_version(body.version),
                                until - loop.time())
        vec = None
        if body.vector is not None:
            vec = np.asarray(body.vector, dtype=np.float32)
            dim, _ = await _within(deadline, reader.cache.version_info(version),
                                   until - loop.time())
            if vec.shape != (dim,) or not np.isfinite(vec).all():
                raise ApiError(422, "bad_vector",
                               f"vector must be {dim} finite floats for version {version}")
        # a caption filter keeps its matches among the 5k nearest (k <= max_k, checked above)
        fetch = body.k * 5 if body.filter.caption_contains else body.k
        _, hits = await _within(deadline, reader.similar(
            pin_id=body.pin_id, vector=vec, k=fetch, version=version,
            exclude=body.filter.exclude), until - loop.time())
        needle = (body.filter.caption_contains or "").lower()
        kept = [h for h in hits if needle in h.caption.lower()]
        return {"version": version, "hits": [
            {"pin_id": h.pin_id, "score": round(h.score, 6), "caption": h.caption}
            for h in kept[:body.k]]}

    return app
