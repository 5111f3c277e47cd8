"""Model-version registry, the live pointer, cutover and rollback.

A version is registered in Redis (``{p}:versions`` and the ``{p}:version:v``
hash, see `store.redis`) with its dimension, how to build its encoder
(``model``, ``checkpoint``, ``seed``) and a state:

* ``building``: being backfilled; workers write fresh events to it too;
* ``live``: what readers get (``{p}:live``, and the Milvus alias ``<prefix>_live``);
* ``previous``: the last live version, still written, so `rollback` returns
  to up-to-date answers;
* ``retired``: no longer written; `retire` drops its collection and keys
  once no worker writes it any more (two phases, see `VersionRegistry.retire`).

Workers report what they write (`RedisCache.report_writer`): the write set
of their next batch and the versions each of their batches in flight writes.
`VersionRegistry.wait_writers` reads those reports.

Readers resolve ``{p}:live`` once per request, so `promote` is a single SET from
their point of view (the Milvus alias is flipped just before it, for readers
that use Milvus directly).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from encoder.errors import CoverageError, StateError, UnknownVersion
from store.milvus import MilvusStore
from store.redis import REDIS_CLUSTER_HASH_SLOTS, RedisCache

logger = logging.getLogger(__name__)

#: States whose versions workers write to.
WRITTEN_STATES = ("live", "building", "previous")
#: How often a worker reads its write set from the registry (`streams.refresh`).
WRITE_SET_REFRESH_S = 3.0
#: A writer report older than this is from a worker that stopped or is idle.
WRITER_REPORT_FRESH_S = 60.0


async def mark_complete_if_empty(milvus: Any, cache: Any, version: str) -> bool:
    """Mark ``version``'s cache complete if its collection is empty; whether it is complete.

    Called once a version is registered in both stores (a worker's start, `versions
    create`). A version registered in Redis whose Milvus collection holds no row
    (counted at Strong consistency) cannot miss a row in Redis: from then on every
    writer writes Redis after Milvus, and a writer that dies in between leaves
    its claim for the next look-up to see. A collection that holds rows while
    Redis has no mark (Redis lost its data, or an older pinfresh filled it) stays
    unmarked until ``store verify --repair`` has copied Milvus into the cache.
    """
    got = await cache.lookup([version], [])
    if version in got.complete:
        return True
    if version not in got.registered or await milvus.count(version):
        return False
    await cache.mark_complete(version)
    logger.info("version %s starts empty in both stores: its cache is complete", version)
    return True


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version."""

    version: str
    state: str
    dim: int
    model: str
    checkpoint: str
    seed: int
    created_at: float
    live: bool


@dataclass(frozen=True)
class Coverage:
    """How completely a version covers the live one.

    Attributes:
        missing: live pins the version lacks.
        behind: pins the version holds at an older pin version than live.
        compared: pins held by both whose versions were compared (every one).
        sample_mismatched: of a sample of the compared pins, those whose
            content hash differs from live's in Milvus (the source of truth).
    """

    live: str
    version: str
    live_pins: int
    version_pins: int
    missing: list[str]
    sampled: int
    sample_mismatched: list[str]
    behind: list[str] = field(default_factory=list)
    compared: int = 0


class VersionRegistry:
    """Reads and changes the registry; every change is logged."""

    def __init__(self, milvus: MilvusStore, cache: RedisCache) -> None:
        self.milvus = milvus
        self.cache = cache

    async def all(self) -> list[VersionInfo]:
        """Every registered version, oldest first."""
        live = await self.cache.get_live()
        out = []
        for name, h in (await self.cache.versions()).items():
            out.append(VersionInfo(
                version=name, state="live" if name == live else h.get("state", "building"),
                dim=int(h.get("dim", 0)), model=h.get("model", ""),
                checkpoint=h.get("checkpoint", ""), seed=int(h.get("seed", 0) or 0),
                created_at=float(h.get("created_at", 0) or 0), live=name == live,
            ))
        return sorted(out, key=lambda v: v.created_at)

    async def get(self, version: str) -> VersionInfo:
        """One version.

        Raises:
            UnknownVersion: not registered.
        """
        for v in await self.all():
            if v.version == version:
                return v
        raise UnknownVersion(f"model version {version} is not registered: see "
                             "`pinfresh versions list`")

    async def register(self, version: str, dim: int, model: str, checkpoint: str | None,
                       seed: int) -> bool:
        """Create the version's collection and namespace (state ``building``).

        What `versions create` does: a version retired before is registered
        again (state ``building``). The first version ever registered becomes
        live. Returns whether it did.
        """
        if await self.cache.unmark_retired(version):
            await self.cache.set_version_state(version, "building")
            logger.info("version %s, retired before, is registered again (building)", version)
        await self.milvus.ensure_version(version, dim)
        await self.cache.ensure_version(version, dim, model,
                                        extra={"checkpoint": checkpoint or "", "seed": seed})
        await mark_complete_if_empty(self.milvus, self.cache, version)
        if await self.cache.set_live_if_none(version):
            await self.milvus.set_live(version)
            await self.cache.set_version_state(version, "live")
            logger.info("model version %s registered and live (first version)", version)
            return True
        return False

    async def join(self, version: str, dim: int, model: str, checkpoint: str | None,
                   seed: int) -> bool:
        """What a worker does with its own encoder's version when it starts.

        Workers follow the registry: they write the live version and the
        versions being built (`written`), whatever encoder they were started
        with. Only when no version is live yet (a new deployment) does a worker
        register its own, which then goes live. A version that the registry
        does not write is never registered here (a retired one comes back only
        through `versions create`); the worker says so in one line. Returns
        whether the worker's version is among those written.
        """
        if await self.cache.get_live() is None:
            await self.register(version, dim, model, checkpoint, seed)
            return True
        written = await self.written()
        if any(v.version == version for v in written):
            return True
        names = ", ".join(f"{v.version} ({v.state})" for v in written) or "none"
        retired_at = (await self.cache.retired()).get(version)
        if retired_at is not None:
            logger.error(
                "this worker's encoder is version %s, retired %s: it is not registered again "
                "and this worker writes the registry's versions instead (%s); point "
                "PINFRESH_ENCODER__CHECKPOINT at the live version's checkpoint, or run "
                "`pinfresh versions create` to bring %s back", version,
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(retired_at)), names,
                version)
        else:
            logger.warning(
                "this worker's encoder is version %s, which the registry does not write: this "
                "worker writes the registry's versions instead (%s); `pinfresh versions "
                "create` registers %s to backfill and promote it", version, names, version)
        return False

    async def written(self) -> list[VersionInfo]:
        """Versions the workers must write (live, building, previous)."""
        return [v for v in await self.all() if v.state in WRITTEN_STATES]

    async def coverage(self, version: str, sample: int = 50) -> Coverage:
        """How completely ``version`` covers the live version (counts and a sample).

        The sample compares pin version and content hash of random live pins.
        """
        live = await self.cache.get_live()
        if live is None:
            raise UnknownVersion("no live version")
        # slot range by slot range: a pin's ids live in the same slot in both versions,
        # so memory holds one range's ids, not the catalog's
        rng = random.Random(0)
        missing: list[str] = []
        picked: list[str] = []
        live_n = new_n = common = 0
        step = 1024
        behind: list[str] = []
        for lo in range(0, REDIS_CLUSTER_HASH_SLOTS, step):
            live_ids = set(await self.cache.pin_ids_in_slots(live, lo, lo + step))
            new_ids = set(await self.cache.pin_ids_in_slots(version, lo, lo + step))
            live_n, new_n = live_n + len(live_ids), new_n + len(new_ids)
            missing.extend(live_ids - new_ids)
            shared = sorted(live_ids & new_ids)
            # every shared pin's version, in pages: a pin the version holds at an older
            # pin version than live was missed by the dual writes and the backfill
            for i in range(0, len(shared), 2048):
                part = shared[i:i + 2048]
                old_v = await self.cache.get_states(live, part)
                new_v = await self.cache.get_states(version, part)
                behind.extend(p for p in part if p in old_v and (
                    p not in new_v or new_v[p].pin_version < old_v[p].pin_version))
            for pid in shared:  # reservoir sample of the common pins
                common += 1
                if len(picked) < sample:
                    picked.append(pid)
                elif (j := rng.randrange(common)) < sample:
                    picked[j] = pid
        missing.sort()
        old_s = await self.milvus.get_states(live, picked)
        new_s = await self.milvus.get_states(version, picked)
        mismatched = [p for p in picked if p in old_s and (
            p not in new_s or new_s[p].content_hash != old_s[p].content_hash
            or new_s[p].pin_version < old_s[p].pin_version)]
        return Coverage(live=live, version=version, live_pins=live_n,
                        version_pins=new_n, missing=missing, sampled=len(picked),
                        sample_mismatched=mismatched, behind=sorted(behind), compared=common)

    async def promote(self, version: str, sample: int = 50, force: bool = False
                      ) -> Coverage | None:
        """Make ``version`` live after checking it covers every live pin.

        Raises:
            CoverageError: pins missing or the sampled content check failed
                (finish the backfill: `pinfresh backfill --to VERSION`).
        """
        info = await self.get(version)
        live = await self.cache.get_live()
        if live == version:
            return None
        report = await self.coverage(version, sample)
        if not force and (report.missing or report.behind or report.sample_mismatched):
            raise CoverageError(
                f"{version} misses {len(report.missing)} live pins (e.g. {report.missing[:3]}), "
                f"holds {len(report.behind)} at an older pin version (e.g. "
                f"{report.behind[:3]}) and {len(report.sample_mismatched)} sampled pins differ: "
                f"run `pinfresh backfill --to {version}` and retry (or --force)"
            )
        await self.milvus.set_live(info.version)
        await self.cache.promote(version, previous=live)
        logger.info("promoted %s (previous live: %s)", version, live)
        return report

    async def rollback(self) -> str:
        """Make the previous version live again; returns it.

        Raises:
            StateError: there is no retained previous version.
        """
        prev = await self.cache.get_previous()
        if not prev or prev not in await self.cache.versions():
            raise StateError("no previous version retained to roll back to")
        live = await self.cache.get_live()
        await self.milvus.set_live(prev)
        await self.cache.promote(prev, previous=live)
        logger.info("rolled back to %s (was %s)", prev, live)
        return prev

    async def wait_writers(self, version: str, *, holding: bool, timeout_s: float,
                           sleep: Any = asyncio.sleep) -> bool:
        """Wait until every batch in flight writes ``version`` (``holding``), or none does.

        First waits one write-set refresh (`WRITE_SET_REFRESH_S`, plus a
        second), so every worker's next batch reads the registry as it is now;
        then reads the workers' reports (`RedisCache.report_writer`): with
        ``holding`` every batch in flight must write the version, without it
        none may. A report older than `WRITER_REPORT_FRESH_S` is from a worker
        that stopped and counts for nothing; an idle worker has no batch in
        flight. Returns False if that was not so within ``timeout_s``.
        """
        await sleep(WRITE_SET_REFRESH_S + 1.0)
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.time()
            batches = [b for w in (await self.cache.writers()).values()
                       if now - float(w.get("at", 0)) < WRITER_REPORT_FRESH_S
                       for b in w.get("batches", [])]
            ok = all(version in b for b in batches) if holding else \
                not any(version in b for b in batches)
            if ok:
                return True
            if time.monotonic() > deadline:
                return False
            await sleep(0.5)

    async def retire(self, version: str, drop: bool = True, wait_s: float = 300.0,
                     sleep: Any = asyncio.sleep) -> bool:
        """Stop writing a version, then drop its collection and keys (two phases).

        Phase 1 marks it ``retired``: workers leave it out of their write set
        at their next registry read (every `WRITE_SET_REFRESH_S`). Phase 2
        waits for that read, then until no worker's report still names the
        version (a batch in flight keeps its write set to the end), at most
        ``wait_s``, and drops. Returns whether every worker had let go before
        the drop; if not, a batch still writing it finds the collection gone
        and drops the version from its write set (`streams.processor`).

        Raises:
            StateError: it is live.
        """
        if await self.cache.get_live() == version:
            raise StateError(f"{version} is live: promote another version first")
        await self.cache.set_version_state(version, "retired")
        await self.cache.mark_retired(version)
        if await self.cache.get_previous() == version:
            await self.cache.clear_previous()
        clean = True
        if drop:
            clean = await self.wait_writers(version, holding=False, timeout_s=wait_s,
                                            sleep=sleep)
            if not clean:
                logger.warning("workers still report writing %s after %.0fs: dropping it "
                               "anyway", version, wait_s)
            await self.milvus.drop_version(version)
            await self.cache.drop_version(version)
            if not clean:  # a batch still writing may recreate keys: sweep once its claims
                # have expired (it finds the version unregistered from then on)
                await sleep(self.cache.settings.writer_ttl_s)
                await self.cache.drop_version(version)
        logger.info("retired %s%s", version, " (dropped)" if drop else "")
        return clean
