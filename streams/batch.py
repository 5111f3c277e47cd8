"""One micro-batch as the write path sees it: its messages, its state, its report.

Step 1 of `streams.processor.PinProcessor.process` lives here: `parse` turns
raw Kafka messages into at most one event per pin (the newest) and a dead
letter per message that is malformed or keyed by another pin id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from encoder.errors import MalformedEvent, Reason
from streams.events import DeadLetter, PinEvent, guess_pin_id, parse_event

__all__ = ["Batch", "BatchReport", "Message", "parse"]


@dataclass(frozen=True, slots=True)
class Message:
    """One raw Kafka message (key and value bytes)."""

    key: bytes | None
    value: bytes | None


@dataclass
class BatchReport:
    """What one call of `PinProcessor.process` did."""

    received: int = 0
    encoded: int = 0
    reused: int = 0
    written: int = 0
    deleted: int = 0
    skipped: int = 0
    repaired: int = 0
    rewritten: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def merge(self, other: BatchReport) -> BatchReport:
        """Add up two reports (the halves of a batch split by isolation)."""
        out = BatchReport()
        for name in ("received", "encoded", "reused", "written", "deleted", "skipped",
                     "repaired", "rewritten"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.dead_letters = self.dead_letters + other.dead_letters
        out.freshness_s = self.freshness_s + other.freshness_s
        out.seconds = {k: self.seconds.get(k, 0.0) + other.seconds.get(k, 0.0)
                       for k in self.seconds.keys() | other.seconds.keys()}
        return out

    def add_time(self, stage: str, since: float) -> None:
        """Add the time since ``since`` (`time.perf_counter`) to a stage."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - since


@dataclass
class Batch:
    """The state of one `process` call between its steps."""

    events: list[PinEvent]
    report: BatchReport
    #: index of the event (in ``events``) -> its dead letter; one per event at most
    failed: dict[int, DeadLetter] = field(default_factory=dict)
    #: pins whose primary-version entry this batch wrote to Redis (not refused as stale)
    written: set[str] = field(default_factory=set)
    primary: str = ""
    #: pin id -> the message value its event came in, byte for byte (for its dead letter)
    raw: dict[str, bytes | None] = field(default_factory=dict)
    #: pin id -> its event (a batch holds one event per pin)
    by_pin: dict[str, PinEvent] = field(init=False)

    def __post_init__(self) -> None:
        self.by_pin = {e.pin_id: e for e in self.events}

    def fail(self, ev: PinEvent, letter: DeadLetter) -> None:
        """Dead-letter one event (its first failure wins)."""
        i = next(k for k, e in enumerate(self.events) if e is ev)
        self.failed.setdefault(i, letter)

    def original(self, ev: PinEvent) -> bytes | None:
        """The message value ``ev`` was parsed from, as sent (not re-serialised)."""
        return self.raw[ev.pin_id] if ev.pin_id in self.raw else ev.to_bytes()

    def has_failed(self, ev: PinEvent) -> bool:
        """Whether this very event has a dead letter already."""
        return any(self.events[i] is ev for i in self.failed)

    def letters(self) -> list[DeadLetter]:
        """Its events' dead letters, in event order."""
        return [self.failed[i] for i in sorted(self.failed)]


def parse(messages: Sequence[Message], report: BatchReport,
          letter: Callable[[Reason, str, bytes | None, str | None], DeadLetter],
          ) -> tuple[Batch, list[DeadLetter]]:
    """Step 1: validate every message; keep the newest event per pin.

    A malformed message, or one whose Kafka key is not its pin id
    (``key_mismatch``), becomes a dead letter (``letter`` builds it); an older
    or equal event of a pin already in the batch counts as skipped.
    """
    letters: list[DeadLetter] = []
    events: dict[str, PinEvent] = {}
    raws: dict[str, bytes | None] = {}
    for msg in messages:
        try:
            ev = parse_event(msg.value)
            key = msg.key.decode("utf-8", "replace") if msg.key is not None else None
            if key != ev.pin_id:
                raise MalformedEvent(
                    f"event of pin {ev.pin_id!r} arrived keyed {key!r}: key every event by "
                    "its pin id, or the pin's events can land on different partitions and "
                    "be applied out of order (docs/integration.md)", Reason.KEY_MISMATCH)
        except MalformedEvent as exc:
            letters.append(letter(exc.reason, str(exc), msg.value,
                                  guess_pin_id(msg.value, msg.key)))
            continue
        cur = events.get(ev.pin_id)
        if cur is None or ev.version >= cur.version:
            events[ev.pin_id] = ev
            raws[ev.pin_id] = msg.value
        if cur is not None:
            report.skipped += 1
    return Batch(list(events.values()), report, raw=raws), letters
