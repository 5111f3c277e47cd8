"""Fetch guards that need no network: schemes, SSRF address checks, file rules."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from encoder.errors import TransientRejection
from streams.events import Reason
from streams.fetch import Fetcher, FetchError, FetchSettings, retry_after_s


@pytest.fixture
async def fetcher(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"x" * 10)
    (tmp_path / "big.png").write_bytes(b"x" * 2000)
    f = Fetcher(FetchSettings(catalog_root=tmp_path, max_bytes=1000, timeout_s=2))
    yield f
    await f.close()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/a.png", "http://localhost/a.png", "http://2130706433/a.png",
    "http://0x7f.0.0.1/a.png", "http://[::1]/a.png", "http://[::ffff:127.0.0.1]/a.png",
    "http://10.1.2.3/a.png", "http://192.168.0.1/a.png", "http://172.16.0.9/a.png",
    "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0/a.png",
])
async def test_non_public_addresses_refused(fetcher, url):
    with pytest.raises(FetchError) as err:
        await fetcher.fetch(url)
    assert err.value.reason == Reason.FORBIDDEN_LOCATION
    assert not isinstance(err.value, TransientRejection)


@pytest.mark.parametrize("loc", ["ftp://x.example/a.png", "gopher://x/", "relative/a.png",
                                 "http://user:pw@x.example/a.png"])
async def test_bad_schemes_refused(fetcher, loc):
    with pytest.raises(FetchError) as err:
        await fetcher.fetch(loc)
    assert err.value.reason == Reason.FORBIDDEN_LOCATION


async def test_file_rules(fetcher, tmp_path):
    assert await fetcher.fetch(str(tmp_path / "ok.png")) == b"x" * 10
    assert await fetcher.fetch(f"file://{tmp_path / 'ok.png'}") == b"x" * 10
    with pytest.raises(FetchError) as err:
        await fetcher.fetch(str(tmp_path / "missing.png"))
    assert err.value.reason == Reason.NOT_FOUND
    with pytest.raises(FetchError) as err:
        await fetcher.fetch(str(tmp_path / "big.png"))
    assert err.value.reason == Reason.TOO_LARGE
    with pytest.raises(FetchError) as err:
        await fetcher.fetch("/etc/passwd")
    assert err.value.reason == Reason.FORBIDDEN_LOCATION
    # ".." out of the root to a file that exists: only the root check can refuse it
    up = "/..".join([""] * (len(tmp_path.parts) + 1))
    outside = f"{tmp_path}{up}/etc/hostname"
    assert Path(outside).resolve() == Path("/etc/hostname") and Path(outside).exists()
    with pytest.raises(FetchError) as err:
        await fetcher.fetch(outside)
    assert err.value.reason == Reason.FORBIDDEN_LOCATION


async def test_symlink_out_of_root_refused(fetcher, tmp_path):
    (tmp_path / "link.png").symlink_to("/etc/hostname")  # exists: only the check refuses it
    with pytest.raises(FetchError) as err:
        await fetcher.fetch(str(tmp_path / "link.png"))
    assert err.value.reason == Reason.FORBIDDEN_LOCATION


async def test_files_refused_without_root():
    f = Fetcher(FetchSettings())
    with pytest.raises(FetchError) as err:
        await f.fetch("/etc/hostname")
    assert err.value.reason == Reason.FORBIDDEN_LOCATION
    await f.close()


# ------------------------------------------------------------ DNS rebinding
class _Rebinder:
    """A resolver that answers a public address first and loopback afterwards."""

    def __init__(self, answers: list[list[str]]) -> None:
        self.answers = answers
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


def _two_servers(monkeypatch):
    """A server on 127.0.0.2, which the test declares public, and one on 127.0.0.1, same port.

    Loopback answers on all of 127/8, so the two stand for "the public address
    the name resolved to first" and "the internal address a rebinding answer
    points at"; their hits show where connections really went.
    """
    import streams.fetch as fetch_mod

    real = fetch_mod._ip_is_public
    monkeypatch.setattr(fetch_mod, "_ip_is_public",
                        lambda ip: str(ip) == "127.0.0.2" or real(ip))
    public = _Server({"/a.png": (200, {}, b"PUBLIC")}, host="127.0.0.2")
    internal = _Server({"/a.png": (200, {}, b"INTERNAL")}, host="127.0.0.1",
                       port=public.port)
    return public, internal


@pytest.mark.faults
async def test_connects_to_the_address_it_checked_not_a_second_answer(monkeypatch, fault_case):
    public, internal = _two_servers(monkeypatch)
    resolver = _Rebinder([["127.0.0.2"], ["127.0.0.1"]])
    f = Fetcher(FetchSettings(timeout_s=5), resolver=resolver)
    try:
        # the name is unknown to DNS: only our resolver's (checked) answer can be used
        assert await f.fetch(f"http://rebind.example:{public.port}/a.png") == b"PUBLIC"
        assert await f.fetch(f"http://rebind.example:{public.port}/a.png") == b"PUBLIC"
        assert resolver.calls == 1 and public.hits == ["/a.png"] * 2 and internal.hits == []
        fault_case.add("DNS rebinding (public answer, then loopback)",
                       "one resolution; the connection goes to the checked address",
                       f"{resolver.calls} resolution for 2 fetches; public server hit twice, "
                       "internal server never")
    finally:
        await f.close()
        public.close()
        internal.close()


@pytest.mark.faults
async def test_rebinding_to_loopback_on_a_later_connection_is_refused(monkeypatch, fault_case):
    public, internal = _two_servers(monkeypatch)
    resolver = _Rebinder([["127.0.0.2"], ["127.0.0.1"]])
    url = f"http://rebind.example:{public.port}/a.png"
    first = Fetcher(FetchSettings(timeout_s=5), resolver=resolver)
    second = Fetcher(FetchSettings(timeout_s=5), resolver=resolver)  # a new connection
    try:
        assert await first.fetch(url) == b"PUBLIC"
        with pytest.raises(FetchError) as err:  # the second answer is loopback
            await second.fetch(url)
        assert err.value.reason == Reason.FORBIDDEN_LOCATION
        assert internal.hits == []  # never connected to 127.0.0.1
        fault_case.add("DNS rebinding on the next connection",
                       "forbidden_location; never connects to 127.0.0.1",
                       f"{err.value.reason.value}; internal server hits: {len(internal.hits)}")
    finally:
        await first.close()
        await second.close()
        public.close()
        internal.close()


class _Server:
    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]],
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.hits.append(self.path)
                code, headers, body = routes[self.path]
                self.send_response(code)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


async def test_name_is_resolved_by_our_resolver_and_allowed_hosts_apply():
    srv = _Server({"/ok.png": (200, {}, b"PNGDATA")})
    resolver = _Rebinder([["127.0.0.1"]])
    url = f"http://images.test:{srv.port}/ok.png"  # not resolvable by DNS: only by ours
    try:
        refused = Fetcher(FetchSettings(timeout_s=5), resolver=resolver)
        with pytest.raises(FetchError) as err:
            await refused.fetch(url)
        assert err.value.reason == Reason.FORBIDDEN_LOCATION and srv.hits == []
        await refused.close()
        allowed = Fetcher(FetchSettings(timeout_s=5, allowed_hosts=["images.test"]),
                          resolver=resolver)
        assert await allowed.fetch(url) == b"PNGDATA"
        assert await allowed.fetch(url) == b"PNGDATA"  # the pooled connection is reused
        await allowed.close()
        assert srv.hits == ["/ok.png", "/ok.png"]
    finally:
        srv.close()


async def test_retry_after_is_honoured_up_to_the_fetch_timeout():
    srv = _Server({"/busy": (503, {"Retry-After": "2"}, b""),
                   "/slow-down": (429, {"Retry-After": "86400"}, b""),
                   "/dated": (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, b""),
                   "/plain": (500, {"Retry-After": "3"}, b"")})
    f = Fetcher(FetchSettings(timeout_s=5, allow_private_networks=True))
    try:
        got = {}
        for path in ("/busy", "/slow-down", "/dated", "/plain"):
            with pytest.raises(FetchError) as err:
                await f.fetch(f"http://127.0.0.1:{srv.port}{path}")
            assert isinstance(err.value, TransientRejection)
            got[path] = err.value.retry_after
        assert got == {"/busy": 2.0, "/slow-down": 5.0, "/dated": 0.0, "/plain": None}
    finally:
        await f.close()
        srv.close()


def test_retry_after_header_forms():
    assert retry_after_s("120") == 120.0
    assert retry_after_s("Thu, 01 Jan 1970 00:01:40 GMT", now=40.0) == 60.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


async def test_fetch_many_reads_files_in_one_go_with_per_item_errors(fetcher, tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")  # opening a FIFO must not block the worker
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up.png").symlink_to(tmp_path / "ok.png")  # inside: fine
    got = await fetcher.fetch_many([
        str(tmp_path / "ok.png"), str(tmp_path / "missing.png"), "/etc/hostname",
        str(tmp_path / "pipe.png"), str(tmp_path / "sub" / "up.png"),
        f"file://{tmp_path / 'big.png'}", "gopher://x/"])
    assert got[0] == b"x" * 10 and got[4] == b"x" * 10
    reasons = [g.reason if isinstance(g, FetchError) else None for g in got]
    assert reasons == [None, Reason.NOT_FOUND, Reason.FORBIDDEN_LOCATION, Reason.NOT_FOUND,
                       None, Reason.TOO_LARGE, Reason.FORBIDDEN_LOCATION]


def test_a_worker_refuses_a_catalog_root_that_does_not_exist(tmp_path):
    """It used to start without a word and refuse every file later."""
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "PINFRESH_STACK__DATA_DIR": str(tmp_path)}
    for args, extra in [(["--catalog-root", str(tmp_path / "nope")], {}),
                        ([], {"PINFRESH_FETCH__CATALOG_ROOT": str(tmp_path / "nope")})]:
        r = subprocess.run([sys.executable, "-m", "streams.cli", "worker", *args],
                           env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"catalog root {tmp_path / 'nope'} is not a directory" in r.stderr


def test_file_paths_without_a_root_are_refused_up_front(tmp_path):
    from encoder.errors import ConfigError
    from streams.fetch import FetchSettings, check_catalog_root

    check_catalog_root(FetchSettings(), ["https://img.example/a.jpg"])
    check_catalog_root(FetchSettings(catalog_root=tmp_path), ["/x/a.png"])
    with pytest.raises(ConfigError, match="file paths .*/x/a.png"):
        check_catalog_root(FetchSettings(), ["https://img.example/a.jpg", "/x/a.png"])
