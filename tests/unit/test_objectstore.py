"""The broker's object store: the S3 subset Tansu relies on, conditional writes above all.

Tansu updates a partition's high watermark and a group's offsets by
compare-and-set on the object's ETag; a store that ignored ``If-Match``
(s3rver does) lost 12,922 of 18,000 acknowledged records to six concurrent
producers on one partition. These tests hold the store to S3's answers.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

import pytest
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from encoder.errors import StackError
from streams.runtime.objectstore import ObjectStore
from streams.runtime.s3api import make_app

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@pytest.fixture
async def s3(tmp_path):
    client = TestClient(TestServer(make_app(ObjectStore(tmp_path / "objects"))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def test_put_get_head_delete(s3, tmp_path):
    put = await s3.put("/b/a/b/c.json", data=b"hello")
    assert put.status == 200
    etag = put.headers["ETag"]
    got = await s3.get("/b/a/b/c.json")
    assert got.status == 200 and await got.read() == b"hello" and got.headers["ETag"] == etag
    head = await s3.head("/b/a/b/c.json")
    assert head.status == 200 and head.headers["Content-Length"] == "5"
    assert (await s3.get("/b/a/b/c.json", headers={"If-None-Match": etag})).status == 304
    part = await s3.get("/b/a/b/c.json", headers={"Range": "bytes=1-3"})
    assert part.status == 206 and await part.read() == b"ell"
    assert (tmp_path / "objects" / "b" / "a" / "b" / "c.json").read_bytes() == b"hello"
    assert (await s3.delete("/b/a/b/c.json")).status == 204
    missing = await s3.get("/b/a/b/c.json")
    assert missing.status == 404 and "NoSuchKey" in await missing.text()


async def test_conditional_writes_are_compare_and_set(s3):
    first = await s3.put("/b/wm.json", data=b"1", headers={"If-None-Match": "*"})
    assert first.status == 200
    again = await s3.put("/b/wm.json", data=b"2", headers={"If-None-Match": "*"})
    assert again.status == 412  # create-only on an existing object
    etag = first.headers["ETag"]
    ok = await s3.put("/b/wm.json", data=b"2", headers={"If-Match": etag})
    assert ok.status == 200
    stale = await s3.put("/b/wm.json", data=b"3", headers={"If-Match": etag})
    assert stale.status == 412  # the etag moved on: nothing written
    assert await (await s3.get("/b/wm.json")).read() == b"2"
    absent = await s3.put("/b/none.json", data=b"x", headers={"If-Match": etag})
    assert absent.status == 412


async def test_racing_compare_and_set_lets_exactly_one_win(s3):
    etag = (await s3.put("/b/counter", data=b"0")).headers["ETag"]
    answers = await asyncio.gather(*(
        s3.put("/b/counter", data=str(i).encode(), headers={"If-Match": etag})
        for i in range(1, 21)))
    assert sorted(r.status for r in answers).count(200) == 1


async def test_list_objects_v2_by_prefix_and_pages(s3):
    for key in ("t/p/0/r/001.batch", "t/p/0/r/002.batch", "t/p/0/wm.json", "t/p/1/r/001.batch",
                "other.json"):
        assert (await s3.put(f"/b/{key}", data=key.encode())).status == 200

    async def page(**query: str) -> ET.Element:
        res = await s3.get("/b", params={"list-type": "2", **query})
        assert res.status == 200
        return ET.fromstring(await res.text())

    root = await page(prefix="t/p/0/r/")
    keys = [c.findtext(f"{NS}Key") for c in root.iter(f"{NS}Contents")]
    assert keys == ["t/p/0/r/001.batch", "t/p/0/r/002.batch"]
    first = await page(prefix="t/", **{"max-keys": "2"})
    assert first.findtext(f"{NS}IsTruncated") == "true"
    token = first.findtext(f"{NS}NextContinuationToken")
    rest = await page(prefix="t/", **{"continuation-token": token})
    keys = [c.findtext(f"{NS}Key") for root in (first, rest) for c in root.iter(f"{NS}Contents")]
    assert keys == ["t/p/0/r/001.batch", "t/p/0/r/002.batch", "t/p/0/wm.json",
                    "t/p/1/r/001.batch"]
    assert rest.findtext(f"{NS}IsTruncated") == "false"


async def test_keys_cannot_leave_the_root(s3, tmp_path):
    store = ObjectStore(tmp_path / "objects")
    for key in ("a/../../escape", "../escape", "a/./b", "a//b", ".tmp-x"):
        assert store.path("b", key) is None, key
    for key in ("a/../../escape", "a//b"):
        res = await s3.put(f"/b/{key}", data=b"x")
        assert res.status >= 400, key
    assert [p.name for p in tmp_path.iterdir()] == ["objects"]
    assert not any((tmp_path / "objects").rglob("*"))


async def test_etags_survive_a_restart_of_the_store(tmp_path):
    root = tmp_path / "objects"
    a = ObjectStore(root)
    path = a.path("b", "k")
    assert path is not None
    etag = a.put(path, b"v1", if_match=None, if_none_match="*")
    b = ObjectStore(root)  # a new process: etags from the bytes on disk
    meta = b.meta(path)
    assert meta is not None and meta.etag == etag
    assert b.put(path, b"v2", if_match=etag, if_none_match=None) is not None


def test_memory_broker_restart_is_refused_without_force(tmp_path):
    from streams.cli import cli

    env = {"PINFRESH_STACK__DATA_DIR": str(tmp_path), "PINFRESH_STACK__KAFKA_LOG": "memory"}
    res = CliRunner().invoke(cli, ["restart", "kafka"], env=env)
    # the console script turns a StackError into one line and exit 2
    assert isinstance(res.exception, StackError) and "--force" in str(res.exception)


async def test_listings_cannot_leave_the_root(s3, tmp_path):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.pem").write_text("x")
    for query in ({"list-type": "2", "prefix": "../secret/"},
                  {"list-type": "2", "prefix": "a/../../secret/"}):
        res = await s3.get("/b", params=query)
        assert res.status == 400, query
    store = ObjectStore(tmp_path / "objects")
    for bucket, prefix in (("..", ""), ("b", "../"), ("b", "a/../../"), (".", "x")):
        with pytest.raises(ValueError):
            store.list(bucket, prefix)


async def test_delete_objects_and_delimiter_listing(s3):
    """What object_store sends: DeleteObjects for every delete; ``delimiter=/`` for groups."""
    for key in ("g/consumers/a.json", "g/consumers/b.json", "g/consumers/a/offsets/t/0.json",
                "g/other.json"):
        assert (await s3.put(f"/b/{key}", data=b"{}")).status == 200
    res = await s3.get("/b", params={"list-type": "2", "prefix": "g/consumers/",
                                     "delimiter": "/"})
    root = ET.fromstring(await res.text())
    assert [c.findtext(f"{NS}Key") for c in root.iter(f"{NS}Contents")] == [
        "g/consumers/a.json", "g/consumers/b.json"]
    assert [c.findtext(f"{NS}Prefix") for c in root.iter(f"{NS}CommonPrefixes")] == [
        "g/consumers/a/"]
    body = (f'<Delete xmlns="{NS[1:-1]}"><Object><Key>g/consumers/a.json</Key></Object>'
            "<Object><Key>g/missing.json</Key></Object></Delete>")
    res = await s3.post("/b?delete", data=body.encode())
    assert res.status == 200
    deleted = [d.findtext(f"{NS}Key") for d in ET.fromstring(await res.text()).iter(
        f"{NS}Deleted")]
    assert deleted == ["g/consumers/a.json", "g/missing.json"]  # absent counts, as on S3
    assert (await s3.get("/b/g/consumers/a.json")).status == 404
    res = await s3.get("/b", params={"list-type": "2", "prefix": "g/"})
    keys = [c.findtext(f"{NS}Key") for c in ET.fromstring(await res.text()).iter(
        f"{NS}Contents")]
    assert keys == ["g/consumers/a/offsets/t/0.json", "g/consumers/b.json", "g/other.json"]
    # the last key under a folder goes: so does the folder, from delimiter listings too
    body = (f'<Delete xmlns="{NS[1:-1]}"><Object><Key>g/consumers/a/offsets/t/0.json</Key>'
            "</Object></Delete>")
    assert (await s3.post("/b?delete", data=body.encode())).status == 200
    res = await s3.get("/b", params={"list-type": "2", "prefix": "g/consumers/",
                                     "delimiter": "/"})
    assert not list(ET.fromstring(await res.text()).iter(f"{NS}CommonPrefixes"))
    assert (await s3.put("/b/g/consumers/a/offsets/t/1.json", data=b"{}")).status == 200
    res = await s3.get("/b", params={"list-type": "2", "prefix": "g/consumers/a/"})
    assert [c.findtext(f"{NS}Key") for c in ET.fromstring(await res.text()).iter(
        f"{NS}Contents")] == ["g/consumers/a/offsets/t/1.json"]


async def test_a_growing_folder_pages_in_order_without_gaps(s3):
    keys = [f"t/p/0/r/{i:020d}.batch" for i in range(2_345)]
    for k in keys[:2_000]:
        await s3.put(f"/b/{k}", data=b"r")
    seen, token, pages = [], None, 0
    while True:
        q = {"list-type": "2", "prefix": "t/p/0/r/"}
        if token:
            q["continuation-token"] = token
        root = ET.fromstring(await (await s3.get("/b", params=q)).text())
        seen += [c.findtext(f"{NS}Key") for c in root.iter(f"{NS}Contents")]
        pages += 1
        if pages == 1:  # records arrive while a reader pages: they are listed too
            for k in keys[2_000:]:
                await s3.put(f"/b/{k}", data=b"r")
        if root.findtext(f"{NS}IsTruncated") != "true":
            break
        token = root.findtext(f"{NS}NextContinuationToken")
    assert seen == keys and pages == 3


async def test_a_key_where_a_folder_is_is_a_conflict_and_leaves_nothing(s3, tmp_path):
    assert (await s3.put("/b/a/b", data=b"x")).status == 200
    res = await s3.put("/b/a", data=b"y")  # "a" is a folder here
    assert res.status == 409
    res = await s3.put("/b/a/b/c", data=b"z")  # "a/b" is a file here
    assert res.status == 409
    assert not list((tmp_path / "objects").rglob(".tmp-*"))
    assert (await s3.delete("/b/a")).status == 204  # a folder is no object: nothing to do
    assert await (await s3.get("/b/a/b")).read() == b"x"


async def test_etags_are_the_contents_md5(s3):
    """As S3's: equal-sized rewrites (a watermark) get a new ETag whenever the bytes change,
    whatever inode and timestamp the file system hands out."""
    import hashlib

    etags = []
    for value in (b"0001", b"0002", b"0001"):
        res = await s3.put("/b/wm.json", data=value)
        etags.append(res.headers["ETag"])
        assert etags[-1] == f'"{hashlib.md5(value).hexdigest()}"'
        head = await s3.head("/b/wm.json")
        assert head.headers["ETag"] == etags[-1]
    assert etags[0] != etags[1]


async def test_if_match_is_checked_before_if_none_match(s3):
    etag = (await s3.put("/b/k", data=b"v")).headers["ETag"]
    res = await s3.get("/b/k", headers={"If-Match": '"other"', "If-None-Match": etag})
    assert res.status == 412


def test_the_running_brokers_engine_decides_not_this_shells_setting(tmp_path):
    """A stack started before the disk log (its stack.json names no engine) runs a memory
    broker: `restart kafka` refuses without --force although the default is now disk."""
    import json

    from streams.cli import cli

    svc = {"pid": 2**22 + 1, "port": 1, "log": "x", "bus_port": 0}
    (tmp_path / "stack.json").write_text(json.dumps({
        "host": "127.0.0.1", "kafka": {"name": "kafka", **svc},
        "redis": {"name": "redis", **svc}, "milvus": {"name": "milvus", **svc}}))
    res = CliRunner().invoke(cli, ["restart", "kafka"],
                             env={"PINFRESH_STACK__DATA_DIR": str(tmp_path)})
    assert isinstance(res.exception, StackError) and "--force" in str(res.exception)


# ------------------------------------------------------ a log that can run for months
def _batch(records: int = 1, value: bytes = b"v") -> bytes:
    """A real Kafka record batch (what Tansu writes per produce), ``records`` long."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0,
                                  producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                  batch_size=1 << 20)
    for i in range(records):
        b.append(i, timestamp=1_000, key=b"k", value=value, headers=[])
    return bytes(b.build())


