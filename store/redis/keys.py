"""The Redis/Valkey key layout of pinfresh: names, hash tags, slot tags.

One key layout serves a single node and a Redis/Valkey Cluster alike
(``p`` is ``RedisSettings.key_prefix``, default ``pf``; ``v`` a model version
id). The part in braces is the hash tag: keys with the same tag live in the
same cluster slot.

| key | type | content |
| --- | --- | --- |
| ``{p}:live`` | string | the live model version id |
| ``{p}:previous`` | string | the version live before the last promote (rollback target) |
| ``{p}:retired`` | hash | version -> when it was retired (workers never register it again) |
| ``{p}:versions`` | set | every known model version id |
| ``{p}:version:v`` | hash | ``dim``, ``dtype`` (float16/float32), ``model``, ``checkpoint``, ``seed``, ``created_at``, ``state``, ``cache`` (``complete``: see `RedisCache.mark_complete`) |
| ``p:v:vec:{PIN}`` | string | the vector: ``dim`` little-endian values of ``dtype``, L2-normalised |
| ``p:v:meta:{PIN}`` | hash | ``pin_version``, ``content_hash``, ``event_time``, ``encode_time``, ``written_at``, ``image_location``, ``caption``, ``metadata`` (the event's metadata object as JSON) |
| ``p:v:ids:{T}`` | set | pin ids of version ``v`` whose slot is ``T``'s (one set per slot, see below) |
| ``p:tomb:{PIN}`` | string | version of the pin's last delete (expires after ``tombstone_ttl_s``) |
| ``p:stats:freshness``, ``p:stats:encoded`` | list, string | recent freshness samples, encode count |
| ``p:dlq:marks`` | hash | dead letter key -> ``resolved|purged|replayed:<time>`` |
| ``{p:reg}:progress`` | hash | partition -> JSON: worker, committed offset, lag, when it moved |

What shares a slot, and why:

* Every key of one pin (its vector and meta in every version, its tombstone)
  hashes on the pin id, so a pin's write is one atomic script on one node.
* The registry keys share the tag ``{p}``: `promote` flips ``{p}:live`` and
  the states in one MULTI/EXEC, on a cluster too.
* The ids of a version are split into one set per cluster slot (16,384 at
  most), named by a tag ``T`` that hashes to that slot (``T`` is the smallest
  decimal integer whose CRC16 lands there, see `slot_tag`). A pin's id joins
  the set of its own slot in the same script that writes its vector, so the
  sets and the vectors never disagree, and no set grows past
  ``pins / 16,384`` members (6,100 at 100M pins). `count` sums ``SCARD`` over
  the sets, `iter_pin_ids` walks them slot by slot.

Every Lua script (``store/redis/lua``) names its keys by this table, and
``docs/integration.md`` shows the same table to outside teams.
"""

from __future__ import annotations

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = ["CLUSTER_SCHEMES", "REDIS_CLUSTER_HASH_SLOTS", "Keys", "pin_slot", "slot_tag"]

#: URL schemes that name a Redis/Valkey Cluster (any node of it).
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

_slot_tags: list[str] = []


def slot_tag(slot: int) -> str:
    """The smallest decimal integer, as text, whose CRC16 hash lands in ``slot``.

    ``p:v:ids:{slot_tag(s)}`` is the ids set of slot ``s``; any client can
    rebuild the table (110k CRC16 computations, 0.2 s in Python).
    """
    if not _slot_tags:
        tags: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        left, i = REDIS_CLUSTER_HASH_SLOTS, 0
        while left:
            s = key_slot(str(i).encode())
            if tags[s] is None:
                tags[s] = str(i)
                left -= 1
            i += 1
        _slot_tags.extend(t for t in tags if t is not None)
    return _slot_tags[slot]


def pin_slot(pin_id: str) -> int:
    """Cluster slot of every key of ``pin_id``."""
    return int(key_slot(pin_id.encode()))


class Keys:
    """The key names of one deployment (``prefix``: ``RedisSettings.key_prefix``)."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix
        #: ``{p}``: the hash tag every registry key shares.
        self.reg = "{" + prefix + "}"

    def vec_key(self, version: str, pin_id: str) -> str:
        """Key of a pin's vector."""
        return f"{self.p}:{version}:vec:{{{pin_id}}}"

    def meta_key(self, version: str, pin_id: str) -> str:
        """Key of a pin's metadata hash."""
        return f"{self.p}:{version}:meta:{{{pin_id}}}"

    def ids_key(self, version: str, slot: int) -> str:
        """Key of the set of a version's pin ids that hash to ``slot``."""
        return f"{self.p}:{version}:ids:{{{slot_tag(slot)}}}"

    def tomb_key(self, pin_id: str) -> str:
        """Key of a pin's tombstone."""
        return f"{self.p}:tomb:{{{pin_id}}}"

    def wip_key(self, pin_id: str) -> str:
        """Key of the hash of a pin's writers in flight (token -> ``version:ms:flag``)."""
        return f"{self.p}:wip:{{{pin_id}}}"

    def reg_key(self, name: str) -> str:
        """A registry key: ``{p}:live``, ``{p}:versions``, ``{p}:version:v``, ..."""
        return f"{self.reg}:{name}"
