"""`RedisCache`: the hot cache for batch reads, the version pointers and the writers' claims.

Its parts: the connection (`store.redis.client`), the registry
(`store.redis.registry`), writes and claims (`store.redis.writes`) and reads
(`store.redis.reads`), over the key layout of `store.redis.keys` and the
scripts of `store.redis.scripts`.
"""

from __future__ import annotations

from redis.crc import REDIS_CLUSTER_HASH_SLOTS

from store.redis.reads import ReadOps
from store.redis.writes import WriteOps


class RedisCache(WriteOps, ReadOps):
    """`VectorBackend` over Redis, plus the live pointer, tombstones and writer claims."""

    async def drop_version(self, version: str) -> int:
        """Delete every key of a version's namespace; returns keys removed."""
        removed = 0
        async for part in self.iter_pin_ids(version):
            keys = [k for pid in part
                    for k in (self.vec_key(version, pid), self.meta_key(version, pid))]
            removed += await self._pipelined("delete", [(k,) for k in keys])
        removed += await self._pipelined(
            "delete", [(self.ids_key(version, s),) for s in range(REDIS_CLUSTER_HASH_SLOTS)])
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self.reg_key(f"version:{version}"))
            pipe.srem(self.reg_key("versions"), version)
            await self._do(pipe.execute)
        self._info.pop(version, None)
        return removed
