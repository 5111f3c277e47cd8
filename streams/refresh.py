"""Refresh machinery: which versions workers write, the backfill, staleness.

* `RegistryVersions` gives a worker its write set: every version the registry
  says is live, building or previous, each with its own encoder (loaded once,
  from the model/checkpoint/seed recorded at registration). This is the dual
  write: fresh events reach a building version while it is backfilled.
* `run_backfill` re-encodes every pin of the live version into a target
  version, reading the catalog (pin ids, image locations, captions, per-pin
  versions, event times) from Milvus, so the original events are not needed.
  It goes through the same `PinProcessor` as the stream, so pins already in
  the target at the same or a newer version are skipped without encoding:
  an interrupted backfill resumes where it stopped. It yields to live
  traffic: while the workers' consumer lag is above a threshold it waits (the
  lag is read every `YIELD_LOOK_S` seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from encoder.config import EncoderSettings
from encoder.errors import EncoderError
from encoder.loading import load_encoder
from encoder.null import NullEncoder
from store.lifecycle import Stores, open_stores
from store.registry import VersionInfo, VersionRegistry
from streams.dlq import KafkaDeadLetters
from streams.events import PinEvent
from streams.fetch import Fetcher
from streams.processor import Encoder, Message, PinProcessor, StaticVersions
from streams.producer import consumer_lag
from streams.settings import Settings

if TYPE_CHECKING:
    from encoder.engine import ImageEncoder

logger = logging.getLogger(__name__)

#: How often a backfill reads the workers' consumer lag to decide whether to yield.
YIELD_LOOK_S = 2.0


def encoder_settings_for(info: VersionInfo, base: EncoderSettings) -> EncoderSettings:
    """Encoder settings that rebuild a registered version (device etc. from ``base``)."""
    from pathlib import Path

    return base.model_copy(update={"model": info.model or base.model,
                                   "checkpoint": Path(info.checkpoint) if info.checkpoint
                                   else None, "seed": info.seed})


def load_version_encoder(info: VersionInfo, base: EncoderSettings) -> ImageEncoder | NullEncoder:
    """Load the encoder of a registered version and check that its id matches.

    Raises:
        EncoderError: the rebuilt encoder has another version id (the
            checkpoint changed on disk since registration).
    """
    enc = load_encoder(encoder_settings_for(info, base))
    if enc.version != info.version:
        enc.close()
        raise EncoderError(
            f"registered version {info.version} rebuilds as {enc.version}: its checkpoint "
            f"{info.checkpoint or '(none)'} changed; register the new one with "
            "`pinfresh versions create`"
        )
    return enc


class RegistryVersions:
    """A worker's write set, refreshed from the registry every ``refresh_s`` seconds."""

    def __init__(self, registry: VersionRegistry, base: Encoder,
                 settings: EncoderSettings, refresh_s: float = 3.0) -> None:
        self.registry = registry
        self.settings = settings
        self.refresh_s = refresh_s
        self._encoders: dict[str, Encoder] = {base.version: base}
        self._write: dict[str, Encoder] = {base.version: base}
        self._broken: set[str] = set()  # registered versions whose encoder failed to load
        self._at = 0.0

    async def write_set(self) -> dict[str, Encoder]:
        """Encoders of every version to write, live first."""
        if time.monotonic() - self._at < self.refresh_s:
            return self._write
        infos = await self.registry.written()
        write: dict[str, Encoder] = {}
        for info in sorted(infos, key=lambda v: not v.live):
            enc = self._encoders.get(info.version)
            if enc is None and info.version in self._broken:
                continue
            if enc is None:
                logger.info("loading encoder of version %s (%s) for dual writes",
                            info.version, info.state)
                try:
                    enc = await asyncio.to_thread(load_version_encoder, info, self.settings)
                except EncoderError as exc:
                    # one version this worker cannot build must not stop the stream for the
                    # others: it gets no dual writes here (so its coverage check will refuse
                    # a promotion) and the operator is told once, with the fix
                    self._broken.add(info.version)
                    logger.error("version %s is registered but its encoder does not load here, "
                                 "so this worker does not write it: %s", info.version, exc)
                    continue
                self._encoders[info.version] = enc
            write[info.version] = enc
        if write:
            self._write = write
        self._at = time.monotonic()
        return self._write


def _as_message(row: dict[str, Any]) -> Message:
    """An upsert event rebuilt from a stored row (the catalog needs no original events)."""
    return Message(row["pin_id"].encode(), PinEvent(
        op="upsert", pin_id=row["pin_id"], version=int(row["pin_version"]),
        image=row["image_location"], caption=row["caption"], metadata=row.get("metadata") or {},
        event_time=float(row["event_time"]) or time.time()).to_bytes())


