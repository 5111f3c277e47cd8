"""What the write path needs from the world: encoders, stores, fetcher, dead-letter sink.

`streams.processor.PinProcessor` and its steps are written against these
protocols, so unit tests drive them with in-memory fakes (`tests/unit/fakes.py`,
which keep the real engines' rules) and production passes the real clients
(`store.milvus.MilvusStore`, `store.redis.RedisCache`, `streams.fetch.Fetcher`,
`streams.dlq.KafkaDeadLetters`, the encoders of `encoder`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from encoder.errors import ImageError
from store.base import CacheLookup, EmbeddingRecord, PinState
from streams.events import DeadLetter, PinEvent
from streams.fetch import FetchError

__all__ = ["Cache", "DeadLetterSink", "Encoder", "Fetch", "ProcessorHooks", "StaticVersions",
           "VectorStore", "VersionSource", "WriteOutcome"]


class Encoder(Protocol):
    """What the processor needs from an encoder.

    `encoder.engine.ImageEncoder` (in process), `encoder.remote.RemoteEncoder`
    (a feeder's handle on the encoder process) or `encoder.null.NullEncoder`.
    """

    @property
    def version(self) -> str:
        """The model version id its vectors belong to."""
        ...

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        ...

    async def encode_images_async(self, items: Sequence[bytes]) -> list[np.ndarray | ImageError]:
        """Encode images; one vector or error per image, in order."""
        ...


class VersionSource(Protocol):
    """Which model versions to write, each with its encoder (live first)."""

    async def write_set(self) -> dict[str, Encoder]:
        """Encoders by version id; the first one is the primary (live) version."""
        ...

    def forget(self, version: str) -> None:
        """A version vanished (retired): leave it out until the registry says otherwise."""
        ...


class StaticVersions:
    """A fixed write set (a backfill, or a worker outside any registry)."""

    def __init__(self, *encoders: Encoder) -> None:
        self._write = {e.version: e for e in encoders}

    async def write_set(self) -> dict[str, Encoder]:
        """The encoders given at construction."""
        return self._write

    def forget(self, version: str) -> None:
        """Drop a version that vanished (never the first)."""
        if version != next(iter(self._write)):
            self._write.pop(version, None)


class Fetch(Protocol):
    """What the processor needs from a fetcher (`streams.fetch.Fetcher`)."""

    async def fetch(self, location: str) -> bytes:
        """Return image bytes or raise `FetchError`."""
        ...

    async def fetch_many(self, locations: Sequence[str]) -> list[bytes | FetchError]:
        """One result or `FetchError` per location (a batch's first attempt)."""
        ...


class DeadLetterSink(Protocol):
    """Where dead letters go (the ``pins.dlq`` topic in production, `streams.dlq`)."""

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Durably write the letters.

        Raises:
            Unavailable: retry later; if it has a ``sent`` attribute, those
                letters were written and are not sent again.
        """
        ...


class VectorStore(Protocol):
    """The Milvus-side calls the processor makes."""

    async def ensure_version(self, version: str, dim: int) -> None: ...  # noqa: D102
    async def set_live(self, version: str) -> None: ...  # noqa: D102
    async def upsert(self, version: str, records: Sequence[EmbeddingRecord]) -> None: ...  # noqa: D102
    async def delete(self, version: str, pin_ids: Sequence[str]) -> None: ...  # noqa: D102
    async def get_many(  # noqa: D102
        self, version: str, pin_ids: Sequence[str], *, consistency: Any = None,
    ) -> dict[str, EmbeddingRecord]: ...
    async def get_states(  # noqa: D102
        self, version: str, pin_ids: Sequence[str], *, consistency: Any = None,
    ) -> dict[str, PinState]: ...
    async def count(self, version: str) -> int: ...  # noqa: D102
    async def ensure_loaded(self, version: str) -> bool: ...  # noqa: D102


class WriteOutcome(Protocol):
    """What `Cache.write` returns (`store.redis.WriteResult`)."""

    @property
    def written_at(self) -> float: ...  # noqa: D102
    @property
    def written(self) -> frozenset[str]: ...  # noqa: D102


class Cache(Protocol):
    """The Redis-side calls the processor makes: conditional writes, claims, pointers."""

    async def ensure_version(self, version: str, dim: int, model: str = "") -> None: ...  # noqa: D102
    async def set_live_if_none(self, version: str) -> bool: ...  # noqa: D102
    async def versions(self) -> dict[str, dict[str, str]]: ...  # noqa: D102
    async def lookup(  # noqa: D102
        self, versions: Sequence[str], pin_ids: Sequence[str]
    ) -> CacheLookup: ...
    async def mark_complete(self, version: str) -> None: ...  # noqa: D102
    async def write(  # noqa: D102
        self, version: str, records: Sequence[EmbeddingRecord], *, mode: Any = "write",
        written_at: float | None = None,
    ) -> WriteOutcome: ...
    async def claim(  # noqa: D102
        self, op: Any, token: str, pins: Mapping[str, int], versions: Sequence[str]
    ) -> dict[str, dict[str, bool]]: ...
    async def release(self, token: str, pins: Mapping[str, int]) -> set[str]: ...  # noqa: D102
    async def renew(self, token: str, pins: Sequence[str]) -> set[str]: ...  # noqa: D102
    async def commit_deletes(  # noqa: D102
        self, token: str, pins: Mapping[str, int], versions: Sequence[str]
    ) -> set[str]: ...
    async def in_flight(self, pins: Mapping[str, int]) -> set[str]: ...  # noqa: D102
    async def registered(self, versions: Sequence[str]) -> set[str]: ...  # noqa: D102
    async def eviction_policy(self) -> str | None: ...  # noqa: D102
    async def report_writer(  # noqa: D102
        self, name: str, write_set: Sequence[str], batches: Sequence[Sequence[str]],
        extra: Mapping[str, Any] | None = None,
    ) -> None: ...
    async def record_batch_stats(  # noqa: D102
        self, freshness_s: Sequence[float], encoded: int, keep: int = 10_000
    ) -> None: ...


class ProcessorHooks:
    """Seams for fault-injection tests; every method does nothing here.

    Production never passes hooks. A test's own entry point
    (``tests/integration/fault_worker.py``) passes a subclass that, say,
    SIGKILLs the worker after its Milvus write.
    """

    def before_batch(self, events: Sequence[PinEvent]) -> None:
        """Called with a batch's valid events before any lookup."""

    def at(self, point: str) -> None:
        """Called at ``after_encode``, ``after_milvus`` and ``after_redis``."""
