"""Fetch image bytes from a file path or an http(s) URL, with limits and SSRF guards.

Rules, all configurable in `FetchSettings`:

* file paths (``/abs/path`` or ``file://``) are read only under
  ``catalog_root`` (symlinks resolved first); without a root, files are refused;
* http(s) only; every hop (redirects followed by hand, at most
  ``max_redirects``) is checked: the host's addresses must all be public
  unless ``allow_private_networks`` or the host is in ``allowed_hosts``;
  loopback, private, link-local (cloud metadata), multicast and reserved
  addresses are refused, whatever notation or DNS name leads to them. Names
  are checked by the HTTP client's resolver (`GuardedResolver`), and the
  client connects to the very addresses it returned, so DNS rebinding cannot
  slip an internal address in after the check;
* the body is streamed and cut at ``max_bytes``; the whole fetch (all hops)
  gets ``timeout_s``.

Errors are `encoder.errors.FetchError` (a `Rejected`) with a dead-letter
reason: timeouts, connection errors, 429 and 5xx raise its subclass
`TransientFetchError` (retried with backoff by the caller, after
``Retry-After`` when a 429/503 sends one, capped at ``timeout_s``),
everything else is permanent.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import ipaddress
import os
import socket
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import aiohttp.abc

from encoder.errors import ConfigError, FetchError, TransientFetchError
from streams.events import Reason
from streams.settings import FetchSettings


def _ip_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or not ip.is_global
    )


Resolver = Callable[[str, int], Awaitable[list[str]]]


def _fd_path(fd: int, path: str) -> str:
    """The real path of an open descriptor (``/proc``; elsewhere ``realpath`` of ``path``)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


async def system_resolver(host: str, port: int) -> list[str]:
    """Addresses of ``host`` from the system resolver (``getaddrinfo``)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """The HTTP client's resolver: it hands out only addresses it has just checked.

    aiohttp connects to exactly the addresses its resolver returns, so the
    check and the connection use one DNS answer: a name that resolves to a
    public address first and to an internal one a moment later (DNS
    rebinding) cannot slip through. Literal IP hosts never reach a resolver;
    `Fetcher` checks those itself before each request.
    """

    def __init__(self, settings: FetchSettings, resolver: Resolver) -> None:
        self.settings = settings
        self.resolver = resolver

    def check(self, host: str, ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
        """Raise `FetchError` if any address of ``host`` is refused."""
        if self.settings.allow_private_networks or host in self.settings.allowed_hosts:
            return
        for ip in ips:
            if not _ip_is_public(ip):
                raise FetchError(
                    Reason.FORBIDDEN_LOCATION,
                    f"{host} resolves to non-public address {ip}: refused (set "
                    "PINFRESH_FETCH__ALLOWED_HOSTS to allow it deliberately)",
                )

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        """Resolve once, check every address, return them for the connection."""
        try:
            ips = [ipaddress.ip_address(a) for a in await self.resolver(host, port)]
        except (OSError, ValueError) as exc:
            raise TransientFetchError(Reason.FETCH_FAILED,
                                      f"cannot resolve {host}: {exc}") from exc
        if not ips:
            raise TransientFetchError(Reason.FETCH_FAILED, f"{host} has no address")
        self.check(host, ips)
        return [{"hostname": host, "host": str(ip), "port": port,
                 "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for ip in ips]

    async def close(self) -> None:
        """Nothing to release."""


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def is_url(location: str) -> bool:
    """Whether an event's ``image`` is fetched over HTTP(S) rather than read from a file."""
    return location.startswith(("http://", "https://"))


def check_catalog_root(settings: FetchSettings, locations: Sequence[str] = ()) -> None:
    """Refuse a catalog root that is not a directory, and file paths without a root.

    ``locations`` is a sample of the images the command will read (a backfill's
    first page); without a root, a file path there would dead-letter every pin
    as ``forbidden_location``.

    Raises:
        ConfigError: naming the root or a file path and the fix.
    """
    root = settings.catalog_root
    if root is not None and not root.is_dir():
        raise ConfigError(f"catalog root {root} is not a directory: give the folder the "
                          "catalog's image paths are under (`catalog prepare` prints it)")
    if root is None:
        path = next((loc for loc in locations if not is_url(loc)), None)
        if path is not None:
            raise ConfigError(f"the catalog has file paths (e.g. {path}) but no catalog root "
                              "is set, so every one would be refused: give --catalog-root "
                              "DIR or PINFRESH_FETCH__CATALOG_ROOT")


