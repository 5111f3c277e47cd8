"""The embedded broker's durable log: a local S3-subset object store on files.

Tansu, the embedded Kafka-protocol broker, keeps its log in memory or in an S3
bucket (the shipped build has no other engine). This module is that bucket on
local disk, so a broker restart loses nothing: every record batch, every
partition's high watermark and every consumer group's committed offsets are
files under ``<data_dir>/kafka/objects``.

It speaks the part of the S3 protocol that Tansu's object store client
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

Handlers do their file I/O on the event loop: objects are small (a record
batch, a watermark, a group's offsets) and in the page cache, and a thread hop
per request cost more CPU than the I/O it moved off the loop (measured with
`pinfresh bench broker`).

An object is written to a temporary file and renamed over the old one, so a
killed broker or store leaves either the old object or the new one. Like a
Kafka broker, it leaves flushing to the OS page cache (``fsync=False``): a
process crash loses nothing, a power cut can lose the last seconds.
"""

from __future__ import annotations

import bisect
import contextlib
import email.utils
import hashlib
import logging
import os
import stat
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from aiohttp import web

logger = logging.getLogger(__name__)

_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _error(status: int, code: str, message: str) -> web.Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message></Error>")
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


@dataclass(frozen=True)
class _Meta:
    etag: str  # quoted, as S3 sends it
    size: int
    mtime: float


class KeyConflict(ValueError):
    """A key the file system cannot hold beside another (``a`` and ``a/b``)."""


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


#: etags kept in memory at most (one per object read or written since the start)
_ETAG_CACHE = 500_000


def _bad_part(part: str) -> bool:
    return part in ("", ".", "..") or part.startswith(".tmp-") or "\x00" in part


