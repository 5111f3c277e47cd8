"""Step 2 of the write path: what the stores hold of a batch's pins, Redis first.

Redis holds the state (pin version, content hash) of every pin written to
Milvus: each writer writes Redis right after Milvus, nothing in Redis expires
but tombstones and claims, and Redis must run with ``maxmemory-policy
noeviction``. A version's registry hash carries a mark, ``cache = complete``,
set when the version starts empty in both stores
(`store.registry.mark_complete_if_empty`) or by ``store verify --repair``;
losing Redis's data loses the mark. A batch's look-up therefore reads:

* Redis, for every pin (one script call per pin, one command per batch);
* Milvus at Eventually, only for pins that another writer has claimed (one
  in flight, or one that died between its two writes and whose claim has not
  expired): the redelivered event of a dead writer is then skipped and the
  cache repaired instead of encoding again. Eventually waits for no time tick;
* Milvus at Strong, every pin, for a version whose cache is not marked
  complete or when Redis may evict: until a repair, an older event must not
  overwrite what only Milvus still knows. Strong waits for the server's next
  time tick (``docs/benchmarks.md`` has the measured cost of each level),
  every batch.

A read at Session right after this process's own upsert waits for the tick
too, which is why the stream never uses it. None of these reads decides a
write on its own: every write is still checked by the claim and the
conditional write in Redis (`streams.claims`), so a lagging read can only
cost a useless fetch or encode.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from functools import partial

from encoder.errors import UnknownVersion
from store.base import PinState
from streams.plan import Lookups
from streams.ports import Encoder
from streams.steps import Context

__all__ = ["LookUp"]

logger = logging.getLogger(__name__)


class LookUp:
    """Reads a batch's tombstones and every written version's pin states."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        #: whether Redis keeps every entry (maxmemory-policy noeviction; the processor's
        #: start checks)
        self.trust_cache = True
        self._shown_untrusted: set[str] = set()

    async def run(self, ids: list[str], write: dict[str, Encoder], primary: str) -> Lookups:
        """Tombstones and every written version's pin states (see the module docstring).

        A version gone from the registry (retired) leaves ``write``; the primary
        one never does.
        """
        versions = list(write)
        got = await self.ctx.retry("redis", partial(self.ctx.cache.lookup, versions, ids))
        for ver in versions:
            if ver != primary and ver not in got.registered:
                self.ctx.vanished(ver)
                write.pop(ver)
        trusted = {v for v in write if v in got.complete and self.trust_cache}
        ask = {v: ([p for p in ids if p in got.claimed] if v in trusted else ids) for v in write}
        found = await asyncio.gather(*(
            self._milvus_states(v, ask[v], "Eventually" if v in trusted else "Strong",
                                v == primary) for v in write))
        milvus: dict[str, Mapping[str, PinState]] = {}
        for ver, states in zip(list(write), found, strict=True):
            if states is None:
                write.pop(ver)
            elif ver in trusted:  # what Redis holds, Milvus was written first
                milvus[ver] = {**got.states[ver], **states}
            else:
                milvus[ver] = states
        self._untrusted(set(write) - trusted)
        return Lookups(got.tombs, milvus, {v: got.states[v] for v in write})

    async def _milvus_states(self, ver: str, ids: list[str], consistency: str, primary: bool
                             ) -> dict[str, PinState] | None:
        """Milvus states of one version's pins; None if a non-primary version vanished."""
        if not ids:
            return {}
        try:
            return await self.ctx.retry("milvus", partial(
                self.ctx.milvus.get_states, ver, ids, consistency=consistency))
        except UnknownVersion:
            if primary:
                raise
            self.ctx.vanished(ver)
            return None

    def _untrusted(self, versions: set[str]) -> None:
        """Log, once per change, the versions whose look-ups read Milvus at Strong."""
        if versions == self._shown_untrusted:
            return
        for ver in sorted(versions - self._shown_untrusted):
            why = ("Redis's maxmemory-policy may evict entries" if not self.trust_cache
                   else "Redis does not mark its cache complete (its data was lost, or "
                        "an older pinfresh wrote it)")
            logger.warning("version %s: every batch reads Milvus at Strong consistency, "
                           "waiting for its time tick, because %s; `pinfresh store verify "
                           "--repair` rebuilds the cache and marks it complete", ver, why)
        self._shown_untrusted = set(versions)
