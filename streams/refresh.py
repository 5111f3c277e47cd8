"""Refresh machinery: which versions workers write, the backfill, staleness.

* `RegistryVersions` gives a worker its write set: every version the registry
  says is live, building or previous, each with its own encoder (loaded once,
  from the model/checkpoint/seed recorded at registration). This is the dual
  write: fresh events reach a building version while it is backfilled.
* `run_backfill` re-encodes every pin of the live version into a target
  version, reading the catalog (pin ids, image locations, captions, metadata,
  per-pin versions, event times) from Milvus page by page in pin id order, so
  the original events are not needed and memory holds one page. With
  ``shard=(i, n)`` it takes only the pins whose id hashes to shard ``i`` of
  ``n`` (CRC-32), so ``n`` hosts can share one backfill. It goes through the
  same `PinProcessor` and the same per-pin claims as the stream, so a pin the
  stream writes or deletes meanwhile ends at its newest state whichever
  writer finishes last, and pins already in the target at the same or a
  newer version are skipped without encoding: an interrupted backfill
  resumes where it stopped. Before it starts it waits until every running
  worker writes the target too (their write-set reports), so no event slips
  between the page it read and the dual writes. It yields to live traffic:
  while the workers' consumer lag is above a threshold it waits. The lag is
  read by a task beside the backfill (`LagWatch`, every `YIELD_LOOK_S`
  seconds, every 0.5 s while it waits), so the backfill never stops to read
  it: a read takes about 0.25 s on the embedded broker, which was 12 % of a
  backfill's time when it was read in line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm import tqdm

from encoder.config import EncoderSettings
from encoder.errors import ConfigError, EncoderUnavailable, StateError, Unavailable
from encoder.loading import load_encoder
from encoder.null import NullEncoder
from store.lifecycle import Stores, open_stores
from store.milvus import META_FIELDS, MilvusStore
from store.registry import VersionInfo, VersionRegistry
from streams.dlq import KafkaDeadLetters
from streams.events import PinEvent
from streams.fetch import Fetcher, check_catalog_root
from streams.processor import Encoder, Message, PinProcessor, StaticVersions
from streams.producer import consumer_lag
from streams.retry import Backoff, retry
from streams.settings import Settings

if TYPE_CHECKING:
    from encoder.engine import ImageEncoder

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: How often a backfill reads the workers' consumer lag to decide whether to yield.
YIELD_LOOK_S = 2.0


class LagWatch:
    """Whether the workers' consumer lag is above ``threshold``, read in the background.

    `behind` is the last read's answer (False until the first read); a read that
    failed is raised by the next `wait` instead, as a read in line would.
    """

    def __init__(self, read: Callable[[], Awaitable[int]], threshold: int,
                 every_s: float = YIELD_LOOK_S, waiting_every_s: float = 0.5) -> None:
        self._read, self.threshold = read, threshold
        self.every_s, self.waiting_every_s = every_s, waiting_every_s
        self.behind = False
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._read_once = asyncio.Event()

    async def __aenter__(self) -> LagWatch:
        self._task = asyncio.create_task(self._loop())
        await self._read_once.wait()  # the first answer before the first batch
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                self.behind = await self._read() > self.threshold
                self._error = None
            except Exception as exc:  # noqa: BLE001 - handed to the backfill by wait()
                self._error = exc
            self._read_once.set()
            await asyncio.sleep(self.waiting_every_s if self.behind else self.every_s)

    async def wait(self) -> float:
        """Wait while the lag is above the threshold; returns the seconds waited."""
        t = time.monotonic()
        while True:
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if not self.behind:
                return time.monotonic() - t
            await asyncio.sleep(0.1)


def encoder_settings_for(info: VersionInfo, base: EncoderSettings) -> EncoderSettings:
    """Encoder settings that rebuild a registered version (device etc. from ``base``)."""
    from pathlib import Path

    return base.model_copy(update={"model": info.model or base.model,
                                   "checkpoint": Path(info.checkpoint) if info.checkpoint
                                   else None, "seed": info.seed})


def load_version_encoder(info: VersionInfo, base: EncoderSettings) -> ImageEncoder | NullEncoder:
    """Load the encoder of a registered version and check that its id matches.

    Raises:
        ConfigError: the rebuilt encoder has another version id (the
            checkpoint changed on disk since registration).
    """
    enc = load_encoder(encoder_settings_for(info, base))
    if enc.version != info.version:
        enc.close()
        raise ConfigError(
            f"registered version {info.version} rebuilds as {enc.version}: its checkpoint "
            f"{info.checkpoint or '(none)'} changed; register the new one with "
            "`pinfresh versions create`"
        )
    return enc


async def open_version_encoder(info: VersionInfo, es: EncoderSettings) -> Encoder:
    """The encoder of a registered version, for writing it.

    With ``es.remote`` set (a feeder, or a backfill pointed at a pool's encoder
    process) the encoder process at that socket loads the version on its
    device and this process imports no model code; otherwise it is loaded here.

    Raises:
        ConfigError: the version cannot be built (here or in the encoder process).
        EncoderUnavailable: the encoder process is not there (an outage: retried).
    """
    if es.remote is not None:
        from dataclasses import asdict

        from encoder.remote import RemoteEncoder

        remote = RemoteEncoder.from_settings(es, select=asdict(info))
        await remote.connect()
        return remote
    return await asyncio.to_thread(load_version_encoder, info, es)


async def close_encoder(enc: Encoder) -> None:
    """Release an encoder: a connection to an encoder process, or a model loaded here."""
    from encoder.remote import RemoteEncoder

    if isinstance(enc, RemoteEncoder):
        await enc.close()
    else:
        await asyncio.to_thread(enc.close)  # type: ignore[attr-defined]


#: seconds before a worker tries again to open a version whose encoder did not load
BROKEN_RETRY_S = 300.0


class RegistryVersions:
    """A worker's write set, refreshed from the registry every ``refresh_s`` seconds.

    Each version's encoder is opened once (`open_version_encoder`: through the
    encoder process when this worker is a feeder; concurrent readers of the
    write set wait for one refresh) and closed when the version has been out of
    the write set for ``release_after_s`` and no batch in flight holds it
    (``in_use``, which the worker points at its processor). A version whose
    encoder does not load is left out and tried again after `BROKEN_RETRY_S`.
    """

    def __init__(self, registry: VersionRegistry, base: Encoder,
                 settings: EncoderSettings, refresh_s: float = 3.0,
                 release_after_s: float = 60.0) -> None:
        self.registry = registry
        self.settings = settings
        self.refresh_s = refresh_s
        self.release_after_s = release_after_s
        self.base = base
        self._encoders: dict[str, Encoder] = {base.version: base}
        self._write: dict[str, Encoder] = {base.version: base}
        self._broken: dict[str, float] = {}  # version -> when its encoder failed to load
        self._left: dict[str, float] = {}  # version -> when it left the write set
        self._at = 0.0
        self._lock = asyncio.Lock()
        #: versions that batches in flight still write (set by the worker)
        self.in_use: Callable[[], set[str]] = set

    async def write_set(self) -> dict[str, Encoder]:
        """Encoders of every version to write, live first."""
        if time.monotonic() - self._at < self.refresh_s:
            return self._write
        async with self._lock:  # one refresh at a time: a version is opened once
            if time.monotonic() - self._at < self.refresh_s:
                return self._write
            return await self._refresh()

    async def _refresh(self) -> dict[str, Encoder]:
        infos = await self.registry.written()
        write: dict[str, Encoder] = {}
        for info in sorted(infos, key=lambda v: not v.live):
            enc = self._encoders.get(info.version)
            failed_at = self._broken.get(info.version)
            if enc is None and failed_at is not None:
                if time.monotonic() - failed_at < BROKEN_RETRY_S:
                    continue
                del self._broken[info.version]
            if enc is None:
                logger.info("loading encoder of version %s (%s) for dual writes",
                            info.version, info.state)
                try:
                    enc = await open_version_encoder(info, self.settings)
                except ConfigError as exc:
                    # one version this worker cannot build must not stop the stream for the
                    # others: it gets no dual writes here (so its coverage check will refuse
                    # a promotion) and the operator is told once, with the fix
                    self._broken[info.version] = time.monotonic()
                    logger.error("version %s is registered but its encoder does not load here, "
                                 "so this worker does not write it: %s", info.version, exc)
                    continue
                self._encoders[info.version] = enc
            write[info.version] = enc
        if write:
            self._write = write
        elif infos:
            # the registry names versions and none loads here: never fall back to this
            # worker's own encoder, whose version the registry may have retired
            raise EncoderUnavailable(
                "no version the registry writes (" + ", ".join(i.version for i in infos)
                + ") has an encoder that loads here; see the errors above", retry_after=30.0)
        await self._release_unwritten()
        self._at = time.monotonic()
        return self._write

    async def _release_unwritten(self) -> None:
        now = time.monotonic()
        busy = self.in_use()
        for version, enc in list(self._encoders.items()):
            if version in self._write or enc is self.base:
                self._left.pop(version, None)
                continue
            left = self._left.setdefault(version, now)
            if now - left >= self.release_after_s and version not in busy:
                logger.info("version %s left the write set: releasing its encoder", version)
                self._encoders.pop(version, None)
                self._left.pop(version, None)
                await close_encoder(enc)

    async def close(self) -> None:
        """Release every encoder this opened (not the worker's own)."""
        async with self._lock:
            for version, enc in list(self._encoders.items()):
                if enc is not self.base:
                    self._encoders.pop(version, None)
                    await close_encoder(enc)

    def forget(self, version: str) -> None:
        """A version vanished mid-batch (retired): drop it and read the registry next time."""
        if len(self._write) > 1 and version != next(iter(self._write)):
            self._write = {v: e for v, e in self._write.items() if v != version}
        self._at = 0.0


def _as_message(row: dict[str, Any]) -> Message:
    """An upsert event rebuilt from a stored row (the catalog needs no original events)."""
    return Message(row["pin_id"].encode(), PinEvent(
        op="upsert", pin_id=row["pin_id"], version=int(row["pin_version"]),
        image=row["image_location"], caption=row["caption"], metadata=row.get("metadata") or {},
        event_time=float(row["event_time"]) or time.time()).to_bytes())


def in_shard(pin_id: str, shard: tuple[int, int]) -> bool:
    """Whether ``pin_id`` belongs to shard ``i`` of ``n`` (CRC-32 of its UTF-8 bytes)."""
    i, n = shard
    return zlib.crc32(pin_id.encode()) % n == i


@dataclass
class BackfillReport:
    """What a backfill run did."""

    target: str
    source: str
    pins: int = 0
    encoded: int = 0
    reused: int = 0
    written: int = 0
    skipped: int = 0
    dead_letters: int = 0
    seconds: float = 0.0
    yielded_s: float = 0.0
    batches: list[int] = field(default_factory=list)
    waited_for_workers_s: float = 0.0

    @property
    def pins_per_s(self) -> float:
        """Pins handled (written or skipped as done) per second."""
        return self.pins / self.seconds if self.seconds else 0.0


async def run_backfill(
    settings: Settings, target: str, *, batch: int = 256, max_rate: float | None = None,
    yield_lag: int | None = 100, progress: bool = True, limit: int | None = None,
    shard: tuple[int, int] = (0, 1), page: int = 1000, wait_workers_s: float = 30.0,
) -> BackfillReport:
    """Re-encode the live version's pins into ``target`` (see module docstring).

    Raises:
        StateError: ``target`` is live, nothing is live, or the shard is invalid.
        ConfigError: the catalog root is missing (the catalog has file paths) or
            is not a directory.
    """
    if not 0 <= shard[0] < shard[1]:
        raise StateError(f"shard {shard[0]}/{shard[1]}: give I/N with 0 <= I < N")
    async with open_stores(settings) as stores:
        return await _backfill(stores, settings, target, batch=batch, max_rate=max_rate,
                               yield_lag=yield_lag, progress=progress, limit=limit,
                               shard=shard, page=page, wait_workers_s=wait_workers_s)


async def _backfill(
    stores: Stores, settings: Settings, target: str, *, batch: int, max_rate: float | None,
    yield_lag: int | None, progress: bool, limit: int | None, shard: tuple[int, int],
    page: int, wait_workers_s: float,
) -> BackfillReport:
    milvus, cache = stores.milvus, stores.cache
    registry = stores.registry
    fetcher = Fetcher(settings.fetch)
    dlq = KafkaDeadLetters(settings.kafka)
    enc: Encoder | None = None
    try:
        info = await registry.get(target)
        live = await cache.get_live()
        if live is None or live == target:
            raise StateError(f"{target} is live already or nothing is live: nothing to backfill")
        # preflight: a catalog of file paths without a root would dead-letter every pin
        # (a sample: the first page of the live version, read through the retrying walk)
        sample: list[str] = []
        async for page_rows in _pages(milvus, live, 100):
            sample = [r["image_location"] for r in page_rows]
            break  # one page is enough (the event loop finalizes the abandoned walk)
        check_catalog_root(settings.fetch, sample)
        enc = await open_version_encoder(info, settings.encoder)
        processor = PinProcessor(
            encoder=enc, versions=StaticVersions(enc), milvus=milvus, cache=cache,
            fetcher=fetcher, dlq=dlq, settings=settings.worker,
            worker_name=f"backfill:{target}:{shard[0]}of{shard[1]}",
            observe_freshness=False, writer_ttl_s=settings.redis.writer_ttl_s,
        )
        await processor.start()
        rep = BackfillReport(target=target, source=live)
        t_wait = time.monotonic()
        if wait_workers_s > 0 and not await registry.wait_writers(
                target, holding=True, timeout_s=wait_workers_s):
            logger.warning("not every running worker reports writing %s after %.0fs: events "
                           "they apply meanwhile reach only the live version; `versions "
                           "promote` compares every pin and refuses until they are filled in",
                           target, wait_workers_s)
        rep.waited_for_workers_s = time.monotonic() - t_wait
        total = await _retry_store(partial(milvus.count, live))
        total = total // shard[1] + 1 if shard[1] > 1 else total
        total = min(total, limit) if limit is not None else total
        t0 = time.monotonic()
        bar = tqdm(total=total, unit="pin", desc=f"backfill {target}", disable=not progress)

        async def lag() -> int:
            return sum((await consumer_lag(settings.kafka)).values())

        watch = LagWatch(lag, yield_lag) if yield_lag is not None else None
        try:
            if watch is not None:
                await watch.__aenter__()
            async for rows in _pages(milvus, live, page):
                rows = [r for r in rows if in_shard(r["pin_id"], shard)]
                if limit is not None:
                    rows = rows[:max(0, limit - rep.pins)]
                for i in range(0, len(rows), batch):
                    if watch is not None:
                        rep.yielded_s += await watch.wait()
                    chunk = rows[i:i + batch]
                    res = await processor.handle([_as_message(r) for r in chunk])
                    rep.pins += len(chunk)
                    rep.encoded += res.encoded
                    rep.reused += res.reused
                    rep.written += res.written
                    rep.skipped += res.skipped
                    rep.dead_letters += len(res.dead_letters)
                    rep.batches.append(res.encoded)
                    bar.update(len(chunk))
                    if max_rate:
                        ahead = t0 + rep.pins / max_rate - time.monotonic()
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                if limit is not None and rep.pins >= limit:
                    break
        finally:
            bar.close()
            if watch is not None:
                await watch.__aexit__(None, None, None)
        rep.seconds = time.monotonic() - t0
        logger.info("backfill %s -> %s (shard %d/%d): %d pins, %d encoded, %d skipped, "
                    "%.1f pins/s", live, target, shard[0], shard[1], rep.pins, rep.encoded,
                    rep.skipped, rep.pins_per_s)
        return rep
    finally:
        if enc is not None:
            await close_encoder(enc)
        await dlq.close()
        await fetcher.close()


async def _retry_store(fn: Callable[[], Awaitable[T]]) -> T:
    """A store call retried while the store is unavailable (tools outside the stream)."""
    return await retry(fn, retry_on=(Unavailable,), backoff=Backoff(0.5, 10.0),
                       on_retry=lambda exc, n, wait: logger.warning(
                           "store unavailable (attempt %d, retry in %.1fs): %s", n, wait, exc))


async def _pages(milvus: MilvusStore, version: str, page: int
                 ) -> AsyncIterator[list[dict[str, Any]]]:
    """The version's rows (no vectors) page by page; a store outage resumes the walk."""
    last = ""
    while True:
        try:
            async for rows in milvus.walk(version, META_FIELDS, page, after=last):
                last = max(str(r["pin_id"]) for r in rows)
                yield rows
            return
        except Unavailable as exc:
            logger.warning("reading the catalog from Milvus failed (%s); resuming after %r",
                           exc, last)
            await asyncio.sleep(2.0)


async def find_stale(settings: Settings, older_than_s: float, check_content: bool
                     ) -> list[dict[str, object]]:
    """Live pins encoded more than ``older_than_s`` ago, or whose image bytes changed."""
    async with open_stores(settings) as stores:
        return await _find_stale(stores, settings, older_than_s, check_content)


async def _find_stale(stores: Stores, settings: Settings, older_than_s: float,
                      check_content: bool) -> list[dict[str, object]]:
    import hashlib

    milvus, cache = stores.milvus, stores.cache
    fetcher = Fetcher(settings.fetch)
    try:
        live = await cache.get_live()
        if live is None:
            return []
        now = time.time()
        out: list[dict[str, object]] = []
        async for rows in milvus.walk(live, META_FIELDS):
            for row in rows:
                why = []
                if older_than_s and now - float(row["encode_time"]) > older_than_s:
                    why.append(f"encoded {now - float(row['encode_time']):.0f}s ago")
                if check_content:
                    try:
                        data = await fetcher.fetch(row["image_location"])
                        if hashlib.sha256(data).hexdigest() != row["content_hash"]:
                            why.append("image content changed")
                    except Exception as exc:  # noqa: BLE001 - reported, not raised
                        why.append(f"image unreadable: {exc}")
                if why:
                    out.append({**row, "why": "; ".join(why)})
        return out
    finally:
        await fetcher.close()


async def requeue_stale(settings: Settings, rows: list[dict[str, object]]) -> int:
    """Publish a re-encode event (same per-pin version, ``reencode: true``) per stale pin."""
    from streams.producer import publish_events

    # the stored metadata travels too: the re-encode replaces the pin's record whole
    events = [PinEvent(op="upsert", pin_id=str(r["pin_id"]), version=int(str(r["pin_version"])),
                       image=str(r["image_location"]), caption=str(r["caption"]),
                       metadata=dict(r.get("metadata") or {}),  # type: ignore[call-overload]
                       event_time=time.time(), reencode=True) for r in rows]
    return await publish_events(settings.kafka, events, total=len(events))
