"""The backfill's lag watch (streams.refresh.LagWatch): it yields while the workers lag,
reads the lag beside the backfill instead of in its way, and hands a failed read on."""

from __future__ import annotations

import asyncio

import pytest

from streams.refresh import LagWatch


async def test_the_backfill_waits_while_the_lag_is_high_and_goes_on_when_it_drops():
    lags = iter([500, 500, 500, 3] + [0] * 10_000)
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        return next(lags)

    async with LagWatch(read, threshold=100, every_s=0.01, waiting_every_s=0.01) as w:
        assert w.behind  # the first answer is there before the first batch
        waited = await w.wait()
        assert not w.behind and reads >= 4 and waited > 0


async def test_a_batch_never_waits_for_a_read_when_the_lag_is_low():
    gate = asyncio.Event()

    async def read() -> int:
        if gate.is_set():
            await asyncio.Event().wait()  # a read that hangs (a slow broker)
        gate.set()
        return 0

    async with LagWatch(read, threshold=100, every_s=0.0, waiting_every_s=0.0) as w:
        # the second read hangs in the background; the backfill is not held by it
        for _ in range(100):  # batch after batch, while that read still hangs
            await asyncio.wait_for(w.wait(), timeout=60)
        assert not w.behind


async def test_a_failed_read_reaches_the_backfill():
    async def read() -> int:
        raise ConnectionError("broker down")

    async with LagWatch(read, threshold=100, every_s=0.01) as w:
        with pytest.raises(ConnectionError):
            await w.wait()