_RECORDS = "clusters/c/topics/t/partitions/0000000000/records"


async def test_a_failed_conditional_put_leaves_no_folder(s3, tmp_path):
    """A phantom consumer group: an If-Match on a key that does not exist, in a folder
    that does not exist, left that folder behind, listed as a common prefix."""
    res = await s3.put("/b/clusters/c/groups/consumers/ghost/x.json", data=b"{}",
                       headers={"If-Match": '"nope"'})
    assert res.status == 412
    assert not (tmp_path / "objects" / "b" / "clusters").exists()
    root = ET.fromstring(await (await s3.get("/b", params={
        "list-type": "2", "prefix": "clusters/c/groups/consumers/", "delimiter": "/"})).text())
    assert [p.findtext(f"{NS}Prefix") for p in root.iter(f"{NS}CommonPrefixes")] == []


def test_listings_come_from_memory_without_touching_the_files(tmp_path, monkeypatch):
    """Tansu lists a partition's every batch on each fetch: after the first listing no
    file is read or stat'ed again per key."""
    from pathlib import Path

    store = ObjectStore(tmp_path / "objects", fsync=False)
    for i in range(50):
        path = store.path("b", f"{_RECORDS}/{i:020d}.batch")
        assert store.put(path, _batch(), if_match=None, if_none_match="*")
    first, _last, _t = store.page_rows("b", _RECORDS + "/")
    assert len(first) == 50

    def no_disk(*_a, **_k):
        raise AssertionError("a listing touched the disk")

    monkeypatch.setattr(Path, "read_bytes", no_disk)
    monkeypatch.setattr(Path, "stat", no_disk)
    again, _last, _t = store.page_rows("b", _RECORDS + "/")
    assert again == first


