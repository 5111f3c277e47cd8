"""Retention of the embedded broker's disk log: by age and size, never past a group's commit
unless the size bound forces it."""

from __future__ import annotations

import json
import os

from streams.runtime.objectstore import ObjectStore
from streams.runtime.retention import Retention, RetentionPolicy
from tests.unit.test_objectstore import _batch

PART = "clusters/c/topics/pins/partitions/0000000000"
HOUR = 3600.0


def _log(tmp_path, batches: int, committed: dict[str, int], now: float):
    """``batches`` batches of 2 records each, the i-th written (batches - i) hours ago."""
    store = ObjectStore(tmp_path / "objects", fsync=False)
    for i in range(batches):
        path = store.path("b", f"{PART}/records/{2 * i:020d}.batch")
        store.put(path, _batch(2), if_match=None, if_none_match=None)
        t = now - (batches - i) * HOUR
        os.utime(path, (t, t))
    for group, offset in committed.items():
        path = store.path("b", f"clusters/c/groups/consumers/{group}/offsets/pins/partitions/"
                               "0000000000.json")
        store.put(path, json.dumps({"offset": offset}).encode(), if_match=None,
                  if_none_match=None)
    return ObjectStore(tmp_path / "objects", fsync=False)  # mtimes read from disk


def _kept(store) -> list[int]:
    return [int(n[:20]) for n, _p in store.objects(store.root / "b" / PART / "records")]


def test_expired_batches_go_once_every_group_committed_past_them(tmp_path):
    now = 1_000_000.0
    store = _log(tmp_path, 10, {"workers": 6, "audit": 12}, now)
    ret = Retention(store, "b", RetentionPolicy(max_age_s=4.5 * HOUR), tmp_path / "r.json")
    report = ret.run_once(now)
    # six batches are older than 4.5 h; "workers" has read only the first three
    assert _kept(store) == [6, 8, 10, 12, 14, 16, 18]
    assert report["partitions"]["pins/0"] == {"batches": 7, "bytes": 7 * len(_batch(2)),
                                              "oldest_offset": 6, "removed": 3,
                                                 "merged": 0}
    assert report["forced"] == []
    assert json.loads((tmp_path / "r.json").read_text())["removed_total"] == 3


def test_the_size_bound_removes_unread_batches_and_says_so(tmp_path, caplog):
    now = 1_000_000.0
    store = _log(tmp_path, 10, {"workers": 2}, now)
    ret = Retention(store, "b", RetentionPolicy(max_batches=4), tmp_path / "r.json")
    report = ret.run_once(now)
    assert _kept(store) == [12, 14, 16, 18]
    forced = report["forced"]
    assert [(f["from"], f["to"]) for f in forced] == [(2, 4), (4, 6), (6, 8), (8, 10),
                                                     (10, 12)]
    assert forced[0]["groups_behind"] == {"workers": 2}
    assert "before consumer group(s) workers read them" in caplog.text


def test_the_newest_batch_and_young_ones_are_kept(tmp_path):
    now = 1_000_000.0
    store = _log(tmp_path, 3, {}, now)  # no group at all: age alone decides
    Retention(store, "b", RetentionPolicy(max_age_s=0.5 * HOUR), tmp_path / "r.json"
              ).run_once(now)
    assert _kept(store) == [4]  # all expired, the newest kept
    store = _log(tmp_path / "young", 3, {}, now)
    Retention(store, "b", RetentionPolicy(), tmp_path / "r2.json").run_once(now)
    assert _kept(store) == [0, 2, 4]
