"""A small client for ranking services (sync and async) over the read API.

``get_embeddings(pin_ids)`` returns an `Embeddings`: a float32 ``(n, dim)``
numpy array in request order, a found-mask and the model version. Vectors
travel as base64 float16 by default (half the bytes of float32; cosine to the
stored vector stays above 0.9999).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np

from encoder.errors import ApiClientError


@dataclass(frozen=True)
class Embeddings:
    """Vectors of one request, all from one model version."""

    version: str
    pin_ids: list[str]
    vectors: np.ndarray
    found: np.ndarray


def _decode(pin_ids: Sequence[str], body: dict[str, Any]) -> Embeddings:
    v = body["vectors"]
    arr = np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"]).newbyteorder("<"))
    return Embeddings(body["version"], list(pin_ids),
                      arr.reshape(v["shape"]).astype(np.float32), np.asarray(body["found"]))


def _check(resp: httpx.Response) -> dict[str, Any]:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
        except (ValueError, KeyError):
            err = {"code": "http_error", "message": resp.text[:200]}
        raise ApiClientError(resp.status_code, err["code"], err["message"])
    return dict(resp.json())


class PinfreshClient:
    """Synchronous client; reuse one instance (it keeps a connection pool)."""

    def __init__(self, base_url: str, timeout: float = 2.0,
                 dtype: Literal["float16", "float32"] = "float16") -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout)
        self.dtype = dtype

    def get_embeddings(self, pin_ids: Sequence[str], version: str | None = None) -> Embeddings:
        """Vectors of ``pin_ids`` (missing pins: zero rows, False in ``found``)."""
        body = _check(self._http.post("/v1/embeddings:batchGet", json={
            "pin_ids": list(pin_ids), "version": version, "encoding": "base64",
            "dtype": self.dtype}))
        return _decode(pin_ids, body)

    def similar(self, pin_id: str, k: int = 10, **filters: Any) -> dict[str, Any]:
        """Pins most similar to ``pin_id``."""
        return _check(self._http.post("/v1/similar", json={"pin_id": pin_id, "k": k,
                                                          "filter": filters}))

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


class AsyncPinfreshClient:
    """Asynchronous twin of `PinfreshClient`."""

    def __init__(self, base_url: str, timeout: float = 2.0,
                 dtype: Literal["float16", "float32"] = "float16",
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)
        self.dtype = dtype

    async def get_embeddings(self, pin_ids: Sequence[str], version: str | None = None
                             ) -> Embeddings:
        """Vectors of ``pin_ids`` (missing pins: zero rows, False in ``found``)."""
        resp = await self._http.post("/v1/embeddings:batchGet", json={
            "pin_ids": list(pin_ids), "version": version, "encoding": "base64",
            "dtype": self.dtype})
        return _decode(pin_ids, _check(resp))

    async def similar(self, pin_id: str, k: int = 10, **filters: Any) -> dict[str, Any]:
        """Pins most similar to ``pin_id``."""
        return _check(await self._http.post("/v1/similar", json={
            "pin_id": pin_id, "k": k, "filter": filters}))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
