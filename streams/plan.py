"""What one micro-batch does: the pure planner behind `streams.processor.PinProcessor`.

The processor splits each batch into a decision and its execution (Quix
Streams' checkpoint names its steps the same way). This module is the
decision: given the batch's events, the pins' tombstones and the stored
state of every written model version in Milvus and in Redis, it says which
deletes to apply, which images to fetch for which versions, which cache
entries to repair and which events to skip, and why. It does no I/O, so it is
tested exhaustively (``tests/unit/test_plan.py``, with hypothesis).

The plan is a proposal, not a lock: between the lookups and the writes
another writer (a second worker after a rebalance, the backfill) can move a
pin on. Every write therefore still goes through the per-pin claim and the
conditional write in Redis (`store.redis.RedisCache.claim`), which refuse
what has become stale; the plan only avoids work that is certainly useless.

Rules, per event ``e`` of pin ``p`` (one event per pin: the batch keeps each
pin's newest), ``T`` the pin's tombstone (the version of its last delete),
and per written version ``m`` its Milvus state ``M`` and Redis state ``R``:

* a delete is applied unless ``T > e.version`` or the primary version holds
  the pin at a newer version (in Milvus or Redis); it is a redelivery, and
  skipped, when ``T == e.version`` and no written version holds the pin any
  more. A delete whose tombstone is already set but whose pin is still stored
  somewhere is applied again: a worker can die between the tombstone and the
  store deletes.
* an upsert is stale in ``m`` when ``T >= e.version``, ``M.version >
  e.version`` or ``R.version > e.version`` (Redis only holds what a writer
  committed after its Milvus write, so a newer ``R`` means Milvus has it even
  when the Milvus read lags);
* it is a redelivery in ``m`` when ``M.version == e.version`` and the event
  is not a re-encode;
* otherwise its image is fetched for ``m``;
* when ``M`` exists and is at least as new as the event, and ``R`` differs
  from it, the cache is repaired from Milvus (the conditional write refuses a
  repair that would move Redis backwards).

Skips are counted once per event, by what the primary version (the live one)
decided. After the images are fetched and hashed, `split_reuse` decides per
version which fetched images need encoding and which reuse the stored vector
(same content hash, not a re-encode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from store.base import PinState
from streams.events import PinEvent

__all__ = ["BatchPlan", "Lookups", "Skip", "VersionWork", "plan_batch", "split_reuse"]


class Skip(StrEnum):
    """Why an event changes nothing in the primary version."""

    STALE = "stale"  # older than what is stored, or than the pin's last delete
    REDELIVERY = "redelivery"  # this very version is stored already


@dataclass(frozen=True)
class Lookups:
    """What the processor read before deciding.

    Attributes:
        tombs: per pin, the version of its last delete (pins without one are absent).
        milvus: per model version, the Milvus state of the pins found.
        redis: per model version, the Redis state of the pins found.
    """

    tombs: Mapping[str, int]
    milvus: Mapping[str, Mapping[str, PinState]]
    redis: Mapping[str, Mapping[str, PinState]]


@dataclass(frozen=True)
class VersionWork:
    """What one model version gets from the batch.

    Attributes:
        fetch: upserts whose image is fetched (then encoded or its vector reused).
        repair: pins whose Redis entry is rewritten from Milvus's record.
    """

    fetch: tuple[PinEvent, ...] = ()
    repair: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchPlan:
    """The decision for one batch.

    Attributes:
        deletes: delete events to apply to every known version.
        work: per written model version (primary first), what it gets.
        skipped: per pin whose event changes nothing in the primary, why.
    """

    deletes: tuple[PinEvent, ...]
    work: Mapping[str, VersionWork]
    skipped: Mapping[str, Skip] = field(default_factory=dict)

    def fetches(self) -> list[PinEvent]:
        """Every upsert fetched for at least one version, once each (primary's first)."""
        seen: dict[str, PinEvent] = {}
        for w in self.work.values():
            for ev in w.fetch:
                seen.setdefault(ev.pin_id, ev)
        return list(seen.values())


def _newer(state: PinState | None, version: int) -> bool:
    return state is not None and state.pin_version > version


def plan_batch(events: Sequence[PinEvent], versions: Sequence[str],
               lookups: Lookups) -> BatchPlan:
    """Decide what the batch does (see the module docstring for the rules).

    Args:
        events: at most one event per pin.
        versions: the model versions written, the primary (live) one first.
        lookups: what the processor read for these pins and versions.
    """
    if not versions:
        raise ValueError("a batch is planned for at least one model version")
    primary = versions[0]
    deletes: list[PinEvent] = []
    skipped: dict[str, Skip] = {}
    fetch: dict[str, list[PinEvent]] = {v: [] for v in versions}
    repair: dict[str, list[str]] = {v: [] for v in versions}
    for ev in events:
        p, tomb = ev.pin_id, lookups.tombs.get(ev.pin_id, -1)
        if ev.op == "delete":
            m0, r0 = lookups.milvus[primary].get(p), lookups.redis[primary].get(p)
            stored = any(p in lookups.milvus[v] or p in lookups.redis[v] for v in versions)
            if tomb > ev.version or _newer(m0, ev.version) or _newer(r0, ev.version):
                skipped[p] = Skip.STALE
            elif tomb == ev.version and not stored:
                skipped[p] = Skip.REDELIVERY
            else:
                deletes.append(ev)
            continue
        for ver in versions:
            ms, rs = lookups.milvus[ver].get(p), lookups.redis[ver].get(p)
            why: Skip | None = None
            if tomb >= ev.version or _newer(ms, ev.version) or _newer(rs, ev.version):
                why = Skip.STALE
            elif ms is not None and ms.pin_version == ev.version and not ev.reencode:
                why = Skip.REDELIVERY
            else:
                fetch[ver].append(ev)
            if why is not None and tomb < ev.version and ms is not None and rs != ms \
                    and not _newer(rs, ms.pin_version):
                repair[ver].append(p)
            if ver == primary and why is not None:
                skipped[p] = why
    work = {v: VersionWork(tuple(fetch[v]), tuple(repair[v])) for v in versions}
    return BatchPlan(tuple(deletes), work, skipped)


def split_reuse(events: Sequence[PinEvent], digests: Mapping[str, str],
                stored: Mapping[str, PinState]) -> tuple[list[PinEvent], list[PinEvent]]:
    """Split fetched upserts of one version into ``(encode, reuse)``.

    An image whose bytes hash like the stored vector's source reuses that
    vector (a new pin version with the same picture), unless the event asks
    for a re-encode. Events whose image was not fetched (in ``digests``) are
    left out of both.
    """
    encode: list[PinEvent] = []
    reuse: list[PinEvent] = []
    for ev in events:
        digest = digests.get(ev.pin_id)
        if digest is None:
            continue
        ms = stored.get(ev.pin_id)
        if ms is not None and ms.content_hash == digest and not ev.reencode:
            reuse.append(ev)
        else:
            encode.append(ev)
    return encode, reuse
