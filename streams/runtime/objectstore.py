"""The embedded broker's durable log: a local S3-subset object store on files.

Tansu, the embedded Kafka-protocol broker, keeps its log in memory or in an S3
bucket (the shipped build has no other engine). This module is that bucket on
local disk, so a broker restart loses nothing: every record batch, every
partition's high watermark and every consumer group's committed offsets are
files under ``<data_dir>/kafka/objects``.

Its HTTP face (`streams.runtime.s3api`) speaks the part of the S3 protocol
that Tansu's object store client
(the Rust ``object_store`` crate) uses, path style (``/<bucket>/<key>``):
GET/HEAD (with ``If-Match``, ``If-None-Match`` and ``Range``), PUT with the
conditional writes Tansu relies on for its compare-and-set updates of a
partition's watermark and a group's offsets (``If-Match: <etag>`` and
``If-None-Match: *``, both answered ``412 Precondition Failed`` when they do
not hold, atomically with the write), DeleteObjects (``POST /<bucket>?delete``:
how that client deletes, even one key) and ListObjectsV2 (with ``delimiter=/``
for a folder's sub-folders, paged by continuation token). What it does not
implement (copy, multipart) is a 400, never a 5xx a client would retry.
Requests are not authenticated: it binds to loopback only and is reached by
the broker beside it (the stack never exposes its port).

Listings are answered from memory. Tansu lists a partition's whole
``records/`` prefix on every fetch behind the high watermark, so a listing
must cost no stat, hash or render per key: each folder's sorted names, and
per object its size, time, MD5 ETag and its ``<Contents>`` row, are kept
from its first use on and changed by writes and deletes (`_Folder`). The
index holds what is on disk, no more: retention (`streams.runtime.retention`)
bounds it.

Durability (``fsync=True``, the default): a PUT writes a temporary file,
fsyncs it, renames it over the key and fsyncs the folder before it is
answered, so an acknowledged write survives a power cut; the two syncs run
in a worker thread, off the event loop. A PUT of the bytes an object already
holds (durably) writes nothing and is answered at once (`unchanged`): a
consumer group's commit rewrites the offset of every partition it holds,
most of them unchanged. A record batch found torn or empty
(a power cut before any of this, a disk error) is moved to
``<data_dir>/kafka/quarantine`` and reported (`quarantine`): at start-up
(`scan_batches`, which checks each batch's length and CRC-32C) and when a GET
finds one, so a consumer moves past it instead of failing on it for ever.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from streams.runtime.recordbatch import HEADER_SIZE, batch_end, batch_problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Meta:
    etag: str  # quoted, as S3 sends it
    size: int
    mtime: float


@dataclass(slots=True)
class _Entry:
    """What the index knows of one object (ETag and listing row once asked for)."""

    size: int
    mtime: float
    etag: str | None = None
    row: str | None = None
    #: the offset after a record batch's last record (read from its header once)
    end: int | None = None
    #: False from a synced write's rename until its folder is synced (not acknowledged
    #: yet), and for what a syncing store found on disk (maybe never synced)
    durable: bool = True


@dataclass(slots=True)
class _Folder:
    """One folder: its names in order (sub-folders as ``name/``) and its objects."""

    names: list[str] = field(default_factory=list)
    files: dict[str, _Entry] = field(default_factory=dict)
    #: how many of ``names`` are sub-folders (none: a page is a slice of ``names``)
    dirs: int = 0

    def add(self, name: str) -> None:
        i = bisect.bisect_left(self.names, name)
        if i == len(self.names) or self.names[i] != name:
            self.names.insert(i, name)
            self.dirs += name.endswith("/")

    def drop(self, name: str) -> None:
        i = bisect.bisect_left(self.names, name)
        if i < len(self.names) and self.names[i] == name:
            del self.names[i]
            self.dirs -= name.endswith("/")


class KeyConflict(ValueError):
    """A key the file system cannot hold beside another (``a`` and ``a/b``)."""


def _md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _bad_part(part: str) -> bool:
    return part in ("", ".", "..") or part.startswith(".tmp-") or "\x00" in part


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectStore:
    """Objects as files under ``root/<bucket>/<key>``, indexed in memory.

    ETags are the MD5 of the bytes, as S3's: a compare-and-set must fail when
    the content changed. (An ETag from the file's inode, mtime and size repeats:
    ext4 hands a freed inode to the next file at once, and equal-sized watermark
    objects written within one timestamp tick would look unchanged.)
    """

    def __init__(self, root: Path, *, fsync: bool = True,
                 quarantine: Path | None = None) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        #: where torn batches go (default: beside the root)
        self.quarantine_dir = (quarantine or self.root.parent / "quarantine").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # conditional writes check and rename as one step; the index changes under it (a
        # PUT runs in a worker thread when it syncs the disk)
        self._lock = threading.RLock()
        self._folders: dict[Path, _Folder] = {}
        for dirpath, _dirs, files in os.walk(self.root):  # temporary files of a killed store
            for name in files:
                if name.startswith(".tmp-"):
                    Path(dirpath, name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ index
    def path(self, bucket: str, key: str) -> Path | None:
        """The file of ``bucket/key``, or None for a name that would leave the root."""
        parts = [bucket, *key.split("/")]
        if any(_bad_part(p) for p in parts):
            return None
        return self.root.joinpath(*parts)

    def _folder(self, folder: Path) -> _Folder | None:
        """The index of ``folder`` (read from disk on first use); None if there is none."""
        got = self._folders.get(folder)
        if got is not None:
            return got
        with self._lock:
            return self._load(folder)

    def _load(self, folder: Path) -> _Folder | None:
        got = self._folders.get(folder)
        if got is not None:  # another thread loaded it meanwhile
            return got
        f = _Folder()
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.startswith(".tmp-"):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        f.names.append(e.name + "/")
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        f.names.append(e.name)
                        # found on disk: maybe a write never synced (a store killed
                        # between its rename and its folder's sync, or run without
                        # fsync): not taken for durable until written again
                        f.files[e.name] = _Entry(st.st_size, st.st_mtime,
                                                 durable=not self.fsync)
        except (FileNotFoundError, NotADirectoryError):
            return None
        f.names.sort()
        f.dirs = sum(n.endswith("/") for n in f.names)
        self._folders[folder] = f
        return f

    def _entry(self, path: Path) -> _Entry | None:
        folder = self._folder(path.parent)
        return folder.files.get(path.name) if folder is not None else None

    def _etag(self, path: Path, entry: _Entry) -> str | None:
        if entry.etag is None:
            try:
                entry.etag = _md5_etag(path.read_bytes())
            except (FileNotFoundError, IsADirectoryError):
                return None
        return entry.etag

    def meta(self, path: Path) -> _Meta | None:
        """ETag, size and mtime of the object at ``path``; None when there is none."""
        entry = self._entry(path)
        if entry is None:
            return None
        etag = self._etag(path, entry)
        return None if etag is None else _Meta(etag, entry.size, entry.mtime)

    def objects(self, folder: Path) -> list[tuple[str, Path]]:
        """The objects directly in ``folder`` (not its sub-folders), in name order."""
        with self._lock:
            f = self._folder(folder)
            return [] if f is None else [(n, folder / n) for n in f.names if n in f.files]

    def subfolders(self, folder: Path) -> list[Path]:
        """The folders directly in ``folder``, in name order."""
        f = self._folder(folder)
        return [] if f is None else [folder / n[:-1] for n in f.names if n.endswith("/")]

    def size(self, path: Path) -> int:
        """Bytes of the object at ``path`` (0 if none)."""
        entry = self._entry(path)
        return entry.size if entry is not None else 0

    def mtime(self, path: Path) -> float:
        """Last write of the object at ``path`` (0 if none)."""
        entry = self._entry(path)
        return entry.mtime if entry is not None else 0.0

    def batch_end(self, path: Path) -> int | None:
        """The offset after the last record of the batch at ``path`` (None if unreadable)."""
        entry = self._entry(path)
        if entry is None:
            return None
        if entry.end is None:
            try:
                with open(path, "rb") as fh:
                    head = fh.read(HEADER_SIZE)
                entry.end = batch_end(head, int(path.name[:20]))
            except (OSError, ValueError):
                return None
        return entry.end

    # ----------------------------------------------------------------- writes
    def put(self, path: Path, data: bytes, *, if_match: str | None,
            if_none_match: str | None) -> str | None:
        """Write ``data``; None when a precondition failed (nothing written, no folder made).

        Durable before it returns when ``fsync`` (the file and its folder are
        synced). Blocks on the disk: the HTTP handler calls it in a thread.

        Raises:
            KeyConflict: the key is a folder here, or one of its folders is a key.
        """
        if not self._holds(path, if_match, if_none_match):
            return None  # checked again under the lock before the rename
        same = self.unchanged(path, data, if_match=if_match, if_none_match=if_none_match)
        if same is not None:
            return same
        tmp = path.parent / f".tmp-{path.name}-{threading.get_ident()}"
        try:
            self._ensure_dir(path.parent)
            with open(tmp, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            with self._lock:
                if not self._holds(path, if_match, if_none_match):
                    tmp.unlink(missing_ok=True)
                    self._prune(path.parent)  # a folder made for it is no prefix to list
                    return None
                existed = self._entry(path) is not None
                os.replace(tmp, path)
                st = path.stat()
                folder = self._folder(path.parent)
                etag = _md5_etag(data)
                entry = _Entry(st.st_size, st.st_mtime, etag, durable=not self.fsync)
                if folder is not None:
                    folder.files[path.name] = entry
                    if not existed:
                        folder.add(path.name)
            if self.fsync:
                _fsync(path.parent, directory=True)
                entry.durable = True
            return etag
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
            raise KeyConflict(str(exc)) from exc
        finally:
            with contextlib.suppress(OSError):  # renamed, never made, or no folder
                tmp.unlink(missing_ok=True)

    def unchanged(self, path: Path, data: bytes, *, if_match: str | None = None,
                  if_none_match: str | None = None) -> str | None:
        """The ETag of ``path`` when it already holds exactly ``data``, durably; else None.

        A PUT of the bytes an object holds, whose preconditions hold, is answered
        with its ETag and writes nothing (no file, no sync; its Last-Modified
        stays): a consumer group's commit rewrites every partition's offset, most
        of them unchanged. Never while that content's own write is still being
        synced: its PUT is not acknowledged yet either, nor for what a syncing store
        found on disk when it started (a store killed between a rename and its
        folder's sync leaves a file that a power cut may still take): the first
        PUT of it after a start writes and syncs it again.
        """
        with self._lock:
            entry = self._entry(path)
            if entry is None or entry.size != len(data) or not entry.durable:
                return None
            etag = self._etag(path, entry)
            if etag is None or etag != _md5_etag(data):
                return None
            return etag if self._holds(path, if_match, if_none_match) else None

    def merge(self, first: Path, data: bytes, others: list[Path], mtime: float) -> bool:
        """Replace ``first`` with ``data`` and remove ``others``, as one step for readers.

        The swap of `streams.runtime.compaction`: a listing or GET sees the objects
        before or after it, never the new ``first`` beside one of ``others``. False
        (nothing changed) unless ``first`` and ``others`` are still the folder's
        consecutive objects. Always synced (it rewrites data acknowledged long ago).
        """
        tmp = first.parent / f".tmp-{first.name}-{threading.get_ident()}"
        etag = _md5_etag(data)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.utime(tmp, (mtime, mtime))
            with self._lock:
                folder = self._folder(first.parent)
                names = [first.name, *(p.name for p in others)]
                lo = bisect.bisect_left(folder.names, first.name) if folder else 0
                if folder is None or folder.names[lo:lo + len(names)] != names:
                    return False  # one is gone, or another object came between
                os.replace(tmp, first)
                entry = _Entry(len(data), mtime, etag, durable=False)
                folder.files[first.name] = entry
                for p in others:
                    p.unlink(missing_ok=True)
                    folder.files.pop(p.name, None)
                del folder.names[lo + 1:lo + len(names)]
            _fsync(first.parent, directory=True)
            entry.durable = True
            return True
        except OSError as exc:
            logger.warning("merge into %s failed: %s", first, exc)
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _holds(self, path: Path, if_match: str | None, if_none_match: str | None) -> bool:
        if if_none_match is None and if_match is None:
            return True
        current = self.meta(path)
        if if_none_match == "*" and current is not None:
            return False
        return not (if_match is not None and (
            current is None or not etag_matches(if_match, current.etag)))

    def delete(self, path: Path) -> None:
        """Remove the object at ``path`` (absent, or a folder, is fine, as on S3).

        Folders left empty are removed too: S3 lists no prefix without keys.
        """
        with self._lock:
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            self._forget(path)

    def _forget(self, path: Path) -> None:
        """Drop a removed object from the index, and every folder it left empty (locked)."""
        folder = self._folders.get(path.parent)
        if folder is not None:
            folder.files.pop(path.name, None)
            folder.drop(path.name)
        self._prune(path.parent)

    def _prune(self, d: Path) -> None:
        """Remove ``d`` and its parents while they are empty (locked)."""
        # up to the bucket's folder (kept): every folder this left empty
        while d.parent != self.root and self.root in d.parents:
            try:
                d.rmdir()
            except OSError:  # not empty (or gone)
                break
            self._folders.pop(d, None)
            parent = self._folders.get(d.parent)
            if parent is not None:
                parent.drop(d.name + "/")
            d = d.parent

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._folders or folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True)
        # every new folder appears in its parent's listing
        for d in [folder, *folder.parents]:
            if d == self.root or self.root not in d.parents:
                break
            with self._lock:
                parent = self._folders.get(d.parent)
                if parent is not None:
                    parent.add(d.name + "/")

    # -------------------------------------------------------------- quarantine
    def quarantine(self, path: Path, reason: str) -> None:
        """Move a torn record batch aside, out of every listing, and report it.

        Each one is a line of ``<quarantine>/../quarantine.jsonl``: its key,
        the offsets it claimed to hold (from its key; its header may be torn
        too), why, and when. `pinfresh status` shows them.
        """
        rel = path.relative_to(self.root)
        dest = self.quarantine_dir / rel
        with self._lock:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(dest))
            except FileNotFoundError:
                return
            self._forget(path)
        record = {"key": str(rel), "reason": reason, "at": time.time(),
                  "base_offset": int(path.name[:20]) if path.name[:20].isdigit() else None}
        with open(self.quarantine_dir.parent / "quarantine.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        logger.error("record batch %s is torn (%s): moved to %s; a consumer moves past "
                     "it, its records are lost", rel, reason, dest)

    def record_folders(self) -> Iterator[Path]:
        """Every partition's ``records`` folder under the root."""
        for dirpath, dirs, _files in os.walk(self.root):
            if Path(dirpath).name == "records":
                dirs.clear()
                yield Path(dirpath)

    def scan_batches(self) -> int:
        """Check every record batch (length, magic, CRC-32C); quarantine the torn ones.

        Called at start-up, before the broker reads the log. Returns how many
        were quarantined.
        """
        bad = 0
        for folder in self.record_folders():
            for _name, path in self.objects(folder):
                try:
                    problem = batch_problem(path.read_bytes())
                except OSError as exc:
                    problem = f"unreadable: {exc}"
                if problem:
                    self.quarantine(path, problem)
                    bad += 1
        return bad

    # ----------------------------------------------------------------- listing
    def _page(self, bucket: str, prefix: str, delimiter: str, start_after: str,
              max_keys: int) -> tuple[list[tuple[str, Path, str | None]], bool]:
        """``[(key, folder, name or None for a common prefix)]`` of one page, truncated."""
        parts = prefix.split("/")
        if _bad_part(bucket) or any(_bad_part(p) for p in parts[:-1]) or parts[-1] in (
                ".", ".."):
            raise ValueError(f"invalid bucket or prefix {bucket!r} {prefix!r}")
        rel = "/".join(parts[:-1]) + "/" if len(parts) > 1 else ""
        top = self.root.joinpath(bucket, *parts[:-1])
        if delimiter not in ("", "/"):
            raise ValueError(f"delimiter {delimiter!r}: only '/' is supported")
        out: list[tuple[str, Path, str | None]] = []
        wanted = max_keys + 1  # one more than the page: whether it is truncated

        def walk(d: Path, r: str, is_top: bool) -> bool:
            folder = self._folder(d)
            if folder is None:
                return False
            names = folder.names
            lo = 0
            if start_after.startswith(r):  # jump over what sorts before the token's name here
                lo = bisect.bisect_left(names, start_after[len(r):].split("/", 1)[0])
            for name in names[lo:]:
                full = r + name
                if is_top and not full.startswith(prefix):
                    if full > prefix and not prefix.startswith(full):
                        break  # sorted: nothing later can match
                    continue
                if name.endswith("/"):
                    if start_after and full < start_after and not start_after.startswith(full):
                        continue  # every key below sorts before the token
                    if delimiter and full.startswith(prefix):
                        if full > start_after:
                            out.append((full, d, None))
                    elif walk(d / name[:-1], full, False):
                        return True
                elif full > start_after:
                    out.append((full, d, name))
                if len(out) >= wanted:
                    return True
            return False

        with self._lock:
            walk(top, rel, True)
        out.sort(key=lambda t: t[0])
        return out[:max_keys], len(out) > max_keys

    def _flat_page(self, bucket: str, prefix: str, delimiter: str, start_after: str,
                   max_keys: int) -> tuple[list[str], str, bool] | None:
        """A page of a folder that holds objects only, as a slice; None when not that case."""
        if delimiter or not prefix.endswith("/") or not max_keys:
            return None
        parts = prefix[:-1].split("/")
        if _bad_part(bucket) or any(_bad_part(p) for p in parts):
            return None  # the general walk refuses it
        d = self.root.joinpath(bucket, *parts)
        with self._lock:
            folder = self._folder(d)
            if folder is None or folder.dirs:
                return None
            if start_after and not start_after.startswith(prefix):
                if start_after > prefix:
                    return [], "", False  # past every key of the prefix
                start_after = ""
            lo = bisect.bisect_right(folder.names, start_after[len(prefix):]) \
                if start_after else 0
            chunk = folder.names[lo:lo + max_keys + 1]
            truncated = len(chunk) > max_keys
            chunk = chunk[:max_keys]
            rows = []
            for name in chunk:
                entry = folder.files[name]
                if entry.row is None:
                    etag = self._etag(d / name, entry)
                    if etag is None:
                        continue
                    entry.row = _row(prefix + name, entry, etag)
                rows.append(entry.row)
        return rows, (prefix + chunk[-1]) if chunk else "", truncated

    def page_rows(self, bucket: str, prefix: str, *, delimiter: str = "",
                  start_after: str = "", max_keys: int = 1000) -> tuple[list[str], str, bool]:
        """The ``<Contents>``/``<CommonPrefixes>`` rows of one page, its last key, truncated.

        Rows come from the index, rendered once per object. A folder of objects
        only (a partition's ``records/``, which Tansu lists on every fetch) is
        paged as a slice of its sorted names.
        """
        flat = self._flat_page(bucket, prefix, delimiter, start_after, max_keys)
        if flat is not None:
            return flat
        items, truncated = self._page(bucket, prefix, delimiter, start_after, max_keys)
        rows: list[str] = []
        last = ""
        for key, folder, name in items:
            last = max(last, key)
            if name is None:
                rows.append(f"<CommonPrefixes><Prefix>{escape(key)}</Prefix></CommonPrefixes>")
                continue
            f = self._folders.get(folder)
            entry = f.files.get(name) if f is not None else None
            if entry is None:
                continue  # deleted since the page was cut
            if entry.row is None:
                etag = self._etag(folder / name, entry)
                if etag is None:
                    continue
                entry.row = _row(key, entry, etag)
            rows.append(entry.row)
        return rows, last, truncated


    def list(self, bucket: str, prefix: str, *, delimiter: str = "", start_after: str = "",
             max_keys: int = 1000) -> tuple[list[tuple[str, Path]], list[str], bool]:
        """One page of ``bucket``'s keys under ``prefix``, in order, after ``start_after``.

        Returns ``(keys, common_prefixes, truncated)``; with ``delimiter="/"``
        the folders directly under the prefix come back as common prefixes
        instead of their keys.

        Raises:
            ValueError: the bucket or prefix names a place outside the root.
        """
        items, truncated = self._page(bucket, prefix, delimiter, start_after, max_keys)
        return ([(k, f / n) for k, f, n in items if n is not None],
                [k for k, _f, n in items if n is None], truncated)

def _row(key: str, entry: _Entry, etag: str) -> str:
    """One object's ``<Contents>`` row of a listing."""
    return (f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(entry.mtime)}"
            f"</LastModified><ETag>{escape(etag)}</ETag><Size>{entry.size}</Size>"
            "<StorageClass>STANDARD</StorageClass></Contents>")


def etag_matches(header: str, etag: str) -> bool:
    """Whether an ``If-Match``/``If-None-Match`` header names ``etag`` (or ``*``)."""
    return any(t.strip() in (etag, "*") for t in header.split(","))



def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")

__all__ = ["KeyConflict", "ObjectStore", "etag_matches"]
