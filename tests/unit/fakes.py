"""In-memory fakes of pinfresh's own interfaces (encoder, stores, fetcher, DLQ).

They behave like the real engines where the processor's correctness depends on
it: `FakeCache` writes conditionally with the same rules as the Lua scripts of
`store.redis` (tombstones, stored versions, writer claims that expire), and
both stores raise each error class the real backends map to. The same
contract test (`tests/store_contract.py`) runs against `FakeCache` here and
against a real Valkey in the integration suite, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from encoder.errors import (
    ImageError,
    Reason,
    StoreRejected,
    StoreUnavailable,
    UnknownVersion,
)
from store.base import CacheLookup, EmbeddingRecord, PinState
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


class _Faults:
    """Errors to raise on the next calls, as a real backend would map them."""

    def __init__(self) -> None:
        self.fail_next = 0  # raise `error` on the next N calls
        self.error: Callable[[], Exception] = lambda: StoreUnavailable("fake outage", 0.0)
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            raise self.error()


class FakeMilvus(_Faults):
    """The Milvus side: unconditional upsert by primary key, like the server.

    ``refuse(record)`` returning True makes an upsert that contains the record
    fail whole with `StoreRejected`, as a server refuses a batch for one bad
    row (code 1100); a dropped version raises `UnknownVersion`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, dict[str, EmbeddingRecord]] = {}
        self.live: str | None = None
        self.upserts = 0
        self.refuse: Callable[[EmbeddingRecord], bool] = lambda r: False
        #: called with (version, records) before an upsert is applied (to interleave writers)
        self.before_upsert: Callable[[str, Sequence[EmbeddingRecord]], object] | None = None
        #: awaited with (version, pin ids) before a delete is applied
        self.before_delete: Callable[[str, Sequence[str]], Any] | None = None
        #: every read: (method, version, pin ids, consistency asked for)
        self.reads: list[tuple[str, str, tuple[str, ...], str | None]] = []

    def _coll(self, version: str) -> dict[str, EmbeddingRecord]:
        if version not in self.data:
            raise UnknownVersion(f"no collection for version {version}")
        return self.data[version]

    async def ensure_version(self, version: str, dim: int) -> None:
        self.data.setdefault(version, {})

    async def set_live(self, version: str) -> None:
        self.live = version

    async def upsert(self, version: str, records: Sequence[EmbeddingRecord]) -> None:
        self._maybe_fail()
        coll = self._coll(version)
        if any(self.refuse(r) for r in records):
            raise StoreRejected("fake: code 1100, the length of a string exceeds max length")
        if self.before_upsert is not None:
            res = self.before_upsert(version, records)
            if hasattr(res, "__await__"):
                await res  # type: ignore[misc]
        self.upserts += 1
        for r in records:
            coll[r.pin_id] = r

    async def delete(self, version: str, pin_ids: Sequence[str]) -> None:
        self._maybe_fail()
        if self.before_delete is not None:
            await self.before_delete(version, pin_ids)
        for p in pin_ids:
            self.data.get(version, {}).pop(p, None)

    async def get_many(self, version: str, pin_ids: Sequence[str], *,
                       consistency: str | None = None) -> dict[str, EmbeddingRecord]:
        self.reads.append(("get_many", version, tuple(pin_ids), consistency))
        return self._get(version, pin_ids)

    def _get(self, version: str, pin_ids: Sequence[str]) -> dict[str, EmbeddingRecord]:
        self._maybe_fail()
        d = self._coll(version)
        return {p: d[p] for p in pin_ids if p in d}

    async def get_states(self, version: str, pin_ids: Sequence[str], *,
                         consistency: str | None = None) -> dict[str, PinState]:
        self.reads.append(("get_states", version, tuple(pin_ids), consistency))
        return {p: r.state() for p, r in self._get(version, pin_ids).items()}

    async def count(self, version: str) -> int:
        self._maybe_fail()
        return len(self._coll(version))

    async def ensure_loaded(self, version: str) -> bool:
        self._maybe_fail()
        return version in self.data


@dataclass(frozen=True)
class _Written:
    written_at: float
    written: frozenset[str]


