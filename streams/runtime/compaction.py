"""Fewer, larger batch objects in the embedded broker's disk log (a log's segments).

Tansu keeps every record batch a producer sent as one object and lists a
partition's whole ``records/`` prefix on every fetch behind the high
watermark, paging 1,000 keys per request: about 9 µs per key here, most of
it Tansu's own parsing. At 200,000 objects one listing takes about 2 s,
longer than a consumer's fetch wait (aiokafka 0.5 s, Faust 1.5 s), so Tansu
gives up before it reaches the tail and a consumer there never gets a
record. Kafka's answer is segments; this is ours: consecutive small batches
are merged into one batch of up to `TARGET_BYTES`, so a partition holds
about ``retained bytes / 1 MiB`` objects plus its newest ones, whatever the
publish rate.

A merged batch is a Kafka v2 record batch like any other: its key and base
offset are its first record's, every record keeps its offset, key, value,
headers and timestamp (offset and timestamp deltas are rewritten against
the new base), the CRC-32C is computed again and the file keeps the newest
input's time (so retention by age removes a merged batch when its newest
record expires: its oldest may outlive the bound by the span it covers).
Only batches a consumer reads the same way merged or not are merged: no
compression, not transactional, not control, CreateTime, and whole (length
and CRC-32C checked; a batch whose records do not fill it exactly as its
header says is left as it is). The producer fields become "none" (-1):
they only matter to the broker's de-duplication of a producer's latest
batches, and the newest `KEEP_NEWEST` objects and every object from the
first one younger than `MIN_AGE_S` on are never touched.

The swap is one step of the store (`ObjectStore.merge`): the merged batch
replaces the first object and the others are removed, under the store's
lock. A fetch whose listing was taken before the swap either reads the old
objects or fails on a removed one (Tansu answers UnknownServerError; the
client fetches again): it never gets a merged batch together with one of
the batches inside it.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from pathlib import Path

from aiokafka.record.util import calc_crc32c, decode_varint, encode_varint

from streams.runtime.objectstore import ObjectStore
from streams.runtime.recordbatch import batch_problem

logger = logging.getLogger(__name__)

#: Merge while a partition holds more objects than this.
COMPACT_ABOVE = 2_000
#: Never merge a partition's newest objects ...
KEEP_NEWEST = 1_000
#: ... nor objects younger than this (seconds).
MIN_AGE_S = 60.0
#: Largest merged batch, bytes (a consumer's default per-partition fetch size).
TARGET_BYTES = 1 << 20

#: objects found unmergeable, with the size and time they had then: not read again by
#: every pass while they stay so (a partition of compressed batches would be read whole
#: every 30 s); forgotten at once past `_LEFT_MAX` entries
_LEFT: dict[Path, tuple[int, float]] = {}
_LEFT_MAX = 500_000

_HEAD = struct.Struct(">qiibIhiqqqhii")  # base offset .. records count: 61 bytes
# attributes: compression (bits 0-2), timestamp type (3), transactional (4), control (5)
_NOT_MERGEABLE = 0b111111


def _mergeable(data: bytes) -> bool:
    """A whole batch (length, magic, CRC-32C) that reads the same inside a merged one."""
    return (len(data) >= _HEAD.size and batch_problem(data) is None
            and not int.from_bytes(data[21:23], "big") & _NOT_MERGEABLE)


def merge_batches(batches: list[tuple[int, bytes]]) -> bytes:
    """One v2 record batch holding every record of ``batches``, with the first one's base.

    ``batches`` are ``(base offset, bytes)`` in offset order, each `_mergeable`.

    Raises:
        ValueError: a batch's records do not fill it exactly as its header says.
    """
    base = batches[0][0]
    heads = [_HEAD.unpack_from(data) for _b, data in batches]
    first_ts = min(h[7] for h in heads)
    max_ts = max(h[8] for h in heads)
    out = bytearray()
    count = 0
    for (b, data), h in zip(batches, heads, strict=True):
        pos = _HEAD.size
        for _ in range(h[12]):
            if pos >= len(data):
                raise ValueError(f"batch at {b}: fewer records than its count {h[12]}")
            length, pos = decode_varint(data, pos)
            end = pos + length
            if length < 3 or end > len(data):
                raise ValueError(f"batch at {b}: a record of {length} bytes past its end")
            attrs = data[pos]
            ts_delta, p = decode_varint(data, pos + 1)
            off_delta, p = decode_varint(data, p)
            body = bytearray([attrs])
            encode_varint(h[7] + ts_delta - first_ts, body.append)
            encode_varint(b + off_delta - base, body.append)
            body += data[p:end]
            encode_varint(len(body), out.append)
            out += body
            pos = end
            count += 1
        if pos != len(data):
            raise ValueError(f"batch at {b}: {len(data) - pos} bytes after its last record")
    # the last input's own last offset (a batch may end past its last record)
    last_delta = batches[-1][0] + heads[-1][6] - base
    tail = struct.pack(">hiqqqhii", 0, last_delta, first_ts, max_ts, -1, -1, -1, count) + out
    head = struct.pack(">qiib", base, len(tail) + 9, heads[0][2], 2)
    return head + struct.pack(">I", calc_crc32c(tail)) + tail


def _runs(store: ObjectStore, objects: list[tuple[str, Path]]) -> list[list[Path]]:
    """Groups of consecutive objects, each under `TARGET_BYTES` in all.

    With room: a record's rewritten deltas may take a few bytes more.
    """
    runs: list[list[Path]] = []
    run: list[Path] = []
    size = 0
    limit = TARGET_BYTES * 9 // 10
    for _name, path in objects:
        n = store.size(path)
        kept = n >= TARGET_BYTES // 2 or _LEFT.get(path) == (n, store.mtime(path))
        if kept or size + n > limit:
            if len(run) > 1:
                runs.append(run)
            run, size = [], 0
            if kept:
                continue  # already large, or found unmergeable: left as it is
        run.append(path)
        size += n
    if len(run) > 1:
        runs.append(run)
    return runs


def compact_partition(store: ObjectStore, records: Path, now: float | None = None) -> int:
    """Merge the old small batches of one partition's ``records`` folder.

    Returns how many objects went away.
    """
    objects = store.objects(records)
    if len(objects) <= COMPACT_ABOVE:
        return 0
    now = time.time() if now is None else now
    # the oldest, up to the first young one: a run never reaches over an object it keeps
    old = list(itertools.takewhile(lambda o: now - store.mtime(o[1]) >= MIN_AGE_S,
                                   objects[:-KEEP_NEWEST]))
    gone = 0
    for run in _runs(store, old):
        try:
            datas = [(int(p.name[:20]), p.read_bytes()) for p in run]
        except (OSError, ValueError):
            continue  # removed meanwhile (retention): the next pass sees what is left
        # a batch that cannot be merged splits the run around it
        pieces: list[list[tuple[int, bytes]]] = [[]]
        for item, path in zip(datas, run, strict=True):
            if _mergeable(item[1]):
                pieces[-1].append(item)
                continue
            if len(_LEFT) >= _LEFT_MAX:
                _LEFT.clear()
            _LEFT[path] = (len(item[1]), store.mtime(path))
            if pieces[-1]:
                pieces.append([])
        for piece in pieces:
            if len(piece) < 2:
                continue
            paths = [records / f"{b:020d}.batch" for b, _d in piece]
            try:
                merged = merge_batches(piece)
            except (ValueError, IndexError) as exc:
                logger.warning("not merging %s..%s: %s", paths[0].name, paths[-1].name, exc)
                continue
            mtime = max(store.mtime(p) for p in paths)
            if store.merge(paths[0], merged, paths[1:], mtime):
                gone += len(paths) - 1
    if gone:
        logger.info("merged %d small batch objects of %s into larger ones (%d left)",
                    gone, records.parent.name, len(store.objects(records)))
    return gone