async def _reconcile(processor: PinProcessor, live: str, target: str, ids: list[str]) -> None:
    """Undo what the stream changed while the backfill worked on these pins.

    The backfill and the workers both write the target version. Per-pin
    ordering protects the workers from each other, but not from the backfill.
    After each batch the backfill therefore re-reads the pins: a pin deleted in
    the meantime (tombstone) is removed from the target again, and a pin whose
    live version is now newer than the target's is processed again from the
    live row.
    """
    milvus, cache = processor.milvus, processor.cache
    tombs = await cache.get_tombstones(ids)
    live_rows = await milvus.get_many(live, ids)
    dead = [p for p in ids if p in tombs
            and (p not in live_rows or tombs[p] >= live_rows[p].pin_version)]
    if dead:
        await milvus.delete(target, dead)
        await cache.delete(target, dead)
    target_states = await milvus.get_states(target, ids)
    newer = [r for p, r in live_rows.items() if p not in dead and (
        p not in target_states or target_states[p].pin_version < r.pin_version)]
    if newer:
        await processor.process([_as_message({
            "pin_id": r.pin_id, "pin_version": r.pin_version, "image_location": r.image_location,
            "caption": r.caption, "event_time": r.event_time, "metadata": r.metadata})
            for r in newer])


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

    @property
    def pins_per_s(self) -> float:
        """Pins handled (written or skipped as done) per second."""
        return self.pins / self.seconds if self.seconds else 0.0


async def run_backfill(
    settings: Settings, target: str, *, batch: int = 32, max_rate: float | None = None,
    yield_lag: int | None = 100, progress: bool = True, limit: int | None = None,
) -> BackfillReport:
    """Re-encode the live version's pins into ``target`` (see module docstring)."""
    async with open_stores(settings) as stores:
        return await _backfill(stores, settings, target, batch=batch, max_rate=max_rate,
                               yield_lag=yield_lag, progress=progress, limit=limit)


async def _backfill(
    stores: Stores, settings: Settings, target: str, *, batch: int, max_rate: float | None,
    yield_lag: int | None, progress: bool, limit: int | None,
) -> BackfillReport:
    milvus, cache = stores.milvus, stores.cache
    registry = stores.registry
    fetcher = Fetcher(settings.fetch)
    dlq = KafkaDeadLetters(settings.kafka)
    enc: ImageEncoder | NullEncoder | None = None
    try:
        info = await registry.get(target)
        live = await cache.get_live()
        if live is None or live == target:
            raise EncoderError(f"{target} is live already or nothing is live: nothing to backfill")
        enc = await asyncio.to_thread(load_version_encoder, info, settings.encoder)
        processor = PinProcessor(
            encoder=enc, versions=StaticVersions(enc), milvus=milvus, cache=cache,
            fetcher=fetcher, dlq=dlq, settings=settings.worker, worker_name=f"backfill:{target}",
            observe_freshness=False,
        )
        await processor.start()
        rows = sorted(await milvus.iter_pins(live), key=lambda r: r["pin_id"])[:limit]
        rep = BackfillReport(target=target, source=live)
        t0 = time.monotonic()
        next_look = t0  # when to read the workers' lag again
        bar = tqdm(total=len(rows), unit="pin", desc=f"backfill {target}", disable=not progress)
        try:
            for i in range(0, len(rows), batch):
                if yield_lag is not None and time.monotonic() >= next_look:
                    # a lag read takes about 0.25 s on the embedded broker: once per
                    # YIELD_LOOK_S, not per batch (per batch of 32 it bounds a backfill
                    # near 130 pins/s)
                    t_wait = time.monotonic()
                    while sum((await consumer_lag(settings.kafka)).values()) > yield_lag:
                        await asyncio.sleep(0.5)
                    rep.yielded_s += time.monotonic() - t_wait
                    next_look = time.monotonic() + YIELD_LOOK_S
                chunk = rows[i:i + batch]
                res = await processor.handle([_as_message(r) for r in chunk])
                await _reconcile(processor, live, target, [r["pin_id"] for r in chunk])
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
        finally:
            bar.close()
        rep.seconds = time.monotonic() - t0
        logger.info("backfill %s -> %s: %d pins, %d encoded, %d skipped, %.1f pins/s",
                    live, target, rep.pins, rep.encoded, rep.skipped, rep.pins_per_s)
        return rep
    finally:
        if enc is not None:
            enc.close()
        await dlq.close()
        await fetcher.close()


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
        for row in await milvus.iter_pins(live):
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

    events = [PinEvent(op="upsert", pin_id=str(r["pin_id"]), version=int(str(r["pin_version"])),
                       image=str(r["image_location"]), caption=str(r["caption"]),
                       event_time=time.time(), reencode=True) for r in rows]
    return await publish_events(settings.kafka, events, total=len(events))