class FakeCache(_Faults):
    """The Redis side with `store.redis`'s semantics: conditional writes and claims."""

    def __init__(self, writer_ttl_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.data: dict[str, dict[str, EmbeddingRecord]] = {}
        self.tombs: dict[str, int] = {}
        # pin -> token -> [version, claimed at, dirty]
        self.wip: dict[str, dict[str, list]] = {}
        # (pin, token) -> (what its release answered, when)
        self.released: dict[tuple[str, str], tuple[int, float]] = {}
        self.live: str | None = None
        self.info: dict[str, dict[str, str]] = {}  # registered versions (and their marks)
        self.writer_reports: dict[str, dict[str, object]] = {}
        self.writer_ttl_s = writer_ttl_s
        self.clock = clock
        self.stats: tuple[list[float], int] | None = None
        #: awaited with (version, records) before a conditional write (to interleave writers)
        self.before_write: Callable[[str, Sequence[EmbeddingRecord]], Any] | None = None

    # registry
    async def ensure_version(self, version: str, dim: int, model: str = "") -> None:
        self._maybe_fail()
        self.data.setdefault(version, {})
        self.info.setdefault(version, {"dim": str(dim)})

    async def set_live(self, version: str) -> None:
        self.live = version

    async def set_live_if_none(self, version: str) -> bool:
        if self.live is None:
            self.live = version
            return True
        return False

    async def versions(self) -> dict[str, dict[str, str]]:
        self._maybe_fail()
        return dict(self.info)

    async def registered(self, versions: Sequence[str]) -> set[str]:
        return {v for v in versions if v in self.info}

    async def mark_complete(self, version: str) -> None:
        self._maybe_fail()
        if version not in self.info:
            raise UnknownVersion(f"model version {version} is not registered")
        self.info[version]["cache"] = "complete"

    def lose_data(self) -> None:
        """What a Redis restarted without its data holds: nothing."""
        self.data.clear()
        self.tombs.clear()
        self.wip.clear()
        self.released.clear()
        self.info.clear()
        self.live = None

    async def eviction_policy(self) -> str | None:
        return "noeviction"

    async def report_writer(self, name: str, write_set: Sequence[str],
                            batches: Sequence[Sequence[str]],
                            extra: Mapping[str, object] | None = None) -> None:
        self.writer_reports[name] = {**(extra or {}), "at": time.time(),
                                     "write_set": list(write_set),
                                     "batches": [list(b) for b in batches]}

    async def writers(self) -> dict[str, dict[str, object]]:
        return dict(self.writer_reports)

    # writes (the Lua scripts' rules)
    def _flag_from(self, pin: str, v: int, except_token: str) -> None:
        for tok, e in self.wip.get(pin, {}).items():
            if tok != except_token and e[0] >= v:
                e[2] = True

    def _older(self, pin: str, v: int) -> int:
        now = self.clock()
        entries = self.wip.get(pin, {})
        n = 0
        for tok in list(entries):
            e = entries.get(tok)
            if e is None:
                continue
            if e[1] < now - self.writer_ttl_s:
                del entries[tok]
                self._flag_from(pin, e[0], tok)
            elif e[0] <= v:
                n += 1
        return n

    def _release(self, pin: str, token: str, v: int) -> int:
        was = self.released.get((pin, token))
        if was is not None and was[1] >= self.clock() - self.writer_ttl_s:
            return was[0]  # a retried release answers what the first one did
        mine = self.wip.get(pin, {}).pop(token, None)
        dirty = False
        if mine is not None:
            dirty = mine[2]
            self._flag_from(pin, v, token)
        n = 0 if self.tombs.get(pin, -1) > v else self._older(pin, v) + (1 if dirty else 0)
        self.released[(pin, token)] = (n, self.clock())
        return n

    async def write(self, version: str, records: Sequence[EmbeddingRecord], *,
                    mode: str = "write", written_at: float | None = None) -> _Written:
        self._maybe_fail()
        if self.before_write is not None:
            await self.before_write(version, records)
        if version not in self.info:
            raise UnknownVersion(f"model version {version} is not registered")
        ns = self.data.setdefault(version, {})
        done = set()
        for r in records:
            stored = ns.get(r.pin_id)
            if self.tombs.get(r.pin_id, -1) >= r.pin_version:
                continue
            if mode == "refill" and stored is not None:
                continue
            if mode == "write" and stored is not None and stored.pin_version > r.pin_version:
                continue
            ns[r.pin_id] = r
            done.add(r.pin_id)
        return _Written(1000.0 if written_at is None else written_at, frozenset(done))

    async def upsert(self, version: str, records: Sequence[EmbeddingRecord],
                     written_at: float | None = None) -> float:
        return (await self.write(version, records, written_at=written_at)).written_at

    async def refill(self, version: str, records: Sequence[EmbeddingRecord]) -> set[str]:
        return set((await self.write(version, records, mode="refill")).written)

    async def claim(self, op: str, token: str, pins: Mapping[str, int],
                    versions: Sequence[str]) -> dict[str, dict[str, bool]]:
        self._maybe_fail()
        out: dict[str, dict[str, bool]] = {}
        for pid, v in pins.items():
            tomb = self.tombs.get(pid, -1)
            flags = {}
            for ver in versions:
                stored = self.data.get(ver, {}).get(pid)
                s = stored.pin_version if stored is not None else -1
                flags[ver] = s <= v and (tomb < v or (op == "delete" and tomb == v))
            out[pid] = flags
            taken = any(flags.values())
            if op == "delete" and tomb <= v:
                self.tombs[pid] = max(tomb, v)
                taken = True
            if taken:
                entries = self.wip.setdefault(pid, {})
                old = entries.get(token)
                entries[token] = [v, self.clock(), bool(old and old[2])]
        return out

    async def release(self, token: str, pins: Mapping[str, int]) -> set[str]:
        self._maybe_fail()
        return {pid for pid, v in pins.items() if self._release(pid, token, v)}

    async def commit_deletes(self, token: str, pins: Mapping[str, int],
                             versions: Sequence[str]) -> set[str]:
        self._maybe_fail()
        for pid, v in pins.items():
            for ver in versions:
                stored = self.data.get(ver, {}).get(pid)
                if stored is None or stored.pin_version <= v:
                    self.data.get(ver, {}).pop(pid, None)
        return {pid for pid, v in pins.items() if self._release(pid, token, v)}

    async def in_flight(self, pins: Mapping[str, int]) -> set[str]:
        return {pid for pid, v in pins.items() if self._older(pid, v)}

    async def renew(self, token: str, pins: Sequence[str]) -> set[str]:
        self._maybe_fail()
        held = set()
        for pid in pins:
            e = self.wip.get(pid, {}).get(token)
            if e is not None:
                e[1] = self.clock()
                held.add(pid)
        return held

    async def delete(self, version: str, pin_ids: Sequence[str]) -> None:
        self._maybe_fail()
        for p in pin_ids:
            self.data.get(version, {}).pop(p, None)

    # reads
    async def get_many(self, version: str, pin_ids: Sequence[str]) -> dict[str, EmbeddingRecord]:
        self._maybe_fail()
        d = self.data.get(version, {})
        return {p: d[p] for p in pin_ids if p in d}

    async def get_states(self, version: str, pin_ids: Sequence[str]) -> dict[str, PinState]:
        return {p: r.state() for p, r in (await self.get_many(version, pin_ids)).items()}

    async def lookup(self, versions: Sequence[str], pin_ids: Sequence[str]) -> CacheLookup:
        self._maybe_fail()
        now = self.clock()
        return CacheLookup(
            tombs={p: self.tombs[p] for p in pin_ids if p in self.tombs},
            states={v: {p: r.state() for p, r in self.data.get(v, {}).items()
                        if p in set(pin_ids)} for v in versions},
            # like HLEN of the wip hash, which expires whole a ttl after its last claim
            claimed=frozenset(p for p in pin_ids if any(
                e[1] >= now - self.writer_ttl_s for e in self.wip.get(p, {}).values())),
            registered=frozenset(v for v in versions if v in self.info),
            complete=frozenset(v for v in versions
                               if self.info.get(v, {}).get("cache") == "complete"),
        )

    async def get_vectors(self, version: str, pin_ids: Sequence[str]
                          ) -> tuple[np.ndarray, np.ndarray]:
        self._maybe_fail()
        dim = int(self.info[version]["dim"])
        out = np.zeros((len(pin_ids), dim), np.float32)
        found = np.zeros(len(pin_ids), bool)
        for i, p in enumerate(pin_ids):
            if p in self.data.get(version, {}):
                out[i], found[i] = self.data[version][p].vector, True
        return out, found

    async def get_live(self) -> str | None:
        return self.live

    async def get_live_vectors(self, pin_ids: Sequence[str], guess: str | None
                               ) -> tuple[str | None, np.ndarray, np.ndarray]:
        # the pointer and the vectors at one instant, like one MGET on a node
        live = self.live
        if live is None:
            return None, np.zeros((0, 0), np.float32), np.zeros(0, bool)
        return (live, *await self.get_vectors(live, pin_ids))

    async def set_tombstones(self, versions: dict[str, int]) -> None:
        self.tombs.update(versions)

    async def get_tombstones(self, pin_ids: Sequence[str]) -> dict[str, int]:
        self._maybe_fail()
        return {p: self.tombs[p] for p in pin_ids if p in self.tombs}

    async def record_batch_stats(self, freshness_s: Sequence[float], encoded: int,
                                 keep: int = 10_000) -> None:
        self.stats = (list(freshness_s), encoded)


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
