"""Every Milvus call has a deadline: a frozen server is an outage, not a hung caller."""

from __future__ import annotations

import threading

import pytest

from encoder.errors import StoreUnavailable
from store.config import MilvusSettings


async def test_a_call_that_does_not_return_is_an_outage_at_the_deadline(monkeypatch):
    import store.milvus as m

    release = threading.Event()
    seen: list[float | None] = []

    class Frozen:
        def list_collections(self, timeout=None):  # accepted the connection, then froze
            # pymilvus gives up at ``timeout`` (its retries included); this one never does
            seen.append(timeout)
            release.wait(30)
            return []

        def close(self):
            pass

    monkeypatch.setattr(m, "connect", lambda *a, **k: Frozen())
    store = m.MilvusStore(MilvusSettings(timeout_s=0.1, deadline_s=0.3))
    try:
        # without the deadline the call returns [] once released: no error at all
        with pytest.raises(StoreUnavailable, match="did not answer in 0.3s"):
            await store.ping()
        assert seen == [0.3]  # pymilvus's own retry loop is bounded by the deadline too
    finally:
        release.set()
        await store.close()
