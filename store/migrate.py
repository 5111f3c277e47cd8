"""Move a single node's keys from pinfresh 0.1's layout to the cluster-ready one.

0.1 wrote ``pf:live``, ``pf:previous``, ``pf:versions``, ``pf:version:v``,
``pf:v:vec:PIN``, ``pf:v:meta:PIN``, one ``pf:v:ids`` set per version and
``pf:tomb:PIN``. The layout of `store.redis` hash-tags them (``{pf}:live``,
``pf:v:vec:{PIN}``, one ids set per slot, ...). `migrate_keys` renames every
key in place (RENAME keeps TTLs), on the one node where 0.1 ran, and can be
run again after an interruption: keys already moved are skipped.
"""

from __future__ import annotations

import logging
from collections import Counter

from encoder.errors import StateError
from store.redis import RedisCache, as_text, pin_slot

logger = logging.getLogger(__name__)


async def migrate_keys(cache: RedisCache, chunk: int = 1000) -> Counter[str]:
    """Rename 0.1's keys to the current layout; returns counts per kind of key.

    Raises:
        StateError: the cache is a cluster (0.1 never ran on one), or a key
            exists in both layouts (migrated by hand halfway?).
    """
    if cache.cluster:
        raise StateError("pinfresh 0.1 ran on a single node only: nothing to migrate on a "
                         "cluster (copy the node's keys with `migrate-keys` first, then move "
                         "them)")
    r, p = cache.client, cache.p
    done: Counter[str] = Counter()
    for name in ("live", "previous", "versions"):
        if await r.exists(f"{p}:{name}"):
            if await r.exists(cache.reg_key(name)):
                raise StateError(f"both {p}:{name} and {cache.reg_key(name)} exist: keep one")
            await r.rename(f"{p}:{name}", cache.reg_key(name))
            done["registry"] += 1
    versions = sorted(as_text(v) for v in await r.smembers(cache.reg_key("versions")))
    for v in versions:
        if await r.exists(f"{p}:version:{v}"):
            await r.rename(f"{p}:version:{v}", cache.reg_key(f"version:{v}"))
            done["registry"] += 1
        old_ids = f"{p}:{v}:ids"
        cursor: int | None = None
        while cursor != 0:
            cursor, members = await r.sscan(old_ids, cursor or 0, count=chunk)
            pins = [as_text(m) for m in members]
            async with r.pipeline(transaction=False) as pipe:
                for pid in pins:
                    pipe.rename(f"{p}:{v}:vec:{pid}", cache.vec_key(v, pid))
                    pipe.rename(f"{p}:{v}:meta:{pid}", cache.meta_key(v, pid))
                    pipe.sadd(cache.ids_key(v, pin_slot(pid)), pid)
                replies = await pipe.execute(raise_on_error=False)
            done["vectors"] += sum(1 for x in replies[0::3] if not isinstance(x, Exception))
            done["metas"] += sum(1 for x in replies[1::3] if not isinstance(x, Exception))
            done["ids"] += len(pins)
        await r.delete(old_ids)
    tombs = [k async for k in r.scan_iter(match=f"{p}:tomb:*", count=chunk)
             if b"{" not in k]
    for i in range(0, len(tombs), chunk):
        async with r.pipeline(transaction=False) as pipe:
            for k in tombs[i:i + chunk]:
                pipe.rename(k, cache.tomb_key(as_text(k)[len(f"{p}:tomb:"):]))
            replies = await pipe.execute(raise_on_error=False)
        done["tombstones"] += sum(1 for x in replies if not isinstance(x, Exception))
    done = +done  # drop the kinds with nothing moved
    logger.info("migrated %s keys of prefix %s to the hash-tagged layout", dict(done), p)
    return done
