"""The cache's key layout: what must share a Redis Cluster slot does."""

from __future__ import annotations

from redis.crc import key_slot

from store.config import RedisSettings
from store.redis import RedisCache, pin_slot, slot_tag


def test_every_slot_has_a_tag_that_hashes_to_it():
    tags = [slot_tag(s) for s in range(16384)]
    assert all(key_slot(t.encode()) == s for s, t in enumerate(tags))
    assert len(set(tags)) == 16384


def test_a_pins_keys_and_its_ids_set_share_one_slot_and_the_registry_another():
    cache = RedisCache(RedisSettings(url="redis+cluster://127.0.0.1:1", key_prefix="pf"))
    assert cache.cluster
    for pid in ("tux-animals-frog", "v12345", "a:b.c-d"):
        keys = [cache.vec_key("va", pid), cache.meta_key("va", pid), cache.vec_key("vb", pid),
                cache.tomb_key(pid), cache.ids_key("va", pin_slot(pid))]
        assert {key_slot(k.encode()) for k in keys} == {pin_slot(pid)}
    reg = [cache.reg_key(n) for n in ("live", "previous", "versions", "version:va")]
    assert len({key_slot(k.encode()) for k in reg}) == 1
    assert cache.reg_key("live") == "{pf}:live" and cache.vec_key("va", "p1") == "pf:va:vec:{p1}"
    assert not RedisCache(RedisSettings(url="redis://127.0.0.1:1/0")).cluster


def test_commands_are_packed_by_hiredis_into_the_same_bytes():
    """The cache's connections pack with hiredis (C); the bytes are redis-py's own."""
    from redis.asyncio.connection import Connection

    from store.redis.client import _HiredisPacking

    cache = RedisCache(RedisSettings(url="redis://127.0.0.1:1/0"))
    cls = cache._r.connection_pool.connection_class
    assert issubclass(cls, _HiredisPacking) and issubclass(cls, Connection)
    fast, slow = cls(), Connection()
    for args in [("EVALSHA", "a" * 40, 2, "k:{p}", "t:{p}", "w", "12", b"\x00\xff" * 600,
                  "pin-é", 1.5, 0.1 + 0.2, -7, memoryview(b"mv"), bytearray(b"ba")),
                 ("CONFIG GET", "maxmemory-policy"), (b"SCRIPT LOAD", "return 1")]:
        assert b"".join(fast.pack_command(*args)) == b"".join(slow.pack_command(*args))
    cmds = [("SET", "a", "1"), ("GET", "a")]
    assert b"".join(fast.pack_commands(cmds)) == b"".join(slow.pack_commands(cmds))
    import pytest
    from redis.exceptions import DataError

    with pytest.raises(DataError):
        fast.pack_command("SET", "a", None)
    with pytest.raises(DataError):
        slow.pack_command("SET", "a", None)
    from redis.asyncio.connection import SSLConnection

    tls = RedisCache(RedisSettings(url="rediss://127.0.0.1:1/0"))
    assert issubclass(tls._r.connection_pool.connection_class, SSLConnection)
    clu = RedisCache(RedisSettings(url="redis+cluster://127.0.0.1:1"))
    assert issubclass(clu._r.connection_kwargs["connection_class"], _HiredisPacking)
