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
