"""Merging a partition's small batch objects (streams.runtime.compaction).

Batches are built and read back with aiokafka's own record-batch classes (the
worker's Kafka client), so a merged batch is checked by the code that will read
it: offsets, timestamps, keys, values and headers as produced, CRC valid.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from streams.runtime import compaction
from streams.runtime.compaction import compact_partition, merge_batches
from streams.runtime.objectstore import ObjectStore
from streams.runtime.recordbatch import batch_problem


def _batch(base: int, n: int, t0: int, *, gap: int = 0, compression: int = 0,
           transactional: bool = False) -> bytes:
    b = DefaultRecordBatchBuilder(magic=2, compression_type=compression,
                                  is_transactional=int(transactional), producer_id=7,
                                  producer_epoch=1, base_sequence=base, batch_size=1 << 20)
    for i in range(n):
        b.append(i * (1 + gap), timestamp=t0 + 10 * i, key=b"k%d" % (base + i),
                 value=b"v" * (i % 300), headers=[("h", b"%d" % i)] if i % 2 else [])
    data = bytearray(b.build())
    data[0:8] = base.to_bytes(8, "big")  # the broker sets the base offset
    return bytes(data)


def _records(data: bytes) -> list[tuple[int, int, bytes, bytes, list]]:
    batch = DefaultRecordBatch(data)
    assert batch.validate_crc()
    return [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in batch]


def test_a_merged_batch_holds_every_record_as_produced():
    parts = [(0, _batch(0, 3, 1_000_000)), (3, _batch(3, 200, 999_000)),
             (203, _batch(203, 5, 2_000_000, gap=2))]  # gaps, as after a compacted topic
    merged = merge_batches(parts)
    assert batch_problem(merged) is None
    assert _records(merged) == [r for _b, d in parts for r in _records(d)]
    batch = DefaultRecordBatch(merged)
    assert batch.base_offset == 0 and batch.next_offset == 203 + 4 * 3 + 1
    assert batch.producer_id == -1 and not batch.is_transactional


def _store(tmp_path: Path, batches: list[bytes], bases: list[int], age_s: float
           ) -> tuple[ObjectStore, Path]:
    store = ObjectStore(tmp_path / "objects", fsync=False)
    records = store.root / "b" / "records"
    records.mkdir(parents=True)
    old = time.time() - age_s
    for base, data in zip(bases, batches, strict=True):
        p = records / f"{base:020d}.batch"
        p.write_bytes(data)
        os.utime(p, (old, old))
    return store, records


def _all(store: ObjectStore, records: Path) -> list[int]:
    out = []
    for _n, p in store.objects(records):
        out += [r[0] for r in _records(p.read_bytes())]
    return out


def test_a_partition_of_many_small_batches_becomes_a_few(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "COMPACT_ABOVE", 100)
    monkeypatch.setattr(compaction, "KEEP_NEWEST", 50)
    monkeypatch.setattr(compaction, "TARGET_BYTES", 4096)
    bases = [i * 3 for i in range(500)]
    store, records = _store(tmp_path, [_batch(b, 3, 5_000 + b) for b in bases], bases,
                            age_s=3600)
    before = _all(store, records)
    gone = compact_partition(store, records)
    left = store.objects(records)
    assert gone > 300 and len(left) == 500 - gone
    assert _all(store, records) == before == list(range(1500))  # nothing lost or repeated
    # the newest KEEP_NEWEST are untouched; no merged object past TARGET_BYTES
    assert [n for n, _p in left[-50:]] == [f"{b:020d}.batch" for b in bases[-50:]]
    assert max(store.size(p) for _n, p in left) <= 4096
    # a merged object keeps the time of its newest batch (retention by age holds)
    assert store.mtime(left[0][1]) < time.time() - 3000
    # the store's index and listing agree with the disk
    assert sorted(x.name for x in records.iterdir()) == [n for n, _p in left]
    # a second pass finds only full objects and the newest: nothing more to merge
    assert compact_partition(store, records) == 0
    assert len(store.objects(records)) == len(left)


def test_recent_or_unmergeable_batches_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "COMPACT_ABOVE", 10)
    monkeypatch.setattr(compaction, "KEEP_NEWEST", 2)
    bases = list(range(0, 60, 3))
    batches = [_batch(b, 3, 1, transactional=(b == 30)) for b in bases]
    store, records = _store(tmp_path, batches, bases, age_s=5)  # younger than MIN_AGE_S
    assert compact_partition(store, records) == 0
    store2, records2 = _store(tmp_path / "2", batches, bases, age_s=3600)
    assert compact_partition(store2, records2) == 9 + 6  # 0-27 and 33-51 merged, 30 alone
    names = [n for n, _p in store2.objects(records2)]
    assert names == [f"{b:020d}.batch" for b in (0, 30, 33, 54, 57)]
    assert _all(store2, records2) == list(range(60))


def test_a_merge_with_a_batch_gone_meanwhile_changes_nothing(tmp_path):
    bases = [0, 3, 6]
    store, records = _store(tmp_path, [_batch(b, 3, 1) for b in bases], bases, age_s=3600)
    paths = [records / f"{b:020d}.batch" for b in bases]
    store.delete(paths[2])  # retention removed it between the read and the swap
    merged = merge_batches([(b, p.read_bytes()) for b, p in zip(bases[:2], paths, strict=False)])
    assert not store.merge(paths[0], merged, paths[1:], 1.0)
    assert [n for n, _p in store.objects(records)] == [p.name for p in paths[:2]]
    assert _all(store, records) == list(range(6))


def test_a_run_never_reaches_over_a_young_object(tmp_path, monkeypatch):
    """Only the oldest objects up to the first young one merge: a merged batch spanning a
    kept one would give consumers its records out of order and twice."""
    monkeypatch.setattr(compaction, "COMPACT_ABOVE", 5)
    monkeypatch.setattr(compaction, "KEEP_NEWEST", 1)
    bases = list(range(0, 30, 3))
    store, records = _store(tmp_path, [_batch(b, 3, 1) for b in bases], bases, age_s=3600)
    young = records / f"{12:020d}.batch"
    os.utime(young, None)  # written just now (a clock step, a restored file)
    assert compact_partition(store, records) == 3  # 0, 3, 6, 9 into one
    names = [n for n, _p in store.objects(records)]
    assert names == [f"{b:020d}.batch" for b in (0, 12, 15, 18, 21, 24, 27)]
    assert _all(store, records) == list(range(30))


def test_a_corrupt_batch_is_not_merged_and_the_rest_goes_on(tmp_path, monkeypatch):
    """A batch whose bytes do not match its CRC (a flipped bit) is left as it is; the
    batches around it merge; nothing raises out of the retention pass."""
    monkeypatch.setattr(compaction, "COMPACT_ABOVE", 5)
    monkeypatch.setattr(compaction, "KEEP_NEWEST", 1)
    bases = list(range(0, 30, 3))
    batches = [_batch(b, 3, 1) for b in bases]
    bad = bytearray(batches[4])
    bad[-2] ^= 0x40
    batches[4] = bytes(bad)
    store, records = _store(tmp_path, batches, bases, age_s=3600)
    assert compact_partition(store, records) == 3 + 3  # 0-9 and 15-24 merged
    names = [n for n, _p in store.objects(records)]
    assert names == [f"{b:020d}.batch" for b in (0, 12, 15, 27)]
    assert (records / f"{12:020d}.batch").read_bytes() == bytes(bad)


def test_a_merged_batch_ends_where_its_last_input_ended():
    """A batch may end past its last record (Kafka's compaction keeps the last offset):
    the merged one keeps that end, so retention and consumers see the same range."""
    last = bytearray(_batch(3, 2, 1))
    last[23:27] = (5).to_bytes(4, "big")  # its last offset delta: 3 + 5 = 8
    from aiokafka.record.util import calc_crc32c

    last[17:21] = calc_crc32c(bytes(last[21:])).to_bytes(4, "big")
    merged = merge_batches([(0, _batch(0, 3, 1)), (3, bytes(last))])
    assert DefaultRecordBatch(merged).next_offset == 9
    assert [r[0] for r in _records(merged)] == [0, 1, 2, 3, 4]


def test_a_merge_refuses_objects_that_are_no_longer_consecutive(tmp_path):
    bases = [0, 3, 9]
    store, records = _store(tmp_path, [_batch(b, 3, 1) for b in bases], bases, age_s=3600)
    between = records / f"{6:020d}.batch"
    store.put(between, _batch(6, 3, 1), if_match=None, if_none_match=None)
    paths = [records / f"{b:020d}.batch" for b in bases]
    merged = merge_batches([(b, p.read_bytes()) for b, p in zip(bases, paths, strict=True)])
    assert not store.merge(paths[0], merged, paths[1:], 1.0)
    assert _all(store, records) == list(range(12))
    assert not list(records.glob(".tmp-*"))


def test_an_unmergeable_batch_is_not_read_again_by_every_pass(tmp_path, monkeypatch):
    """A batch that cannot merge (here transactional) is read once, not on every pass
    of the retention check while it stays unchanged."""
    monkeypatch.setattr(compaction, "COMPACT_ABOVE", 5)
    monkeypatch.setattr(compaction, "KEEP_NEWEST", 1)
    bases = list(range(0, 30, 3))
    batches = [_batch(b, 3, 1, transactional=(b == 12)) for b in bases]
    store, records = _store(tmp_path, batches, bases, age_s=3600)
    reads: list[str] = []
    read_bytes = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self.name)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    assert compact_partition(store, records) == 3 + 3  # 0-9 and 15-24 merged, 12 alone
    assert f"{12:020d}.batch" in reads
    reads.clear()
    compact_partition(store, records)
    assert f"{12:020d}.batch" not in reads
    assert _all(store, records) == list(range(30))
