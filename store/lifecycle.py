"""One lifecycle for the store clients: ``async with open_stores(settings) as stores``.

Every command, the worker, the backfill, the status view and the read API open
Milvus and Redis this way and nowhere else, so connections are always closed,
in one order, whatever happens in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from store.config import MilvusSettings, RedisSettings
from store.milvus import MilvusStore
from store.reader import EmbeddingReader
from store.redis import RedisCache
from store.registry import VersionRegistry


class StoreSettings(Protocol):
    """Anything with the two store sections (the project's `Settings` has them)."""

    @property
    def redis(self) -> RedisSettings:
        """Redis/Valkey settings."""
        ...

    @property
    def milvus(self) -> MilvusSettings:
        """Milvus settings."""
        ...


@dataclass(frozen=True)
class Stores:
    """Open store clients, and the views built on them.

    Attributes:
        reader: reads for ranking services (Redis first, Milvus for misses; its
            cache refills run in the background until the stores close).
    """

    milvus: MilvusStore
    cache: RedisCache
    reader: EmbeddingReader

    @property
    def registry(self) -> VersionRegistry:
        """The model-version registry."""
        return VersionRegistry(self.milvus, self.cache)


@asynccontextmanager
async def open_stores(settings: StoreSettings) -> AsyncIterator[Stores]:
    """Open both clients (Milvus connects, Redis on first use); close both on the way out.

    Raises:
        StoreUnavailable: Milvus cannot be reached.
    """
    # the Milvus client connects in its constructor (up to its timeout): off the loop
    milvus = await asyncio.to_thread(MilvusStore, settings.milvus)
    try:
        cache = RedisCache(settings.redis)
    except BaseException:
        await milvus.close()
        raise
    reader = EmbeddingReader(milvus, cache)
    try:
        yield Stores(milvus, cache, reader)
    finally:
        try:
            await reader.close()
            await cache.close()
        finally:
            await milvus.close()