class ObjectStore:
    """Objects as files under ``root/<bucket>/<key>``.

    ETags are the MD5 of the bytes, as S3's: a compare-and-set must fail when
    the content changed. (An ETag from the file's inode, mtime and size repeats:
    ext4 hands a freed inode to the next file at once, and equal-sized watermark
    objects written within one timestamp tick would look unchanged.) They are
    cached per file, checked against its inode, mtime and size.
    Listings come from a sorted index of each folder's names, built on first
    use and kept by writes and deletes, so paging through a partition's records
    (Tansu lists them on every fetch) costs no directory walk or sort per page.
    """

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # conditional writes: check and rename as one step
        self._names: dict[Path, list[str]] = {}  # folder -> sorted names, folders as "name/"
        self._etags: dict[Path, tuple[tuple[int, int, int], str]] = {}
        for dirpath, _dirs, files in os.walk(self.root):  # temporary files of a killed store
            for name in files:
                if name.startswith(".tmp-"):
                    Path(dirpath, name).unlink(missing_ok=True)

    def path(self, bucket: str, key: str) -> Path | None:
        """The file of ``bucket/key``, or None for a name that would leave the root."""
        parts = [bucket, *key.split("/")]
        if any(_bad_part(p) for p in parts):
            return None
        return self.root.joinpath(*parts)

    def meta(self, path: Path) -> _Meta | None:
        """ETag, size and mtime of the object at ``path``; None when there is none."""
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        cached = self._etags.get(path)
        if cached is not None and cached[0] == _stamp(st):
            etag = cached[1]
        else:
            try:
                etag = _md5_etag(path.read_bytes())
            except (FileNotFoundError, IsADirectoryError):
                return None
            self._remember(path, st, etag)
        return _Meta(etag, st.st_size, st.st_mtime)

    def _remember(self, path: Path, st: os.stat_result, etag: str) -> None:
        if len(self._etags) >= _ETAG_CACHE:
            self._etags.clear()  # recomputed from the bytes on the next look
        self._etags[path] = (_stamp(st), etag)

    def put(self, path: Path, data: bytes, *, if_match: str | None,
            if_none_match: str | None) -> str | None:
        """Write ``data``; None when a precondition failed (nothing written).

        Raises:
            KeyConflict: the key is a folder here, or one of its folders is a key.
        """
        tmp = path.parent / f".tmp-{path.name}-{threading.get_ident()}"
        try:
            self._ensure_dir(path.parent)
            with open(tmp, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            with self._lock:
                current = self.meta(path)
                if (if_none_match == "*" and current is not None) or (
                        if_match is not None and (current is None or not _etag_matches(
                            if_match, current.etag))):
                    return None
                os.replace(tmp, path)
                if current is None:
                    self._add_name(path.parent, path.name)
                etag = _md5_etag(data)
                self._remember(path, path.stat(), etag)
                return etag
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
            raise KeyConflict(str(exc)) from exc
        finally:
            with contextlib.suppress(OSError):  # renamed, never made, or no folder
                tmp.unlink(missing_ok=True)

    def delete(self, path: Path) -> None:
        """Remove the object at ``path`` (absent, or a folder, is fine, as on S3).

        Folders left empty are removed too: S3 lists no prefix without keys.
        """
        with self._lock:
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            self._etags.pop(path, None)
            self._drop_name(path.parent, path.name)
            folder = path.parent
            # up to the bucket's folder (kept): every folder this left empty
            while folder.parent != self.root and self.root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:  # not empty (or gone)
                    break
                self._names.pop(folder, None)
                self._drop_name(folder.parent, folder.name + "/")
                folder = folder.parent

    def _drop_name(self, folder: Path, name: str) -> None:
        names = self._names.get(folder)
        if names is not None:
            i = bisect.bisect_left(names, name)
            if i < len(names) and names[i] == name:
                del names[i]

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._names or folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True)
        # every new folder appears in its parent's listing
        for d in [folder, *folder.parents]:
            if d == self.root or self.root not in d.parents:
                break
            with self._lock:
                self._add_name(d.parent, d.name + "/")

    def _add_name(self, folder: Path, name: str) -> None:
        names = self._names.get(folder)
        if names is not None:
            i = bisect.bisect_left(names, name)
            if i == len(names) or names[i] != name:
                names.insert(i, name)

    def _entries(self, folder: Path) -> list[str]:
        names = self._names.get(folder)
        if names is None:
            try:
                with os.scandir(folder) as it:
                    names = sorted(e.name + "/" if e.is_dir() else e.name for e in it
                                   if not e.name.startswith(".tmp-"))
            except (FileNotFoundError, NotADirectoryError):
                return []
            self._names[folder] = names
        return names

    def list(self, bucket: str, prefix: str, *, delimiter: str = "", start_after: str = "",
             max_keys: int = 1000) -> tuple[list[tuple[str, Path]], list[str], bool]:
        """One page of ``bucket``'s keys under ``prefix``, in order, after ``start_after``.

        Returns ``(keys, common_prefixes, truncated)``; with ``delimiter="/"``
        the folders directly under the prefix come back as common prefixes
        instead of their keys.

        Raises:
            ValueError: the bucket or prefix names a place outside the root.
        """
        parts = prefix.split("/")
        if _bad_part(bucket) or any(_bad_part(p) for p in parts[:-1]) or parts[-1] in (
                ".", ".."):
            raise ValueError(f"invalid bucket or prefix {bucket!r} {prefix!r}")
        rel = "/".join(parts[:-1]) + "/" if len(parts) > 1 else ""
        folder = self.root.joinpath(bucket, *parts[:-1])
        if delimiter not in ("", "/"):
            raise ValueError(f"delimiter {delimiter!r}: only '/' is supported")
        keys: list[tuple[str, Path]] = []
        common: list[str] = []
        wanted = max_keys + 1  # one more than the page: whether it is truncated

        def walk(d: Path, r: str, top: bool) -> bool:
            names = self._entries(d)
            lo = 0
            if start_after.startswith(r):  # jump over what sorts before the token's name here
                lo = bisect.bisect_left(names, start_after[len(r):].split("/", 1)[0])
            for name in names[lo:]:
                full = r + name
                if top and not full.startswith(prefix):
                    if full > prefix and not prefix.startswith(full):
                        break  # sorted: nothing later can match
                    continue
                if name.endswith("/"):
                    if start_after and full < start_after and not start_after.startswith(full):
                        continue  # every key below sorts before the token
                    if delimiter and full.startswith(prefix):
                        if full > start_after:
                            common.append(full)
                    elif walk(d / name[:-1], full, False):
                        return True
                elif full > start_after:
                    keys.append((full, d / name))
                if len(keys) + len(common) >= wanted:
                    return True
            return False

        with self._lock:
            walk(folder, rel, True)
        items = sorted([(k, p) for k, p in keys] + [(c, None) for c in common])
        truncated = len(items) > max_keys
        items = items[:max_keys]
        return ([(k, p) for k, p in items if p is not None],
                [k for k, p in items if p is None], truncated)


def _etag_matches(header: str, etag: str) -> bool:
    return any(t.strip() in (etag, "*") for t in header.split(","))


