"""Every Milvus call has a deadline: a frozen server is an outage, not a hung caller."""

from __future__ import annotations

import threading

import grpc
import pytest
from pymilvus.decorators import retry_on_rpc_failure
from pymilvus.exceptions import MilvusException

from encoder.errors import StateError, StoreUnavailable
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


class _Status(grpc.RpcError):
    """What grpc raises for a failed call: an RpcError with a status code."""

    def __init__(self, status: grpc.StatusCode) -> None:
        self.status = status

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return f"server answered {self.status.name}"


@pytest.mark.parametrize("status", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE])
async def test_a_grpc_status_lasting_until_the_deadline_is_an_outage(monkeypatch, status):
    """pymilvus's own retry loop (`retry_on_rpc_failure`, not a copy of it) ends with
    ``MilvusException(code=<grpc.StatusCode>)``: an outage, never a TypeError that the
    stream would isolate and dead-letter as internal_error."""
    import store.milvus as m

    class Failing:
        @retry_on_rpc_failure()
        def list_collections(self, timeout=None):
            raise _Status(status)

        def close(self):
            pass

    monkeypatch.setattr(m, "connect", lambda *a, **k: Failing())
    store = m.MilvusStore(MilvusSettings(timeout_s=0.1, deadline_s=0.3))
    try:
        with pytest.raises(StoreUnavailable, match=status.name):
            await store.ping()
    finally:
        await store.close()


@pytest.mark.parametrize("code", [None, "5", 5.0, 65535])
async def test_an_unknown_code_of_any_shape_is_a_state_error(monkeypatch, code):
    import store.milvus as m

    class Odd:
        def list_collections(self, timeout=None):
            raise MilvusException(code=code, message="odd")  # type: ignore[arg-type]

        def close(self):
            pass

    monkeypatch.setattr(m, "connect", lambda *a, **k: Odd())
    store = m.MilvusStore(MilvusSettings(timeout_s=0.1, deadline_s=0.3))
    try:
        with pytest.raises(StateError, match="odd"):
            await store.ping()
    finally:
        await store.close()