def test_acknowledged_writes_are_synced_with_their_folder(tmp_path, monkeypatch):
    import os

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    store = ObjectStore(tmp_path / "objects")  # fsync by default
    path = store.path("b", "clusters/c/w.json")
    assert store.put(path, b"{}", if_match=None, if_none_match=None)
    assert len(synced) == 2  # the file before its rename, the folder after it
    synced.clear()
    ObjectStore(tmp_path / "o2", fsync=False).put(path, b"{}", if_match=None,
                                                   if_none_match=None)
    assert synced == []


async def test_torn_batches_are_quarantined_at_start_and_on_read(tmp_path):
    import json

    root = tmp_path / "kafka" / "objects"
    store = ObjectStore(root, fsync=False)
    good, torn = _batch(3), _batch(3)[:-7]
    for i, data in enumerate([good, torn, b"", good]):
        store.put(store.path("b", f"{_RECORDS}/{i * 3:020d}.batch"), data, if_match=None,
                  if_none_match=None)
    restarted = ObjectStore(root, fsync=False)
    assert restarted.scan_batches() == 2
    keys = [k for k, _p in restarted.list("b", _RECORDS + "/")[0]]
    assert keys == [f"{_RECORDS}/{0:020d}.batch", f"{_RECORDS}/{9:020d}.batch"]
    lines = [json.loads(x) for x in (tmp_path / "kafka" / "quarantine.jsonl").read_text()
             .splitlines()]
    assert [(x["base_offset"], "header says" in x["reason"] or "shorter" in x["reason"])
            for x in lines] == [(3, True), (6, True)]
    assert (tmp_path / "kafka" / "quarantine" / "b" / _RECORDS / f"{3:020d}.batch").exists()
    # torn after the start (a disk error): the GET that finds it answers 404, and the
    # batch leaves every listing, so the next fetch moves past it
    bad = restarted.path("b", f"{_RECORDS}/{12:020d}.batch")
    restarted.put(bad, good, if_match=None, if_none_match=None)
    bad.write_bytes(good[:30])
    client = TestClient(TestServer(make_app(restarted)))
    await client.start_server()
    try:
        res = await client.get(f"/b/{_RECORDS}/{12:020d}.batch")
        assert res.status == 404 and "quarantined" in await res.text()
        assert f"{_RECORDS}/{12:020d}.batch" not in [
            k for k, _p in restarted.list("b", _RECORDS + "/")[0]]
    finally:
        await client.close()


