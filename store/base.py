"""The store interface shared by every backend, and the records it moves.

Both backends (`store.milvus.MilvusStore`, `store.redis.RedisCache`) implement
`VectorBackend`. Every write is an upsert keyed by pin id, so replaying a batch
leaves one record per pin. A backend that is down or saturated raises
`store.errors.StoreUnavailable` carrying ``retry_after``; callers pause and
retry rather than drop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class EmbeddingRecord:
    """One pin's embedding in one model version, with its provenance.

    Attributes:
        pin_id: primary key.
        vector: L2-normalised float32 vector.
        model_version: version id of the encoder that produced `vector`.
        content_hash: sha256 hex of the image bytes that were encoded.
        pin_version: the per-pin event version this record reflects.
        event_time: when the event was created (epoch seconds, from the event).
        encode_time: when the vector was computed (epoch seconds).
        image_location: where the image was fetched from.
        caption: the pin's text.
        metadata: the event's ``metadata`` object (flat: string keys, scalar values).
    """

    pin_id: str
    vector: np.ndarray
    model_version: str
    content_hash: str
    pin_version: int
    event_time: float
    encode_time: float
    image_location: str
    caption: str
    metadata: dict[str, str | int | float | bool] = field(default_factory=dict)

    def state(self) -> PinState:
        """The record's identity without the vector."""
        return PinState(self.pin_id, self.pin_version, self.content_hash)


@dataclass(frozen=True, slots=True)
class PinState:
    """What a worker needs to decide whether an event changes anything."""

    pin_id: str
    pin_version: int
    content_hash: str


@dataclass(frozen=True)
class CacheLookup:
    """What one read of the cache says about a batch of pins (`RedisCache.lookup`).

    Attributes:
        tombs: per pin, the version of its last delete (pins without one are absent).
        states: per model version asked for, the stored state of the pins found.
        claimed: pins with a writer's claim in Redis (a writer in flight, or one
            that died after its claim and whose claim has not expired yet): Milvus
            may hold a write of theirs that Redis does not.
        registered: the versions asked for that are registered.
        complete: the registered versions whose cache holds every pin written
            to Milvus (the ``cache`` field of the version's registry hash, set
            when the version started empty in both stores or by ``store verify
            --repair``; gone when Redis lost its data).
    """

    tombs: Mapping[str, int]
    states: Mapping[str, Mapping[str, PinState]]
    claimed: frozenset[str] = frozenset()
    registered: frozenset[str] = frozenset()
    complete: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A similar pin, best first."""

    pin_id: str
    score: float
    caption: str
    image_location: str


class VectorBackend(Protocol):
    """The async interface every store backend implements."""

    async def ensure_version(self, version: str, dim: int) -> None:
        """Create the version's collection/namespace if needed (idempotent).

        Raises:
            DimensionMismatch: it exists with another dimension.
        """

    async def upsert(self, version: str, records: Sequence[EmbeddingRecord]) -> None:
        """Write records keyed by pin id; a replay leaves one record per pin."""

    async def delete(self, version: str, pin_ids: Sequence[str]) -> None:
        """Remove pins (missing ones are ignored)."""

    async def get_many(self, version: str, pin_ids: Sequence[str]) -> dict[str, EmbeddingRecord]:
        """Return the records found; missing pins are absent from the dict."""

    async def get_states(self, version: str, pin_ids: Sequence[str]) -> dict[str, PinState]:
        """Return version and content hash of the pins found."""

    async def count(self, version: str) -> int:
        """Number of pins stored in a version."""

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the backend answers."""

    async def close(self) -> None:
        """Release connections."""
