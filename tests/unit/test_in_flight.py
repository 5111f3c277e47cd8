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


async def _until(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.001)


async def _settle() -> None:
    """Let every runnable task run until it blocks (no wall clock involved)."""
    for _ in range(200):
        await asyncio.sleep(0)


async def test_disjoint_batches_overlap_but_are_acked_in_order():
    proc, stream, drain = _Processor(), _Stream(), DrainState()
    proc.gates[b"a"] = asyncio.Event()
    flight = BatchesInFlight(proc, stream, drain, limit=2)
    await flight.submit(_batch("A", ["a", "b"], 0))
    await flight.submit(_batch("B", ["c", "d"], 2))  # no shared pin: starts while A runs
    await _until(lambda: "end B" in proc.log)
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
    await _until(lambda: proc.log == ["start A"])
    await _settle()
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
    await _until(lambda: proc.log == ["start A", "start B"])
    await _settle()
    assert not third.done() and proc.log == ["start A", "start B"]
    proc.gates[b"a"].set()
    await asyncio.wait_for(third, 5)
    proc.gates[b"c"].set()
    await asyncio.wait_for(drain.idle.wait(), 5)
    assert stream.acked == [0, 1, 2]
    await flight.cancel()


async def test_batches_clash_by_pin_id_even_when_the_keys_differ():
    """A producer that keys by something else: the pin id in the value still orders the
    two batches (the second is dead-lettered as key_mismatch, but never races the first)."""
    import json

    def ev(key: str, pin: str, name: str, off: int) -> _Event:
        value = json.dumps({"pin_id": pin, "name": name}).encode()
        return _Event(_Msg(key.encode(), value, off))

    class _ByName(_Processor):
        async def handle(self, msgs):
            name = json.loads(msgs[0].value)["name"]
            self.log.append(f"start {name}")
            gate = self.gates.get(name.encode())
            if gate is not None:
                await gate.wait()
            self.log.append(f"end {name}")

    proc, stream, drain = _ByName(), _Stream(), DrainState()
    proc.gates[b"A"] = asyncio.Event()
    flight = BatchesInFlight(proc, stream, drain, limit=2)
    await flight.submit([ev("k1", "pin-1", "A", 0)])
    waiting = asyncio.create_task(flight.submit([ev("other-key", "pin-1", "B", 1)]))
    await _until(lambda: proc.log == ["start A"])
    await _settle()
    assert not waiting.done() and proc.log == ["start A"]
    proc.gates[b"A"].set()
    await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(drain.idle.wait(), 5)
    assert proc.log == ["start A", "end A", "start B", "end B"]