def test_the_broker_gets_no_variable_of_the_callers_but_what_pinfresh_sets(monkeypatch):
    from streams.runtime.broker import _broker_env

    monkeypatch.setenv("CLUSTER_ID", "prod")  # Tansu's own: a data dir showed no topics
    monkeypatch.setenv("STORAGE_ENGINE", "memory://x/")
    monkeypatch.setenv("AWS_ENDPOINT", "http://elsewhere")
    monkeypatch.setenv("RUST_LOG", "info")
    env = _broker_env(1234)
    assert "CLUSTER_ID" not in env and "STORAGE_ENGINE" not in env
    assert env["AWS_ENDPOINT"] == "http://127.0.0.1:1234" and env["RUST_LOG"] == "info"


def test_a_flat_folder_pages_exactly_as_the_general_walk(tmp_path):
    """The fast path (a folder of objects only, as a slice of its names) answers every
    page as the general walk does, whatever the token."""
    import random

    store = ObjectStore(tmp_path / "objects", fsync=False)
    names = sorted(f"{random.Random(i).randrange(10**6):020d}.batch" for i in range(300))
    for n in names:
        store.put(store.path("b", f"{_RECORDS}/{n}"), b"x", if_match=None, if_none_match=None)
    prefix = _RECORDS + "/"
    rng = random.Random(7)
    tokens = ["", "a", "zzz", prefix, prefix + names[0], prefix + names[-1],
              *(prefix + rng.choice(names) for _ in range(20)),
              *(prefix + f"{rng.randrange(10**6):020d}" for _ in range(20))]
    for token in tokens:
        for size in (1, 7, 1000):
            fast = store._flat_page("b", prefix, "", token, size)
            assert fast is not None
            items, truncated = store._page("b", prefix, "", token, size)
            assert [r.split("<Key>")[1].split("</Key>")[0] for r in fast[0]] == \
                [k for k, _f, _n in items], token
            assert fast[2] == truncated and fast[1] == (items[-1][0] if items else "")


