"""Compare the Redis cache with Milvus (the source of truth) and repair the cache.

Checked per pin of a version: present in both, same pin version, same content
hash, and the cached vector equal to Milvus' (cosine >= 0.999, the cache may
hold float16). Repair copies Milvus records over missing or wrong cache
entries (each record read again from Milvus at Strong consistency just
before, written as a compare-and-set on the version seen in Redis:
`RedisCache.replace`, so a worker's write landing meanwhile is kept), and
removes cache entries Milvus does not have (read again at Strong consistency
first, and removed only if they still hold the version seen). A repair then
marks the version's cache complete (`RedisCache.mark_complete`): workers that
read Milvus for every pin since Redis lost its data look pins up in Redis
alone again. A pin a worker
writes while the walk runs can show up as stale in the report; its repair
then writes what Milvus holds now.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from store.milvus import MilvusStore
from store.redis import RedisCache

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """Differences found (and, with repair, fixed) for one version."""

    version: str
    milvus_pins: int = 0
    cache_pins: int = 0
    missing_in_cache: list[str] = field(default_factory=list)
    stale_in_cache: list[str] = field(default_factory=list)
    vector_mismatch: list[str] = field(default_factory=list)
    extra_in_cache: list[str] = field(default_factory=list)
    repaired: int = 0
    #: the repair marked the cache complete (workers look pins up in Redis alone again)
    marked_complete: bool = False

    @property
    def ok(self) -> bool:
        """True when the cache agrees with Milvus."""
        return not (self.missing_in_cache or self.stale_in_cache or self.vector_mismatch
                    or self.extra_in_cache)


async def verify_cache(milvus: MilvusStore, cache: RedisCache, version: str,
                       repair: bool = False, chunk: int = 1000) -> VerifyReport:
    """Compare (and optionally repair) one version's cache against Milvus.

    One pass over Milvus' records, a page of ``chunk`` at a time, each page
    compared with one pipelined read of the cache; then the cache's ids that
    Milvus does not have.
    """
    rep = VerifyReport(version)
    truth_ids: set[str] = set()
    async for page in milvus.iter_records(version, batch_size=chunk):
        part = [r.pin_id for r in page]
        truth_ids.update(part)
        meta = await cache.get_meta(version, part)
        vecs, found = await cache.get_vectors(version, part)
        bad = []
        seen: dict[str, str | None] = {}
        for j, t in enumerate(page):
            m = meta.get(t.pin_id)
            if m is None or not found[j]:
                rep.missing_in_cache.append(t.pin_id)
            elif int(m["pin_version"]) != t.pin_version or m["content_hash"] != t.content_hash:
                rep.stale_in_cache.append(t.pin_id)
            else:
                a, b = vecs[j], t.vector
                cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
                if cos >= 0.999:
                    continue
                rep.vector_mismatch.append(t.pin_id)
            bad.append(t)
            seen[t.pin_id] = m.get("pin_version") if m is not None else None
        if repair and bad:
            # the walk reads at its start time: take Milvus's record as it is now (a
            # worker may have written the pin since), then compare-and-set on Redis
            fresh = await milvus.get_many(version, [t.pin_id for t in bad],
                                          consistency="Strong")
            rep.repaired += len(await cache.replace(version, list(fresh.values()), seen))
    cached_ids = set(await cache.pin_ids(version))
    rep.milvus_pins, rep.cache_pins = len(truth_ids), len(cached_ids)
    for found_list in (rep.missing_in_cache, rep.stale_in_cache, rep.vector_mismatch):
        found_list.sort()
    extra = sorted(cached_ids - truth_ids)
    if extra:  # written since the walk started? read them again, now, at Strong
        now_in_milvus = set(await milvus.get_many(version, extra, consistency="Strong"))
        extra = [p for p in extra if p not in now_in_milvus]
    rep.extra_in_cache = extra
    if repair and extra:
        held = await cache.get_meta(version, extra)
        rep.repaired += len(await cache.drop_if(version, {
            p: m["pin_version"] for p, m in held.items() if "pin_version" in m}))
    if repair:
        # every row Milvus held when the walk began is in the cache now (or a newer
        # write of its pin is), and every later write goes to Redis after Milvus
        await cache.mark_complete(version)
        rep.marked_complete = True
    logger.info("verify %s: %d in Milvus, %d cached, %d missing, %d stale, %d wrong vectors, "
                "%d extra, %d repaired", version, rep.milvus_pins, rep.cache_pins,
                len(rep.missing_in_cache), len(rep.stale_in_cache), len(rep.vector_mismatch),
                len(rep.extra_in_cache), rep.repaired)
    return rep
