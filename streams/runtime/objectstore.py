"""The embedded broker's durable log: a local S3-subset object store on files.

Tansu, the embedded Kafka-protocol broker, keeps its log in memory or in an S3
bucket (the shipped build has no other engine). This module is that bucket on
local disk, so a broker restart loses nothing: every record batch, every
partition's high watermark and every consumer group's committed offsets are
files under ``<data_dir>/kafka/objects``.

It speaks the part of the S3 protocol that Tansu's object store client uses,
path style (``/<bucket>/<key>``): GET/HEAD (with ``If-None-Match`` and
``Range``), PUT with the conditional writes Tansu relies on for its
compare-and-set updates (``If-Match: <etag>`` and ``If-None-Match: *``, both
answered ``412 Precondition Failed`` when they do not hold, atomically with the
write), DELETE and ListObjectsV2. Requests are not authenticated: it binds to
loopback only and is reached by the broker beside it (the stack never exposes
its port).

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

import email.utils
import hashlib
import logging
import os
import threading
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


class ObjectStore:
    """Objects as files under ``root/<bucket>/<key>``; etags are MD5s of the bytes."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # conditional writes: check and rename as one step
        self._etags: dict[Path, str] = {}
        self._dirs: set[Path] = set()

    def path(self, bucket: str, key: str) -> Path | None:
        """The file of ``bucket/key``, or None for a name that would leave the root."""
        parts = [bucket, *key.split("/")]
        if any(p in ("", ".", "..") or p.startswith(".tmp-") for p in parts):
            return None
        return self.root.joinpath(*parts)

    def meta(self, path: Path) -> _Meta | None:
        """ETag, size and mtime of the object at ``path``; None when there is none."""
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        etag = self._etags.get(path)
        if etag is None:
            etag = '"' + hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() + '"'
            self._etags[path] = etag
        return _Meta(etag, st.st_size, st.st_mtime)

    def put(self, path: Path, data: bytes, *, if_match: str | None,
            if_none_match: str | None) -> str | None:
        """Write ``data``; None when a precondition failed (nothing written)."""
        etag = '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        tmp = path.parent / f".tmp-{path.name}-{threading.get_ident()}"
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
                tmp.unlink(missing_ok=True)
                return None
            os.replace(tmp, path)
            self._etags[path] = etag
        return etag

    def delete(self, path: Path) -> None:
        """Remove the object at ``path`` (absent is fine, as on S3)."""
        with self._lock:
            path.unlink(missing_ok=True)
            self._etags.pop(path, None)

    def list(self, bucket: str, prefix: str) -> list[tuple[str, Path]]:
        """Every ``(key, path)`` of ``bucket`` whose key starts with ``prefix``, sorted."""
        base = self.root / bucket
        # walk only the deepest folder the prefix names
        folder = base.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else base
        out = []
        if folder.is_dir():
            for dirpath, _dirs, files in os.walk(folder):
                for name in files:
                    if name.startswith(".tmp-"):
                        continue
                    p = Path(dirpath) / name
                    key = p.relative_to(base).as_posix()
                    if key.startswith(prefix):
                        out.append((key, p))
        out.sort()
        return out


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
        if request.method != "GET" or request.query.get("list-type") != "2":
            return _error(501, "NotImplemented", f"{request.method} {request.path_qs}")
        prefix = request.query.get("prefix", "")
        max_keys = int(request.query.get("max-keys", "1000"))
        after = request.query.get("continuation-token") or request.query.get("start-after", "")
        items = store.list(bucket, prefix)
        items = [kp for kp in items if kp[0] > after]
        page, truncated = items[:max_keys], len(items) > max_keys
        rows = []
        for key, p in page:
            m = store.meta(p)
            if m is None:
                continue
            rows.append(f"<Contents><Key>{escape(key)}</Key><LastModified>"
                        f"{_iso(m.mtime)}</LastModified><ETag>{escape(m.etag)}"
                        f"</ETag><Size>{m.size}</Size><StorageClass>STANDARD</StorageClass>"
                        "</Contents>")
        nxt = (f"<NextContinuationToken>{escape(page[-1][0])}</NextContinuationToken>"
               if truncated and page else "")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{_S3_NS}">'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
                f"<KeyCount>{len(rows)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{nxt}"
                + "".join(rows) + "</ListBucketResult>")
        return web.Response(body=body.encode(), content_type="application/xml")

    async def object_op(request: web.Request) -> web.StreamResponse:
        bucket, key = request.match_info["bucket"], request.match_info["key"]
        path = store.path(bucket, key)
        if path is None:
            return _error(400, "InvalidArgument", f"invalid key {key!r}")
        if request.method == "PUT":
            if "x-amz-copy-source" in request.headers or "uploadId" in request.query:
                return _error(501, "NotImplemented", "copy and multipart uploads")
            data = await request.read()
            etag = store.put(path, data, if_match=request.headers.get("If-Match"),
                             if_none_match=request.headers.get("If-None-Match"))
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
        inm = request.headers.get("If-None-Match")
        if inm is not None and _etag_matches(inm, m.etag):
            return web.Response(status=304, headers=headers)
        im = request.headers.get("If-Match")
        if im is not None and not _etag_matches(im, m.etag):
            return _error(412, "PreconditionFailed", "If-Match did not hold")
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
