"""Step 6 of the write path, and what the processor tells the world: letters and reports.

* `Letters` writes dead letters, each once per `PinProcessor.handle` call
  (several tries of one batch, the halves of an isolated batch), retrying
  while the dead-letter topic is down, and builds the ``internal_error``
  letter of an event that kept raising.
* `Reporter` sends the writer report (`Cache.report_writer`: the versions the
  worker writes, those each batch in flight writes, what the worker adds, such
  as the partitions it holds), keeps ``pinfresh_worker_model_info`` current,
  and turns a batch report into metrics, a log line and the freshness samples
  `pinfresh status` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from encoder.errors import Reason, Unavailable
from streams import metrics
from streams.batch import BatchReport, Message
from streams.events import DeadLetter, guess_pin_id
from streams.ports import DeadLetterSink
from streams.steps import Context

__all__ = ["REPORT_EVERY_S", "REPORT_SAME_S", "Letters", "Reporter"]

logger = logging.getLogger(__name__)
#: Fingerprints of the dead letters written during the current `PinProcessor.handle` call.
_SENT: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("pinfresh_sent",
                                                                        default=None)
#: How often a batch in flight renews its writer report (`store.registry.wait_writers`).
REPORT_EVERY_S = 10.0
#: An unchanged writer report is sent again after this long at the latest (a report
#: older than `store.registry.WRITER_REPORT_FRESH_S`, 60 s, counts for nothing).
REPORT_SAME_S = 5.0


class Letters:
    """Dead letters, each once per `handle` call."""

    def __init__(self, ctx: Context, dlq: DeadLetterSink) -> None:
        self.ctx, self.dlq = ctx, dlq

    @staticmethod
    @contextlib.contextmanager
    def once_per_call() -> Any:
        """Scope in which a letter already written is not written again (one `handle`)."""
        token = _SENT.set(set())
        try:
            yield
        finally:
            _SENT.reset(token)

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Write dead letters once each per `handle` call, retrying while the DLQ is down."""
        sent = _SENT.get()
        if sent is None:  # outside `handle` (a direct `process` call): this call's own
            sent = set()
        todo = [dl for dl in letters if dl.fingerprint not in sent]

        async def attempt() -> None:
            nonlocal todo
            try:
                await self.dlq.send(todo)
            except Unavailable as exc:
                done = {dl.fingerprint for dl in getattr(exc, "sent", [])}
                sent.update(done)
                todo = [dl for dl in todo if dl.fingerprint not in done]
                raise
            sent.update(dl.fingerprint for dl in todo)
            for dl in todo:
                metrics.DEAD_LETTERS.labels(reason=dl.reason.value).inc()

        if todo:
            await self.ctx.retry("dlq", attempt)

    async def internal_error(self, msg: Message, exc: Exception, attempts: int
                             ) -> BatchReport:
        """Dead-letter an event that kept raising, with its traceback; never raises."""
        pin = guess_pin_id(msg.value, msg.key)
        logger.error("event of pin %s dead-lettered as internal_error after %d attempts",
                     pin, attempts, exc_info=exc)
        letter = self.ctx.letter(
            Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", msg.value, pin, attempts,
            tb="".join(traceback.format_exception(exc)),
        )
        try:
            await self.send([letter])
        except Exception:  # noqa: BLE001 - the sink itself is broken: log, never stall
            metrics.DEAD_LETTERS_DROPPED.inc()
            logger.exception("could not write the internal_error dead letter: %s",
                             letter.model_dump_json())
        metrics.EVENTS.labels(outcome="dead_letter").inc()
        return BatchReport(received=1, dead_letters=[letter])


class Reporter:
    """The writer report, the model-info gauge, and a batch's metrics and statistics."""

    def __init__(self, ctx: Context, observe_freshness: bool = True) -> None:
        self.ctx = ctx
        self.observe_freshness = observe_freshness
        #: write sets of the batches in flight (reported with `Cache.report_writer`)
        self.active: dict[int, frozenset[str]] = {}
        #: what the worker adds to each report (partitions held, host, pid, ...)
        self.extra: Callable[[], Mapping[str, Any]] = dict
        self._shown: set[str] = set()  # labels of pinfresh_worker_model_info
        self._lock = asyncio.Lock()
        self._sent: tuple[Any, ...] = ()  # the last report sent, and when
        self._sent_at = 0.0

    async def report(self, write: Sequence[str], *, tick: bool = False) -> None:
        """Report the write set and the batches' version sets (`Cache.report_writer`).

        One report at a time, each with the state when it is sent, so the last
        to land is the newest. `VersionRegistry.wait_writers` reads only which
        versions the batches hold, so each distinct set is reported once, and
        a report equal to the last one sent less than `REPORT_SAME_S` ago is
        skipped: a worker streaming batches of the same versions sent two
        identical reports a batch (two Redis round trips). ``tick``: the
        periodic refresh, always sent, not retried.
        """
        async with self._lock:
            batches = sorted({tuple(sorted(b)) for b in self.active.values()})
            extra = dict(self.extra())
            state = (tuple(write), tuple(batches), tuple(sorted(extra.items(), key=str)))
            now = time.monotonic()
            if not tick and state == self._sent and now - self._sent_at < REPORT_SAME_S:
                return
            send = partial(self.ctx.cache.report_writer, self.ctx.worker_name, list(write),
                           [list(b) for b in batches], extra)
            try:
                await (send() if tick else self.ctx.retry("redis", send))
            except BaseException:
                self._sent = ()  # it may have landed or not: the next one goes out
                raise
            self._sent, self._sent_at = state, now

    async def keep_reporting(self, write: list[str]) -> None:
        """Report every `REPORT_EVERY_S` while a batch runs (an outage can hold it long)."""
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            with contextlib.suppress(Unavailable):
                await self.report(write, tick=True)

    def show_versions(self, write: Mapping[str, Any]) -> None:
        """``pinfresh_worker_model_info``: one series per version this worker writes now."""
        for ver in self._shown - set(write):
            with contextlib.suppress(KeyError):
                metrics.MODEL_INFO.remove(ver)
        for ver in write:
            metrics.MODEL_INFO.labels(version=ver).set(1)
        self._shown = set(write)

    async def observe(self, report: BatchReport) -> None:
        """A batch's metrics, its log line and its freshness samples (never raises them)."""
        metrics.BATCH_SIZE.observe(report.received)
        for stage, secs in report.seconds.items():
            metrics.STAGE_SECONDS.labels(stage=stage).observe(secs)
        if self.observe_freshness:
            for f in report.freshness_s:
                metrics.FRESHNESS.observe(max(f, 0.0))
        for outcome, n in (("written", report.written), ("deleted", report.deleted),
                           ("skipped", report.skipped),
                           ("dead_letter", len(report.dead_letters))):
            metrics.EVENTS.labels(outcome=outcome).inc(n)
        logger.info(
            "batch: %d events, %d encoded, %d reused, %d written, %d deleted, %d skipped, "
            "%d repaired, %d rewritten, %d dead letters in %.3fs (%s)",
            report.received, report.encoded, report.reused, report.written, report.deleted,
            report.skipped, report.repaired, report.rewritten, len(report.dead_letters),
            report.seconds.get("total", 0.0),
            " ".join(f"{k}={v:.3f}" for k, v in report.seconds.items() if k != "total"),
        )
        if self.observe_freshness and (report.freshness_s or report.encoded):
            try:
                await self.ctx.cache.record_batch_stats(report.freshness_s, report.encoded)
            except Unavailable as exc:  # statistics only: never hold the batch for them
                logger.warning("could not record batch statistics: %s", exc)
