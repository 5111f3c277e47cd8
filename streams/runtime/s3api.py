"""The object store's HTTP face: the part of S3 that Tansu's object store client speaks.

Path style (``/<bucket>/<key>``): GET/HEAD (with ``If-Match``,
``If-None-Match`` and ``Range``), PUT with the conditional writes Tansu relies
on (``If-Match: <etag>`` and ``If-None-Match: *``, both answered ``412
Precondition Failed`` when they do not hold, atomically with the write),
DeleteObjects (``POST /<bucket>?delete``) and ListObjectsV2 (with
``delimiter=/``, paged by continuation token) over a
`streams.runtime.objectstore.ObjectStore`. What it does not implement (copy,
multipart) is a 400, never a 5xx a client would retry. Requests are not
authenticated: it binds to loopback only and is reached by the broker beside
it (the stack never exposes its port).
"""

from __future__ import annotations

import asyncio
import email.utils
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

from aiohttp import web

from streams.runtime.objectstore import KeyConflict, ObjectStore, etag_matches
from streams.runtime.recordbatch import batch_problem

__all__ = ["make_app"]

_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _error(status: int, code: str, message: str) -> web.Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message></Error>")
    return web.Response(status=status, body=body.encode(), content_type="application/xml")



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
            rows, last, truncated = store.page_rows(bucket, prefix, delimiter=delimiter,
                                                    start_after=after, max_keys=max_keys)
        except ValueError as exc:
            return _error(400, "InvalidArgument", str(exc))
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
            im, inm = request.headers.get("If-Match"), request.headers.get("If-None-Match")
            try:
                # the disk syncs run off the event loop; a store that does not sync, or a
                # PUT of the bytes the object already holds (nothing to write), inline
                etag = store.unchanged(path, data, if_match=im, if_none_match=inm)
                if etag is None and store.fsync:
                    etag = await asyncio.to_thread(store.put, path, data, if_match=im,
                                                   if_none_match=inm)
                elif etag is None:
                    etag = store.put(path, data, if_match=im, if_none_match=inm)
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
        if im is not None and not etag_matches(im, m.etag):
            return _error(412, "PreconditionFailed", "If-Match did not hold")
        inm = request.headers.get("If-None-Match")
        if inm is not None and etag_matches(inm, m.etag):
            return web.Response(status=304, headers=headers)
        if request.method == "HEAD":
            headers["Content-Length"] = str(m.size)
            return web.Response(status=200, headers=headers)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return _error(404, "NoSuchKey", "The specified key does not exist.")
        if path.suffix == ".batch" and path.parent.name == "records":
            problem = batch_problem(data, check_crc=False)  # the scan at start checks CRCs
            if problem:  # torn: out of every listing from now on; this fetch gets nothing
                store.quarantine(path, problem)
                return _error(404, "NoSuchKey", f"record batch quarantined: {problem}")
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
