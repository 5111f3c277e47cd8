"""Step 4 of the write path: fetch each image once, hash it, encode it or reuse a vector.

The first fetch of a batch goes out for all its images at once
(`Fetcher.fetch_many`: local files in one thread hand-off, URLs concurrently);
only transient failures are retried, one by one, up to ``fetch_attempts``
with backoff (a server's ``Retry-After`` wins when longer); what fails for
good becomes the event's dead letter. The content hashes are computed in a
thread (hashlib releases the GIL), one hand-off per batch. Per written
version, `streams.plan.split_reuse` decides which images are encoded and
which reuse the stored vector of the same bytes; an encoder that is down is
an outage (pause and retry, write nothing), an image it refuses a dead letter.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from functools import partial

from encoder.errors import ImageError, Reason, Rejected, TransientRejection
from store.base import EmbeddingRecord, PinState
from streams import metrics
from streams.batch import Batch
from streams.events import DeadLetter, PinEvent
from streams.fetch import FetchError
from streams.plan import split_reuse
from streams.ports import Encoder, Fetch
from streams.retry import retry
from streams.steps import Context

__all__ = ["Gather"]


class Gather:
    """Fetches a batch's images and turns them into records per version."""

    def __init__(self, ctx: Context, fetcher: Fetch) -> None:
        self.ctx, self.fetcher = ctx, fetcher
        self._sem = asyncio.Semaphore(ctx.settings.fetch_concurrency)

    async def fetch_all(self, events: list[PinEvent], batch: Batch
                        ) -> dict[str, tuple[bytes, str]]:
        """Each pin's image bytes and sha256, fetched once for every version.

        Failures become dead letters of their events.
        """
        t = time.perf_counter()
        try:
            first: list[bytes | FetchError] = await self.fetcher.fetch_many(
                [ev.image or "" for ev in events])
        except Exception as exc:  # noqa: BLE001 - never raise out of the agent
            first = [FetchError(Reason.FETCH_FAILED, f"unexpected: {exc!r}") for _ in events]
        got: list[bytes | DeadLetter | None] = [r if isinstance(r, bytes) else None
                                                for r in first]
        again_idx = [i for i, r in enumerate(first) if isinstance(r, FetchError)]
        if again_idx:
            again = await asyncio.gather(*(
                self._retry_fetch(events[i], batch.original(events[i]), first[i])  # type: ignore[arg-type]
                for i in again_idx))
            for i, later in zip(again_idx, again, strict=True):
                got[i] = later
        batch.report.add_time("fetch", t)
        ok = [(ev, res) for ev, res in zip(events, got, strict=True) if isinstance(res, bytes)]
        digests = await asyncio.to_thread(lambda: [hashlib.sha256(b).hexdigest()
                                                   for _, b in ok]) if ok else []
        for ev, item in zip(events, got, strict=True):
            if isinstance(item, DeadLetter):
                batch.fail(ev, item)
        return {ev.pin_id: (data, h) for (ev, data), h in zip(ok, digests, strict=True)}

    async def _retry_fetch(self, ev: PinEvent, raw: bytes | None, exc: FetchError
                           ) -> bytes | DeadLetter:
        """After a first attempt failed with ``exc``: give up, or wait and try again."""
        if not isinstance(exc, TransientRejection) or self.ctx.settings.fetch_attempts <= 1:
            return self.ctx.letter(exc.reason, str(exc), raw, ev.pin_id, 1)
        metrics.RETRIES.labels(stage="fetch").inc()
        await self.ctx.backoff().wait(exc.retry_after or 0.0)
        return await self._fetch_one(ev, raw, first=2)

    async def _fetch_one(self, ev: PinEvent, raw: bytes | None, first: int = 1
                         ) -> bytes | DeadLetter:
        """Fetch with retries of transient errors, from attempt ``first`` on.

        ``raw``: the event's message as sent, for its dead letter.
        """
        assert ev.image is not None  # guaranteed by PinEvent validation
        image = ev.image
        backoff = self.ctx.backoff()
        backoff.attempt = first - 1
        tried = first - 1

        async def once() -> bytes:
            nonlocal tried
            tried += 1
            async with self._sem:
                return await self.fetcher.fetch(image)

        def note(_exc: BaseException, _attempt: int, _wait: float) -> None:
            metrics.RETRIES.labels(stage="fetch").inc()

        try:
            # the server's Retry-After (already capped by the fetcher) wins when longer
            return await retry(once, retry_on=(TransientRejection,), backoff=backoff,
                               attempts=self.ctx.settings.fetch_attempts - first + 1,
                               on_retry=note)
        except Rejected as exc:
            return self.ctx.letter(exc.reason, str(exc), raw, ev.pin_id, tried)
        except Exception as exc:  # noqa: BLE001 - never raise out of the agent
            return self.ctx.letter(Reason.FETCH_FAILED, f"unexpected: {exc!r}", raw,
                                   ev.pin_id, tried)

    async def records(self, ver: str, enc: Encoder, todo: list[PinEvent],
                      fetched: dict[str, tuple[bytes, str]],
                      stored: Mapping[str, PinState], batch: Batch) -> list[EmbeddingRecord]:
        """The records of version ``ver`` for the fetched ``todo``: reused or encoded."""
        todo = [ev for ev in todo if ev.pin_id in fetched and not batch.has_failed(ev)]
        encode, reuse = split_reuse(todo, {p: h for p, (_, h) in fetched.items()}, stored)
        records: list[EmbeddingRecord] = []
        if reuse:
            encode += await self._reuse(ver, reuse, fetched, batch, records)
        if encode:
            t = time.perf_counter()
            blobs = [fetched[ev.pin_id][0] for ev in encode]
            # an encoder process that is down is an outage: pause and retry, write nothing
            results = await self.ctx.retry("encoder", partial(enc.encode_images_async, blobs))
            batch.report.add_time("encode", t)
            metrics.IMAGES_ENCODED.inc(len(encode))
            batch.report.encoded += len(encode)
            now = time.time()
            for ev, res in zip(encode, results, strict=True):
                if isinstance(res, ImageError):  # one dead letter per event, not per version
                    batch.fail(ev, self.ctx.letter(res.reason, str(res), batch.original(ev),
                                                   ev.pin_id))
                else:
                    records.append(self.ctx.record(ver, ev, res, fetched[ev.pin_id][1], now))
        return records

    async def _reuse(self, ver: str, reuse: list[PinEvent],
                     fetched: dict[str, tuple[bytes, str]], batch: Batch,
                     records: list[EmbeddingRecord]) -> list[PinEvent]:
        """Add the stored vectors of these very bytes to ``records``; the events to encode.

        Any consistency will do: only a row of the same content hash is reused
        (the row may have changed since the look-up: another writer), and one
        that a lagging read misses is encoded instead.
        """
        old = await self.ctx.retry("milvus", partial(
            self.ctx.milvus.get_many, ver, [e.pin_id for e in reuse],
            consistency="Eventually"))
        encode = []
        for ev in reuse:
            got = old.get(ev.pin_id)
            digest = fetched[ev.pin_id][1]
            if got is not None and got.content_hash == digest:
                records.append(self.ctx.record(ver, ev, got.vector, digest, got.encode_time))
                batch.report.reused += 1
            else:
                encode.append(ev)
        return encode
