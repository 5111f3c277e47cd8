"""The unit fakes keep the real engines' write rules (the same contract runs on Valkey
in tests/integration/test_store.py)."""

from __future__ import annotations

from tests.store_contract import check_cache_contract
from tests.unit.fakes import FakeCache


async def test_fake_cache_keeps_the_write_contract():
    cache = FakeCache(writer_ttl_s=0.3)
    await cache.ensure_version("m1", 4)
    await check_cache_contract(cache, "m1")
