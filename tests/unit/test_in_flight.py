"""Two micro-batches in flight: overlap when pins differ, order when they do not, acks in order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from streams.app import BatchesInFlight, DrainState


@dataclass
class _Msg:
    key: bytes
    value: bytes
    offset: int
    tp: str = "pins[0]"


@dataclass
class _Event:
    message: _Msg


class _Stream:
    def __init__(self) -> None:
        self.acked: list[int] = []

    async def ack(self, e: _Event) -> None:
        self.acked.append(e.message.offset)


class _Processor:
    """Batch ``slow`` takes long; records start and end order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.gates: dict[bytes, asyncio.Event] = {}

    async def handle(self, msgs):
        name = msgs[0].value.decode()
        self.log.append(f"start {name}")
        gate = self.gates.get(msgs[0].key)
        if gate is not None:
            await gate.wait()
        self.log.append(f"end {name}")


def _batch(name: str, pins: list[str], first: int) -> list[_Event]:
    return [_Event(_Msg(p.encode(), name.encode(), first + i)) for i, p in enumerate(pins)]


async def test_disjoint_batches_overlap_but_are_acked_in_order():
    proc, stream, drain = _Processor(), _Stream(), DrainState()
    proc.gates[b"a"] = asyncio.Event()
    flight = BatchesInFlight(proc, stream, drain, limit=2)
    await flight.submit(_batch("A", ["a", "b"], 0))
    await flight.submit(_batch("B", ["c", "d"], 2))  # no shared pin: starts while A runs
    await asyncio.sleep(0.05)
    assert proc.log == ["start A", "start B", "end B"]
    assert stream.acked == [] and not drain.idle.is_set()  # B done, but A first
    proc.gates[b"a"].set()
    await asyncio.wait_for(drain.idle.wait(), 5)
    assert stream.acked == [0, 1, 2, 3] and drain.acked == {"pins[0]": 4}
    await flight.cancel()


async def test_a_batch_sharing_a_pin_waits_for_the_one_in_flight():
    proc, stream, drain = _Processor(), _Stream(), DrainState()
    proc.gates[b"a"] = asyncio.Event()
    flight = BatchesInFlight(proc, stream, drain, limit=2)
    await flight.submit(_batch("A", ["a", "b"], 0))
    waiting = asyncio.create_task(flight.submit(_batch("C", ["x", "b"], 2)))  # shares b
    await asyncio.sleep(0.05)
    assert proc.log == ["start A"] and not waiting.done()
    proc.gates[b"a"].set()
    await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(drain.idle.wait(), 5)
    assert proc.log == ["start A", "end A", "start C", "end C"]
    assert stream.acked == [0, 1, 2, 3]
    await flight.cancel()


async def test_the_limit_bounds_batches_in_flight():
    proc, stream, drain = _Processor(), _Stream(), DrainState()
    for k in (b"a", b"c"):
        proc.gates[k] = asyncio.Event()
    flight = BatchesInFlight(proc, stream, drain, limit=2)
    await flight.submit(_batch("A", ["a"], 0))
    await flight.submit(_batch("B", ["c"], 1))
    third = asyncio.create_task(flight.submit(_batch("C", ["e"], 2)))
    await asyncio.sleep(0.05)
    assert not third.done() and proc.log == ["start A", "start B"]
    proc.gates[b"a"].set()
    await asyncio.wait_for(third, 5)
    proc.gates[b"c"].set()
    await asyncio.wait_for(drain.idle.wait(), 5)
    assert stream.acked == [0, 1, 2]
    await flight.cancel()
