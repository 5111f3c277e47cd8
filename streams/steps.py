"""What every step of the write path shares: the stores, the settings, retries, letters.

`streams.processor.PinProcessor` builds one `Context` and hands it to its steps
(`streams.lookup`, `streams.gather`, `streams.claims`, `streams.letters`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from encoder.errors import Reason, Unavailable
from store.base import EmbeddingRecord
from streams import metrics
from streams.events import DeadLetter, PinEvent
from streams.ports import Cache, ProcessorHooks, VectorStore, VersionSource
from streams.retry import Backoff, retry
from streams.settings import WorkerSettings

__all__ = ["Context"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Context:
    """The parts of one processor every step uses.

    Attributes:
        writer_ttl_s: how long a writer's claim lives without a renewal (and how
            long a writer waits at most for an older one: its claim expires then).
    """

    milvus: VectorStore
    cache: Cache
    settings: WorkerSettings
    versions: VersionSource
    worker_name: str
    hooks: ProcessorHooks = field(default_factory=ProcessorHooks)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    writer_ttl_s: float = 60.0

    def backoff(self) -> Backoff:
        """The stream's capped backoff (``retry_backoff_s``, ``retry_backoff_max_s``)."""
        return Backoff(self.settings.retry_backoff_s, self.settings.retry_backoff_max_s,
                       sleep=self.sleep)

    async def retry(self, stage: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` until it raises no `Unavailable`, for ever.

        Capped exponential backoff with jitter, at least the ``retry_after``
        the error asks for; nothing may be acknowledged unwritten.
        """
        def note(exc: BaseException, attempt: int, wait: float) -> None:
            metrics.RETRIES.labels(stage=stage).inc()
            metrics.note_outage()  # a stall now is the outage's, not a hang (liveness)
            logger.warning("%s unavailable (attempt %d, retry in %.1fs): %s",
                           stage, attempt, wait, exc)

        return await retry(fn, retry_on=(Unavailable,), backoff=self.backoff(), on_retry=note)

    def letter(self, reason: Reason, error: str, raw: bytes | None, pin_id: str | None,
               attempts: int = 1, tb: str | None = None) -> DeadLetter:
        """A dead letter signed by this worker."""
        return DeadLetter.build(reason, error, raw, pin_id=pin_id, attempts=attempts,
                                worker=self.worker_name, traceback=tb)

    def vanished(self, ver: str) -> None:
        """A version disappeared mid-batch (retired): leave it out from now on."""
        logger.warning("version %s vanished (retired?): no longer written", ver)
        self.versions.forget(ver)

    @staticmethod
    def record(ver: str, ev: PinEvent, vector: np.ndarray, digest: str,
               encode_time: float) -> EmbeddingRecord:
        """The stored record of ``ev``'s image in version ``ver``."""
        return EmbeddingRecord(
            pin_id=ev.pin_id, vector=vector, model_version=ver, content_hash=digest,
            pin_version=ev.version, event_time=ev.event_time, encode_time=encode_time,
            image_location=ev.image or "", caption=ev.caption, metadata=dict(ev.metadata),
        )
