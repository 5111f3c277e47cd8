"""Compare the Redis cache with Milvus (the source of truth) and repair the cache.

Checked per pin of a version: present in both, same pin version, same content
hash, and the cached vector equal to Milvus' (cosine >= 0.999, the cache may
hold float16). Repair copies Milvus records over missing or wrong cache
entries and removes cache entries Milvus does not have.
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

    @property
    def ok(self) -> bool:
        """True when the cache agrees with Milvus."""
        return not (self.missing_in_cache or self.stale_in_cache or self.vector_mismatch
                    or self.extra_in_cache)


async def verify_cache(milvus: MilvusStore, cache: RedisCache, version: str,
                       repair: bool = False, chunk: int = 500) -> VerifyReport:
    """Compare (and optionally repair) one version's cache against Milvus."""
    rep = VerifyReport(version)
    rows = await milvus.iter_pins(version)
    truth = {r["pin_id"]: r for r in rows}
    cached_ids = set(await cache.pin_ids(version))
    rep.milvus_pins, rep.cache_pins = len(truth), len(cached_ids)
    ids = sorted(truth)
    for i in range(0, len(ids), chunk):
        part = ids[i:i + chunk]
        meta = await cache.get_meta(version, part)
        vecs, found = await cache.get_vectors(version, part)
        records = await milvus.get_many(version, part)
        for j, pid in enumerate(part):
            m, t = meta.get(pid), truth[pid]
            if m is None or not found[j]:
                rep.missing_in_cache.append(pid)
            elif int(m["pin_version"]) != int(t["pin_version"]) or \
                    m["content_hash"] != t["content_hash"]:
                rep.stale_in_cache.append(pid)
            else:
                a, b = vecs[j], records[pid].vector
                cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
                if cos < 0.999:
                    rep.vector_mismatch.append(pid)
        if repair:
            bad = {*rep.missing_in_cache, *rep.stale_in_cache, *rep.vector_mismatch}
            fix = [records[p] for p in part if p in bad and p in records]
            if fix:
                await cache.upsert(version, fix)
                rep.repaired += len(fix)
    rep.extra_in_cache = sorted(cached_ids - set(truth))
    if repair and rep.extra_in_cache:
        await cache.delete(version, rep.extra_in_cache)
        rep.repaired += len(rep.extra_in_cache)
    logger.info("verify %s: %d in Milvus, %d cached, %d missing, %d stale, %d wrong vectors, "
                "%d extra, %d repaired", version, rep.milvus_pins, rep.cache_pins,
                len(rep.missing_in_cache), len(rep.stale_in_cache), len(rep.vector_mismatch),
                len(rep.extra_in_cache), rep.repaired)
    return rep