async def test_a_put_of_the_bytes_an_object_holds_writes_nothing(s3, tmp_path, monkeypatch):
    import os

    first = await s3.put("/b/g/offsets/0.json", data=b'{"offset":7}')
    etag = first.headers["ETag"]
    f = tmp_path / "objects" / "b" / "g" / "offsets" / "0.json"
    inode, mtime = f.stat().st_ino, f.stat().st_mtime_ns
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    threads: list[object] = []
    real_to_thread = asyncio.to_thread
    monkeypatch.setattr(asyncio, "to_thread",
                        lambda fn, *a, **k: (threads.append(fn), real_to_thread(fn, *a, **k))[1])
    again = await s3.put("/b/g/offsets/0.json", data=b'{"offset":7}')
    assert again.status == 200 and again.headers["ETag"] == etag
    assert (f.stat().st_ino, f.stat().st_mtime_ns) == (inode, mtime) and synced == []
    assert threads == []  # answered on the event loop: nothing to wait for
    # preconditions are S3's still: create-only fails, a stale If-Match fails
    assert (await s3.put("/b/g/offsets/0.json", data=b'{"offset":7}',
                         headers={"If-None-Match": "*"})).status == 412
    assert (await s3.put("/b/g/offsets/0.json", data=b'{"offset":7}',
                         headers={"If-Match": '"0123"'})).status == 412
    threads.clear()  # (a 412 is decided by put(), in a thread)
    ok = await s3.put("/b/g/offsets/0.json", data=b'{"offset":7}', headers={"If-Match": etag})
    assert ok.status == 200 and synced == [] and threads == []
    # other bytes are written (and synced, in a thread) as before
    moved = await s3.put("/b/g/offsets/0.json", data=b'{"offset":8}')
    assert moved.headers["ETag"] != etag and f.read_bytes() == b'{"offset":8}'
    assert len(synced) == 2 and len(threads) == 1


