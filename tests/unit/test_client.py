"""The read API client against a stub HTTP server: paths, answers that are not the
API's, and an answer over the wire byte for byte."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from store.client import ApiClientError, AsyncPinfreshClient, PinfreshClient

VECS = np.arange(3 * 4, dtype="<f2").reshape(3, 4)


class _Stub(BaseHTTPRequestHandler):
    """Answers batchGet under ``/api`` only; ``/api/short`` sends a truncated body."""

    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(self.path)
        if self.path == "/api/v1/embeddings:batchGet":
            body = VECS.tobytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("X-Pinfresh-Version", "v9")
            self.send_header("X-Pinfresh-Dtype", "float16")
            self.send_header("X-Pinfresh-Shape", "3,4")
            self.send_header("X-Pinfresh-Found", np.packbits([1, 0, 1]).tobytes().hex())
        elif self.path == "/short/v1/embeddings:batchGet":
            body = VECS.tobytes()[:-5]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("X-Pinfresh-Version", "v9")
            self.send_header("X-Pinfresh-Dtype", "float16")
            self.send_header("X-Pinfresh-Shape", "3,4")
            self.send_header("X-Pinfresh-Found", "e0")
        else:  # e.g. an ingress's login redirect
            body = b"<html>moved</html>"
            self.send_response(302)
            self.send_header("Location", "/login")
            self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_sync_client_keeps_the_base_path_and_decodes_binary(stub):
    with PinfreshClient(stub + "/api/") as c:
        emb = c.get_embeddings(["a", "b", "c"])
    assert _Stub.seen[-1] == "/api/v1/embeddings:batchGet"
    assert emb.version == "v9" and emb.found.tolist() == [True, False, True]
    assert emb.vectors.dtype == np.float32 and np.array_equal(emb.vectors, VECS)


async def test_async_client_keeps_the_base_path_too(stub):
    c = AsyncPinfreshClient(stub + "/api")
    try:
        emb = await c.get_embeddings(["a", "b", "c"])
    finally:
        await c.aclose()
    assert emb.found.tolist() == [True, False, True] and np.array_equal(emb.vectors, VECS)


@pytest.mark.parametrize("path, status, code", [
    ("/short", 200, "bad_response"),  # truncated: not a reshape ValueError
    ("/elsewhere", 302, "http_error"),  # a redirect is an answer, not "no answer"
])
def test_answers_that_are_not_the_apis_are_client_errors(stub, path, status, code):
    with PinfreshClient(stub + path) as c, pytest.raises(ApiClientError) as err:
        c.get_embeddings(["a", "b", "c"])
    assert err.value.status == status and err.value.code == code
