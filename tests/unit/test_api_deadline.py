"""The read API's deadline: a store that does not answer in time is reported as such."""

from __future__ import annotations

import asyncio
import time

import pytest

from encoder.errors import StoreUnavailable
from store.api import _within


async def _times_out_itself(after_s: float, busy: bool = False) -> None:
    """A store client whose own timeout (the read deadline too) fires after ``after_s``;
    ``busy``: the event loop is held meanwhile (a loaded machine), so the API's timer
    cannot fire before the client's error arrives."""
    if busy:
        time.sleep(after_s)
    else:
        await asyncio.sleep(after_s)
    raise StoreUnavailable("Milvus has_collection failed: DEADLINE_EXCEEDED")


async def test_a_store_clients_own_timeout_at_the_deadline_is_the_read_deadline():
    """The API's store clients time out at the read deadline as well: whichever timer
    is seen first, the answer names the read deadline (CI saw the Milvus client's
    DEADLINE_EXCEEDED arrive first under load, its gRPC text the 503's message)."""
    with pytest.raises(StoreUnavailable, match=r"read deadline \(0.2 s") as err:
        await _within(0.2, _times_out_itself(0.25, busy=True))
    assert "DEADLINE_EXCEEDED" in str(err.value)  # what the store said, kept
    # a later call of a read of several: measured against what is left of the deadline
    with pytest.raises(StoreUnavailable, match=r"read deadline \(5 s"):
        await _within(5.0, _times_out_itself(0.25, busy=True), left_s=0.2)


async def test_a_store_error_before_the_deadline_keeps_its_own_message():
    with pytest.raises(StoreUnavailable, match="DEADLINE_EXCEEDED"):
        await _within(5.0, _times_out_itself(0.0))


async def test_a_store_silent_past_the_deadline_is_the_read_deadline():
    with pytest.raises(StoreUnavailable, match=r"read deadline \(0.1 s"):
        await _within(0.1, asyncio.sleep(30))
