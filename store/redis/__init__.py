"""Redis/Valkey backend: the hot cache for batch reads, the version pointers, the claims.

A package: the key layout and why keys share slots (`store.redis.keys`, with
its table, which docs/integration.md shows too), the Lua scripts (one file
each under ``store/redis/lua``, loaded by `store.redis.scripts`), the
connection and its error mapping (`store.redis.client`), and `RedisCache`
(`store.redis.cache`) in its parts: the registry, writes and claims, reads.

Reads: a batch of 25 vectors is one ``MGET`` on a single node; on a cluster
the keys are grouped by slot and one pipeline goes to each node touched, all
nodes at once (one round trip per node). Writes of a batch: one script call
per pin (vector, meta and id set together). On a single node the calls go as
EVALSHA of the script's batch form, 256 pins per command, in one MULTI/EXEC;
on a cluster one EVALSHA per pin, pipelined per node, each pin still atomic.
A reader never sees a vector without its meta.

A URL ``redis+cluster://host:port`` (or ``rediss+cluster://``) names any node
of a cluster; ``redis://`` one node.
"""

from store.redis.cache import RedisCache
from store.redis.client import OUTAGE_CODES, as_text, is_outage
from store.redis.keys import CLUSTER_SCHEMES, REDIS_CLUSTER_HASH_SLOTS, pin_slot, slot_tag
from store.redis.registry import CACHE_COMPLETE
from store.redis.scripts import BATCH_CALLS
from store.redis.writes import WriteResult

__all__ = ["BATCH_CALLS", "CACHE_COMPLETE", "CLUSTER_SCHEMES", "OUTAGE_CODES",
           "REDIS_CLUSTER_HASH_SLOTS", "RedisCache", "WriteResult", "as_text", "is_outage",
           "pin_slot", "slot_tag"]
