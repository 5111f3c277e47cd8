"""A small HTTP/1.1 keep-alive file server for benchmarks.

Usage: ``python -m streams.bench.fileserver ROOT PORT``.

One asyncio event loop, no threads, so it does not become the bottleneck it
measures past: Python's ``http.server`` (a thread per connection) fell under
200 requests/s at 32 concurrent keep-alive connections on the 2-core dev
machine. GET only; paths outside ROOT are 404.
"""

from __future__ import annotations

import asyncio
import os
import sys


async def _serve(root: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            full = os.path.realpath(os.path.join(root, path.lstrip("/")))
            try:
                if not full.startswith(root + os.sep):
                    raise FileNotFoundError(path)
                with open(full, "rb") as f:
                    body = f.read()
                status = b"200 OK"
            except OSError:
                body, status = b"not found", b"404 Not Found"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/octet-stream"
                         b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, IndexError):
        pass
    finally:
        writer.close()


async def main(root: str, port: int) -> None:
    """Serve ROOT on 127.0.0.1:PORT until killed."""
    real = os.path.realpath(root)
    server = await asyncio.start_server(lambda r, w: _serve(real, r, w), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