class Fetcher:
    """Fetches image bytes; one instance per worker, one shared HTTP connection pool."""

    def __init__(self, settings: FetchSettings, resolver: Resolver | None = None) -> None:
        self.settings = settings
        self._root = settings.catalog_root.resolve() if settings.catalog_root else None
        self._root_s = str(self._root) if self._root else ""
        # lexical prefixes a path may start with: the root as configured and as resolved
        self._roots = ({os.path.normpath(os.path.abspath(settings.catalog_root)), self._root_s}
                       if settings.catalog_root else set())
        self.guard = GuardedResolver(settings, resolver or system_resolver)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # made on first use, inside the event loop that uses it
        if self._session is None:
            t = self.settings.timeout_s
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.settings.max_connections, resolver=self.guard,
                    ttl_dns_cache=10, ssl=ssl.create_default_context()),
                headers={"User-Agent": self.settings.user_agent, "Accept": "image/*"},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
                auto_decompress=False, trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, location: str) -> bytes:
        """Return the bytes at ``location``.

        Raises:
            FetchError: see the module docstring for reasons.
        """
        parts = urlsplit(location)
        if parts.scheme in ("http", "https"):
            try:
                return await asyncio.wait_for(self._fetch_http(location), self.settings.timeout_s)
            except TimeoutError as exc:
                raise TransientFetchError(
                    Reason.FETCH_FAILED, f"timed out after {self.settings.timeout_s}s") from exc
        if parts.scheme == "file":
            return await asyncio.to_thread(self._read_file, parts.path)
        if parts.scheme == "" and location.startswith("/"):
            return await asyncio.to_thread(self._read_file, location)
        raise FetchError(
            Reason.FORBIDDEN_LOCATION,
            f"unsupported location {location[:80]!r}: use an absolute file path or http(s) URL",
        )

    async def fetch_many(self, locations: Sequence[str]) -> list[bytes | FetchError]:
        """`fetch` for many locations at once: one result or `FetchError` per location.

        Local files are read together in one worker thread (one hand-off per
        batch, not per file); URLs are fetched concurrently over the pool.
        """
        out: list[bytes | FetchError | None] = [None] * len(locations)
        files: list[tuple[int, str]] = []
        urls: list[int] = []
        for i, loc in enumerate(locations):
            parts = urlsplit(loc)
            if parts.scheme == "file":
                files.append((i, parts.path))
            elif parts.scheme == "" and loc.startswith("/"):
                files.append((i, loc))
            else:
                urls.append(i)

        async def one(i: int) -> None:
            try:
                out[i] = await self.fetch(locations[i])
            except FetchError as exc:
                out[i] = exc

        if files:
            read = await asyncio.to_thread(self._read_files, [p for _, p in files])
            for (i, _), res in zip(files, read, strict=True):
                out[i] = res
        if urls:
            await asyncio.gather(*(one(i) for i in urls))
        return [r if r is not None else FetchError(Reason.FETCH_FAILED, "no result")
                for r in out]

    # ------------------------------------------------------------------ files
    def _read_files(self, paths: Sequence[str]) -> list[bytes | FetchError]:
        out: list[bytes | FetchError] = []
        for p in paths:
            try:
                out.append(self._read_file(p))
            except FetchError as exc:
                out.append(exc)
        return out

    def _read_file(self, path_str: str) -> bytes:
        """Read a file under the catalog root; cheap per file (one open, fstat, readlink).

        The path is checked twice: lexically before opening (so nothing
        outside the root is ever opened), then by the real path of the open
        descriptor (so a symlink or ``..`` that leads out is refused, without
        resolving the path component by component). FIFOs and devices are
        refused without blocking.
        """
        if self._root is None:
            raise FetchError(
                Reason.FORBIDDEN_LOCATION,
                "file paths are refused: set PINFRESH_FETCH__CATALOG_ROOT to allow a directory",
            )
        norm = os.path.normpath(path_str)
        if not any(norm == r or norm.startswith(r + os.sep) for r in self._roots):
            raise FetchError(
                Reason.FORBIDDEN_LOCATION, f"{path_str} is outside the catalog root {self._root}"
            )
        try:
            fd = os.open(norm, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise FetchError(Reason.NOT_FOUND, f"no such file: {path_str}") from exc
        except OSError as exc:
            raise FetchError(Reason.FETCH_FAILED, f"cannot open {path_str}: {exc}") from exc
        try:
            real = _fd_path(fd, norm)
            if not (real == self._root_s or real.startswith(self._root_s + os.sep)):
                raise FetchError(Reason.FORBIDDEN_LOCATION,
                                 f"{path_str} leads outside the catalog root {self._root}")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FetchError(Reason.NOT_FOUND, f"{path_str} is not a regular file")
            if st.st_size > self.settings.max_bytes:
                raise FetchError(
                    Reason.TOO_LARGE,
                    f"{path_str} is over the {self.settings.max_bytes}-byte limit")
            chunks = []
            left = self.settings.max_bytes + 1
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > self.settings.max_bytes:  # grew while being read
            raise FetchError(
                Reason.TOO_LARGE, f"{path_str} is over the {self.settings.max_bytes}-byte limit"
            )
        return data

    # ------------------------------------------------------------------- http
    def _check_url(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise FetchError(Reason.FORBIDDEN_LOCATION, f"refused URL {url[:100]!r}")
        if parts.username or parts.password:
            raise FetchError(Reason.FORBIDDEN_LOCATION, "URLs with credentials are refused")
        try:  # a literal address never reaches the resolver: check it here
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        self.guard.check(host, [literal])

    async def _fetch_http(self, url: str) -> bytes:
        session = self._client()
        for _hop in range(self.settings.max_redirects + 1):
            self._check_url(url)  # names are checked by the resolver, at connect time
            try:
                async with session.get(url, allow_redirects=False) as resp:
                    headers = {k.lower(): v for k, v in resp.headers.items()}
                    if resp.status in (301, 302, 303, 307, 308):
                        loc = headers.get("location")
                        if not loc:
                            raise FetchError(Reason.FETCH_FAILED, "redirect without Location")
                        url = urljoin(url, loc)
                        continue
                    self._check_status(resp.status, headers)
                    declared = headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.settings.max_bytes:
                        raise FetchError(
                            Reason.TOO_LARGE,
                            f"Content-Length {declared} over the {self.settings.max_bytes} limit",
                        )
                    buf = bytearray()
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        buf += chunk
                        if len(buf) > self.settings.max_bytes:
                            raise FetchError(
                                Reason.TOO_LARGE,
                                f"body over the {self.settings.max_bytes}-byte limit",
                            )
                    return bytes(buf)
            except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
                raise TransientFetchError(Reason.FETCH_FAILED, f"timeout: {exc!r}") from exc
            except aiohttp.InvalidURL as exc:
                raise FetchError(Reason.FORBIDDEN_LOCATION, f"refused URL: {exc}") from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise TransientFetchError(Reason.FETCH_FAILED,
                                          f"connection failed: {exc!r}") from exc
        raise FetchError(
            Reason.FETCH_FAILED, f"more than {self.settings.max_redirects} redirects"
        )

    def _check_status(self, code: int, headers: dict[str, str]) -> None:
        if code < 300:
            return
        if code in (404, 410):
            raise FetchError(Reason.NOT_FOUND, f"HTTP {code}")
        if code != 429 and code < 500:
            raise FetchError(Reason.FETCH_FAILED, f"HTTP {code}")
        wait = retry_after_s(headers.get("retry-after")) if code in (429, 503) else None
        if wait is not None:  # honoured, but never beyond the fetch's own time cap
            wait = min(wait, self.settings.timeout_s)
        raise TransientFetchError(Reason.FETCH_FAILED, f"HTTP {code}", retry_after=wait)
