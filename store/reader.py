"""The read path used by ranking services, the API and the demo.

`EmbeddingReader.get_many` resolves the version once per call (the live one
unless given), reads Redis with one MGET, falls back to Milvus for the misses
and refills the cache with what Milvus had. A result never mixes versions and
always names its version.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from store.base import SearchHit
from store.errors import NoLiveVersion, PinNotFound, StoreError
from store.milvus import MilvusStore
from store.redis import RedisCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadResult:
    """Vectors for a list of pin ids, in request order.

    Attributes:
        version: the model version every vector came from.
        vectors: ``(n, dim)`` float32; rows of missing pins are zeros.
        found: ``(n,)`` bool mask.
        from_cache: how many rows came from Redis (the rest from Milvus).
    """

    version: str
    pin_ids: list[str]
    vectors: np.ndarray
    found: np.ndarray
    from_cache: int


class EmbeddingReader:
    """Redis-first, Milvus-fallback reader over one deployment."""

    def __init__(self, milvus: MilvusStore, cache: RedisCache) -> None:
        self.milvus = milvus
        self.cache = cache

    async def resolve_version(self, version: str | None = None) -> str:
        """Return ``version`` or the live one.

        Raises:
            UnknownVersion: no live version yet.
        """
        if version:
            return version
        live = await self.cache.get_live()
        if live is None:
            raise NoLiveVersion("no live model version yet: run a worker (`pinfresh worker`)")
        return live

    async def get_many(self, pin_ids: Sequence[str], version: str | None = None) -> ReadResult:
        """Vectors of ``pin_ids`` from one version (see module docstring)."""
        ver = await self.resolve_version(version)
        ids = list(pin_ids)
        vectors, found = await self.cache.get_vectors(ver, ids)
        hits = int(found.sum())
        missing = [p for p, f in zip(ids, found, strict=True) if not f]
        if missing:
            recs = await self.milvus.get_many(ver, missing)
            if recs:
                index = {p: i for i, p in enumerate(ids)}
                for pid, rec in recs.items():
                    vectors[index[pid]] = rec.vector
                    found[index[pid]] = True
                try:
                    await self.cache.upsert(ver, list(recs.values()))
                except StoreError as exc:  # a read still succeeds if the refill fails
                    logger.warning("cache refill of %d pins failed: %s", len(recs), exc)
        return ReadResult(ver, ids, vectors, found, hits)

    async def similar(
        self, *, pin_id: str | None = None, vector: np.ndarray | None = None, k: int = 10,
        version: str | None = None,
    ) -> tuple[str, list[SearchHit]]:
        """Nearest pins to a pin (itself excluded) or to a vector, from one version.

        Raises:
            StoreError: the pin is unknown.
        """
        ver = await self.resolve_version(version)
        exclude: list[str] = []
        if pin_id is not None:
            res = await self.get_many([pin_id], ver)
            if not res.found[0]:
                raise PinNotFound(pin_id, ver)
            vector = res.vectors[0]
            exclude = [pin_id]
        if vector is None:
            raise ValueError("give pin_id or vector")
        return ver, await self.milvus.search(ver, vector, k, exclude=exclude)
