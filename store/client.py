"""A small client for ranking services (sync and async) over the read API.

``get_embeddings(pin_ids)`` returns an `Embeddings`: a float32 ``(n, dim)``
numpy array in request order, a found-mask and the model version. Vectors
travel as a binary float16 body by default (``encoding="binary"``: the
fastest format `pinfresh bench read` measured; half the bytes of float32,
cosine to the stored vector above 0.9999); ``"base64"`` is the JSON form.

The client needs numpy, httpx and urllib3 only: ``pip install pinfresh``
without extras installs it (no torch, Faust or pymilvus). The synchronous
client runs on urllib3 (a thread-safe keep-alive pool; measured faster per
request than httpx's), the asynchronous one on httpx.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np
import urllib3

from encoder.errors import ApiClientError, ApiUnreachable

__all__ = ["ApiClientError", "ApiUnreachable", "AsyncPinfreshClient", "Embeddings",
           "PinfreshClient"]

Encoding = Literal["binary", "base64"]
_BATCH_GET = "/v1/embeddings:batchGet"


@dataclass(frozen=True)
class Embeddings:
    """Vectors of one request, all from one model version."""

    version: str
    pin_ids: list[str]
    vectors: np.ndarray
    found: np.ndarray


def _request(pin_ids: Sequence[str], version: str | None, dtype: str, encoding: str) -> bytes:
    return json.dumps({"pin_ids": list(pin_ids), "version": version, "encoding": encoding,
                       "dtype": dtype}, separators=(",", ":")).encode()


def _decode(pin_ids: Sequence[str], status: int, headers: Mapping[str, str],
            content: bytes) -> Embeddings:
    """An `Embeddings` from a batchGet answer (binary or base64), or its error raised."""
    ctype = headers.get("content-type", "")
    if status >= 300 or not (ctype.startswith("application/octet-stream")
                             or ctype.startswith("application/json")):
        raise _error(status, content)
    try:
        return _parse(pin_ids, ctype, headers, content)
    except (ValueError, KeyError, TypeError) as exc:  # truncated, or not the read API
        raise ApiClientError(status, "bad_response",
                             f"the answer is not a batchGet answer: {exc!r}"[:300]) from exc


def _parse(pin_ids: Sequence[str], ctype: str, headers: Mapping[str, str],
           content: bytes) -> Embeddings:
    if ctype.startswith("application/octet-stream"):
        n, dim = (int(x) for x in headers["x-pinfresh-shape"].split(","))
        dt = np.dtype(headers["x-pinfresh-dtype"]).newbyteorder("<")
        arr = np.frombuffer(content, dtype=dt).reshape(n, dim)
        bits = np.frombuffer(bytes.fromhex(headers["x-pinfresh-found"]), dtype=np.uint8)
        return Embeddings(headers["x-pinfresh-version"], list(pin_ids),
                          arr.astype(np.float32), np.unpackbits(bits)[:n].astype(bool))
    body = json.loads(content)
    v = body["vectors"]
    arr = np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"]).newbyteorder("<"))
    return Embeddings(body["version"], list(pin_ids),
                      arr.reshape(v["shape"]).astype(np.float32), np.asarray(body["found"]))


def _error(status: int, content: bytes) -> ApiClientError:
    try:
        err = json.loads(content)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", content[:200].decode(errors="replace")
    return ApiClientError(status, code, message)


def _json(status: int, content: bytes) -> dict[str, Any]:
    if status >= 300:
        raise _error(status, content)
    try:
        return dict(json.loads(content))
    except (ValueError, TypeError) as exc:
        raise ApiClientError(status, "bad_response", f"the answer is not JSON: {exc!r}"
                             [:300]) from exc


class PinfreshClient:
    """Synchronous client; reuse one instance (a pool of connections threads may share).

    ``timeout`` bounds each attempt. A request that got no answer (refused,
    reset, e.g. a kept-alive connection the server had closed, or timed out)
    is tried once more, as every route is a read: a call takes at most twice
    ``timeout``. Raises `ApiClientError` for an answer that is an error (or
    not the API's), `ApiUnreachable` when no answer came. ``pool_size``
    connections are kept; more threads at once open extra connections that
    close after their request (urllib3 logs a warning): size it to the
    threads that share the client.
    """

    def __init__(self, base_url: str, timeout: float = 2.0,
                 dtype: Literal["float16", "float32"] = "float16",
                 encoding: Encoding = "binary", pool_size: int = 32) -> None:
        self.base_url, self.dtype, self.encoding = base_url.rstrip("/"), dtype, encoding
        self._prefix = (urllib3.util.parse_url(self.base_url).path or "").rstrip("/")
        self._pool = urllib3.connection_from_url(
            self.base_url, maxsize=pool_size, block=False, timeout=urllib3.Timeout(timeout),
            retries=urllib3.Retry(total=1, connect=1, read=1, status=0, redirect=False,
                                  allowed_methods=frozenset({"GET", "POST"}),
                                  raise_on_status=False))

    def _post(self, path: str, body: bytes) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.urlopen("POST", self._prefix + path, body=body, redirect=False,
                                      headers={"Content-Type": "application/json"})
        except urllib3.exceptions.HTTPError as exc:
            raise ApiUnreachable(f"read API at {self.base_url} did not answer: {exc}") from exc

    def get_embeddings(self, pin_ids: Sequence[str], version: str | None = None) -> Embeddings:
        """Vectors of ``pin_ids`` (missing pins: zero rows, False in ``found``)."""
        r = self._post(_BATCH_GET, _request(pin_ids, version, self.dtype, self.encoding))
        return _decode(pin_ids, r.status, r.headers, r.data)

    def similar(self, pin_id: str, k: int = 10, **filters: Any) -> dict[str, Any]:
        """Pins most similar to ``pin_id``."""
        r = self._post("/v1/similar", json.dumps({"pin_id": pin_id, "k": k,
                                                  "filter": filters}).encode())
        return _json(r.status, r.data)

    def close(self) -> None:
        """Close the connection pool."""
        self._pool.close()

    def __enter__(self) -> PinfreshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPinfreshClient:
    """Asynchronous twin of `PinfreshClient` (on httpx).

    The same retry (a request that got no answer is tried once more) and errors.
    """

    def __init__(self, base_url: str, timeout: float = 2.0,
                 dtype: Literal["float16", "float32"] = "float16",
                 encoding: Encoding = "binary",
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url, self.dtype, self.encoding = base_url.rstrip("/"), dtype, encoding
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)

    async def _post(self, path: str, body: bytes) -> httpx.Response:
        for attempt in (1, 2):
            try:
                return await self._http.post(path, content=body,
                                             headers={"Content-Type": "application/json"})
            except httpx.TransportError as exc:
                if attempt == 2:
                    raise ApiUnreachable(
                        f"read API at {self.base_url} did not answer: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def get_embeddings(self, pin_ids: Sequence[str], version: str | None = None
                             ) -> Embeddings:
        """Vectors of ``pin_ids`` (missing pins: zero rows, False in ``found``)."""
        r = await self._post(_BATCH_GET, _request(pin_ids, version, self.dtype, self.encoding))
        return _decode(pin_ids, r.status_code, r.headers, r.content)

    async def similar(self, pin_id: str, k: int = 10, **filters: Any) -> dict[str, Any]:
        """Pins most similar to ``pin_id``."""
        r = await self._post("/v1/similar", json.dumps({"pin_id": pin_id, "k": k,
                                                        "filter": filters}).encode())
        return _json(r.status_code, r.content)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
