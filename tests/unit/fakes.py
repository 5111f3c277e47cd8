"""In-memory fakes of pinfresh's own interfaces (encoder, stores, fetcher, DLQ)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from encoder.errors import ImageError, Reason
from store.base import EmbeddingRecord, PinState
from store.errors import StoreUnavailable
from streams.events import DeadLetter
from streams.fetch import FetchError


class FakeEncoder:
    version = "fake_v1"
    dim = 8

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    async def encode_images_async(self, items: Sequence[bytes]) -> list[np.ndarray | ImageError]:
        out: list[np.ndarray | ImageError] = []
        for b in items:
            self.calls.append(b)
            if not b.startswith(b"IMG"):
                out.append(ImageError(Reason.NOT_AN_IMAGE, "fake: not an image"))
                continue
            seed = int.from_bytes(hashlib.sha256(b).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return out


class FakeBackend:
    """Both store roles: the processor's Milvus and Redis protocols."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, EmbeddingRecord]] = {}
        self.tombs: dict[str, int] = {}
        self.live: str | None = None
        self.registered: dict[str, dict[str, str]] = {}
        self.fail_next = 0  # raise StoreUnavailable on the next N calls
        self.upserts = 0

    def _maybe_fail(self) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StoreUnavailable("fake outage", retry_after=0.0)

    async def ensure_version(self, version: str, dim: int, model: str = "") -> None:
        self.data.setdefault(version, {})
        self.registered.setdefault(version, {"dim": str(dim)})

    async def set_live(self, version: str) -> None:
        self.live = version

    async def set_live_if_none(self, version: str) -> bool:
        if self.live is None:
            self.live = version
            return True
        return False

    async def versions(self) -> dict[str, dict[str, str]]:
        return dict(self.registered)

    async def upsert(self, version: str, records: Sequence[EmbeddingRecord],
                     written_at: float | None = None) -> float:
        self._maybe_fail()
        self.upserts += 1
        for r in records:
            self.data.setdefault(version, {})[r.pin_id] = r
        return 1000.0 if written_at is None else written_at

    async def delete(self, version: str, pin_ids: Sequence[str]) -> None:
        self._maybe_fail()
        for p in pin_ids:
            self.data.get(version, {}).pop(p, None)

    async def get_many(self, version: str, pin_ids: Sequence[str]) -> dict[str, EmbeddingRecord]:
        self._maybe_fail()
        d = self.data.get(version, {})
        return {p: d[p] for p in pin_ids if p in d}

    async def get_states(self, version: str, pin_ids: Sequence[str]) -> dict[str, PinState]:
        self._maybe_fail()
        return {p: r.state() for p, r in (await self.get_many(version, pin_ids)).items()}

    async def set_tombstones(self, versions: dict[str, int]) -> None:
        self.tombs.update(versions)

    async def record_batch_stats(self, freshness_s: Sequence[float], encoded: int,
                                 keep: int = 10_000) -> None:
        self.stats = (list(freshness_s), encoded)

    async def get_tombstones(self, pin_ids: Sequence[str]) -> dict[str, int]:
        return {p: self.tombs[p] for p in pin_ids if p in self.tombs}


class FakeFetcher:
    def __init__(self, files: dict[str, bytes | FetchError]) -> None:
        self.files = files
        self.calls: list[str] = []

    async def fetch(self, location: str) -> bytes:
        self.calls.append(location)
        got = self.files.get(location)
        if got is None:
            raise FetchError(Reason.NOT_FOUND, f"no such file: {location}")
        if isinstance(got, FetchError):
            raise got
        return got

    async def fetch_many(self, locations: Sequence[str]) -> list[bytes | FetchError]:
        out: list[bytes | FetchError] = []
        for loc in locations:
            try:
                out.append(await self.fetch(loc))
            except FetchError as exc:
                out.append(exc)
        return out


class FakeDLQ:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)