def test_an_unchanged_put_holds_to_the_puts_preconditions(tmp_path):
    store = ObjectStore(tmp_path / "objects")
    path = store.path("b", "g/offsets/0.json")
    etag = store.put(path, b"7", if_match=None, if_none_match=None)
    assert store.unchanged(path, b"7") == etag
    assert store.unchanged(path, b"7", if_match=etag) == etag
    assert store.unchanged(path, b"7", if_none_match="*") is None
    assert store.unchanged(path, b"7", if_match='"0123"') is None
    assert store.unchanged(path, b"8") is None


def test_what_a_syncing_store_finds_on_disk_is_written_again_once(tmp_path, monkeypatch):
    """A store killed between a rename and its folder's sync leaves a file a power cut
    may still take: after a start, the first PUT of its bytes writes and syncs it."""
    import os

    root = tmp_path / "objects"
    path = ObjectStore(root).path("b", "g/offsets/0.json")
    etag = ObjectStore(root).put(path, b"7", if_match=None, if_none_match=None)
    restarted = ObjectStore(root)
    assert restarted.unchanged(path, b"7") is None
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    assert restarted.put(path, b"7", if_match=None, if_none_match=None) == etag
    assert len(synced) == 2
    assert restarted.unchanged(path, b"7") == etag
    # a store that does not sync promises nothing more for what it wrote itself
    assert ObjectStore(root, fsync=False).unchanged(path, b"7") == etag


def test_an_unchanged_put_waits_for_the_sync_of_the_write_it_repeats(tmp_path, monkeypatch):
    """Content renamed into place but whose folder is not synced yet is not acknowledged:
    a PUT of the same bytes then must not be answered as already durable."""
    import threading

    from streams.runtime import objectstore

    store = ObjectStore(tmp_path / "objects")
    path = store.path("b", "g/offsets/0.json")
    assert store.put(path, b"1", if_match=None, if_none_match=None)
    in_sync, release = threading.Event(), threading.Event()
    real = objectstore._fsync

    def slow(p, directory=False):
        if directory:
            in_sync.set()
            assert release.wait(30)
        real(p, directory)

    monkeypatch.setattr(objectstore, "_fsync", slow)
    answers: list[str | None] = []
    writer = threading.Thread(target=lambda: answers.append(
        store.put(path, b"2", if_match=None, if_none_match=None)))
    writer.start()
    try:
        assert in_sync.wait(30)
        assert path.read_bytes() == b"2"  # renamed, its folder not synced
        assert store.unchanged(path, b"2") is None
    finally:
        release.set()
        writer.join(30)
    assert answers == [store.meta(path).etag]
    assert store.unchanged(path, b"2") == answers[0]