def _range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` as a half-open ``[start, end)``."""
    if not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].partition("-")
    try:
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start = int(first)
            end = min(size, int(last) + 1) if last else size
    except ValueError:
        return None
    return (start, end) if start < end else None


def make_app(store: ObjectStore) -> web.Application:
    """The S3-subset HTTP app over ``store``."""

    async def bucket_op(request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        if request.method == "POST" and "delete" in request.query:
            return await delete_objects(request, bucket)
        if request.method != "GET" or request.query.get("list-type") != "2":
            # 4xx, not 5xx: a client must not retry what will never work
            return _error(400, "NotImplemented", f"{request.method} {request.path_qs}")
        prefix = request.query.get("prefix", "")
        delimiter = request.query.get("delimiter", "")
        after = request.query.get("continuation-token") or request.query.get("start-after", "")
        try:
            max_keys = max(0, min(1000, int(request.query.get("max-keys", "1000"))))
            keys, common, truncated = store.list(bucket, prefix, delimiter=delimiter,
                                                 start_after=after, max_keys=max_keys)
        except ValueError as exc:
            return _error(400, "InvalidArgument", str(exc))
        rows = []
        last = ""
        for key, p in keys:
            last = max(last, key)
            m = store.meta(p)
            if m is None:
                continue
            rows.append(f"<Contents><Key>{escape(key)}</Key><LastModified>"
                        f"{_iso(m.mtime)}</LastModified><ETag>{escape(m.etag)}"
                        f"</ETag><Size>{m.size}</Size><StorageClass>STANDARD</StorageClass>"
                        "</Contents>")
        for c in common:
            last = max(last, c)
            rows.append(f"<CommonPrefixes><Prefix>{escape(c)}</Prefix></CommonPrefixes>")
        nxt = (f"<NextContinuationToken>{escape(last)}</NextContinuationToken>"
               if truncated and last else "")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{_S3_NS}">'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
                + (f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "")
                + f"<KeyCount>{len(rows)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
                f"<IsTruncated>{'true' if truncated and last else 'false'}</IsTruncated>{nxt}"
                + "".join(rows) + "</ListBucketResult>")
        return web.Response(body=body.encode(), content_type="application/xml")

    async def delete_objects(request: web.Request, bucket: str) -> web.Response:
        """DeleteObjects (``POST /bucket?delete``): how object_store deletes, even one key."""
        try:
            root = ET.fromstring(await request.read())
        except ET.ParseError as exc:
            return _error(400, "MalformedXML", str(exc))
        quiet = (root.findtext(f"{{{_S3_NS}}}Quiet") or root.findtext("Quiet")) == "true"
        done, failed = [], []
        for obj in list(root.iter(f"{{{_S3_NS}}}Object")) + list(root.iter("Object")):
            key = obj.findtext(f"{{{_S3_NS}}}Key") or obj.findtext("Key") or ""
            path = store.path(bucket, key)
            if path is None:
                failed.append(f"<Error><Key>{escape(key)}</Key><Code>InvalidArgument</Code>"
                              "<Message>invalid key</Message></Error>")
                continue
            store.delete(path)
            if not quiet:
                done.append(f"<Deleted><Key>{escape(key)}</Key></Deleted>")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult xmlns="{_S3_NS}">'
                + "".join(done + failed) + "</DeleteResult>")
        return web.Response(body=body.encode(), content_type="application/xml")

    async def object_op(request: web.Request) -> web.StreamResponse:
        bucket, key = request.match_info["bucket"], request.match_info["key"]
        path = store.path(bucket, key)
        if path is None:
            return _error(400, "InvalidArgument", f"invalid key {key!r}")
        if request.method == "PUT":
            if "x-amz-copy-source" in request.headers or "uploadId" in request.query:
                return _error(400, "NotImplemented", "copy and multipart uploads")
            data = await request.read()
            try:
                etag = store.put(path, data, if_match=request.headers.get("If-Match"),
                                 if_none_match=request.headers.get("If-None-Match"))
            except KeyConflict as exc:
                return _error(409, "KeyConflict", f"{key}: {exc}")
            if etag is None:
                return _error(412, "PreconditionFailed",
                              "At least one of the pre-conditions you specified did not hold")
            return web.Response(status=200, headers={"ETag": etag})
        if request.method == "DELETE":
            store.delete(path)
            return web.Response(status=204)
        if request.method not in ("GET", "HEAD"):
            return _error(405, "MethodNotAllowed", request.method)
        m = store.meta(path)
        if m is None:
            return _error(404, "NoSuchKey", "The specified key does not exist.")
        headers = {"ETag": m.etag, "Last-Modified": email.utils.formatdate(m.mtime, usegmt=True),
                   "Accept-Ranges": "bytes"}
        im = request.headers.get("If-Match")  # evaluated first, as S3 does
        if im is not None and not _etag_matches(im, m.etag):
            return _error(412, "PreconditionFailed", "If-Match did not hold")
        inm = request.headers.get("If-None-Match")
        if inm is not None and _etag_matches(inm, m.etag):
            return web.Response(status=304, headers=headers)
        if request.method == "HEAD":
            headers["Content-Length"] = str(m.size)
            return web.Response(status=200, headers=headers)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return _error(404, "NoSuchKey", "The specified key does not exist.")
        rng = request.headers.get("Range")
        if rng:
            span = _range(rng, len(data))
            if span is None:
                return _error(416, "InvalidRange", "The requested range is not satisfiable")
            start, end = span
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            return web.Response(status=206, body=data[start:end], headers=headers)
        return web.Response(status=200, body=data, headers=headers)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{bucket}", bucket_op)
    app.router.add_route("*", "/{bucket}/", bucket_op)
    app.router.add_route("*", "/{bucket}/{key:.+}", object_op)
    return app


def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
