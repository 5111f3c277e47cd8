"""The dead-letter sink: writes `DeadLetter` records to the DLQ topic, keyed by pin id.

One sink for every writer (stream workers, the backfill). Its contract with
`streams.processor.PinProcessor`:

* `DeadLetterSink.send` returns once the broker acknowledged every letter;
* a broker that is down or slow raises `KafkaUnavailable`, and the caller
  retries (the stream pauses; nothing is acknowledged meanwhile);
* a letter the broker or the client refuses for its size or content is a
  permanent problem, never an outage: the sink sends a stripped letter (reason,
  error, pin id, the original's length and sha256, no original), and if even
  that is refused it logs the letter and counts it in
  ``pinfresh_dead_letters_dropped_total`` instead of stalling the stream;
* letters are sent concurrently; after a partial failure the raised
  `DeadLetterSendError` names the ones that were acknowledged, so a retry
  sends only the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from encoder.errors import DeadLetterSendError, KafkaUnavailable
from streams import metrics
from streams.events import DeadLetter
from streams.kafka import aiokafka_kwargs
from streams.settings import KafkaSettings

logger = logging.getLogger(__name__)


def letter_key(dl: DeadLetter) -> str:
    """What makes letters copies of one another: the same original event.

    A replayed event that fails again gets a letter with the same key, so it is
    one open letter (with two copies on the topic), not two.
    """
    # with the pin id: empty originals (tombstones of different pins) stay apart
    return f"{dl.pin_id}:{dl.original_sha256}" if dl.original_sha256 \
        else f"{dl.pin_id}@{dl.failed_at:.3f}"


@dataclass
class OpenLetter:
    """The newest letter of one original event, with how many copies the topic holds."""

    letter: DeadLetter
    copies: int
    key: str


def open_letters(letters: Sequence[DeadLetter],
                 marks: Mapping[str, tuple[str, float]]) -> list[OpenLetter]:
    """One entry per original event whose newest letter is newer than its mark.

    A mark (resolved, purged or replayed at time t) closes the letters written
    before t; a letter written after it (the event failed again) opens it again.
    The times are wall clocks of the marking host and the failing worker: hosts
    must keep their clocks in sync (NTP) for a quick refailure to reopen a letter.
    The order is the topic's (by the newest copy's position).
    """
    groups: dict[str, OpenLetter] = {}
    for dl in letters:
        key = letter_key(dl)
        seen = groups.pop(key, None)
        latest = dl if seen is None or dl.failed_at >= seen.letter.failed_at else seen.letter
        groups[key] = OpenLetter(latest, (seen.copies if seen else 0) + 1, key)
    return [o for o in groups.values()
            if o.key not in marks or marks[o.key][1] < o.letter.failed_at]

#: Errors that retrying the same record cannot fix.
_PERMANENT = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError,
              TypeError, ValueError)


class KafkaDeadLetters:
    """`DeadLetterSink` over its own aiokafka producer (started on first use)."""

    def __init__(self, k: KafkaSettings) -> None:
        self.k = k
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()  # two batches in flight must not start two producers

    async def _ensure(self) -> AIOKafkaProducer:
        async with self._starting:
            if self._producer is None:
                producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(self.k))
                try:
                    await producer.start()
                except KafkaError as exc:
                    await producer.stop()
                    raise KafkaUnavailable(
                        f"DLQ producer cannot reach Kafka: {exc!r}") from exc
                self._producer = producer
            return self._producer

    async def _send_one(self, producer: AIOKafkaProducer, dl: DeadLetter) -> None:
        key = (dl.pin_id or "").encode() or None
        try:
            await producer.send_and_wait(self.k.dlq_topic, dl.model_dump_json().encode(), key=key)
            return
        except _PERMANENT as exc:
            logger.error("dead letter of %s refused (%r): sending it without the original",
                         dl.pin_id, exc)
        stripped = dl.model_copy(update={"original": "", "original_truncated": True,
                                         "traceback": None, "error": dl.error[:500]})
        try:
            await producer.send_and_wait(self.k.dlq_topic, stripped.model_dump_json().encode(),
                                         key=key)
        except _PERMANENT as exc:
            metrics.DEAD_LETTERS_DROPPED.inc()
            logger.error("dead letter dropped, refused even without its original (%r): %s",
                         exc, stripped.model_dump_json())

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Send every letter and wait for the broker's acks (see the module docstring).

        Raises:
            DeadLetterSendError: the broker is unreachable or timed out; the letters
                that did get through are not sent again by the next call.
        """
        if not letters:
            return
        producer = await self._ensure()
        results = await asyncio.gather(*(self._send_one(producer, dl) for dl in letters),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for r in failed:
            if isinstance(r, asyncio.CancelledError):
                raise r
        if failed:
            sent = [dl for dl, r in zip(letters, results, strict=True)
                    if not isinstance(r, BaseException)]
            raise DeadLetterSendError(
                f"DLQ write failed for {len(failed)} of {len(letters)} letters: {failed[0]!r}",
                sent=sent) from failed[0]

    async def close(self) -> None:
        """Stop the producer (pending sends are flushed)."""
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
