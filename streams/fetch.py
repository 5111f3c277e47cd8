"""Fetch image bytes from a file path or an http(s) URL, with limits and SSRF guards.

Rules, all configurable in `FetchSettings`:

* file paths (``/abs/path`` or ``file://``) are read only under
  ``catalog_root`` (symlinks resolved first); without a root, files are refused;
* http(s) only; every hop (redirects followed by hand, at most
  ``max_redirects``) is checked: the host's addresses must all be public
  unless ``allow_private_networks`` or the host is in ``allowed_hosts``;
  loopback, private, link-local (cloud metadata), multicast and reserved
  addresses are refused, whatever notation or DNS name leads to them;
* the body is streamed and cut at ``max_bytes``; the whole fetch (all hops)
  gets ``timeout_s``.

Errors are `FetchError` with a dead-letter reason and a ``transient`` flag:
timeouts, connection errors, 429 and 5xx are transient (retried with backoff
by the caller), everything else is permanent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import BaseModel, Field

from encoder.errors import PinfreshError
from streams.events import Reason


class FetchSettings(BaseModel):
    """Image fetching. Env prefix ``PINFRESH_FETCH__``."""

    max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest image body accepted")
    timeout_s: float = Field(10.0, gt=0, description="time limit for one fetch, all hops")
    max_redirects: int = Field(3, ge=0, le=10)
    catalog_root: Path | None = Field(None, description="file paths are allowed only under here")
    allow_private_networks: bool = Field(
        False, description="allow loopback/private/link-local targets (never in production)"
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="host names allowed even if they resolve privately"
    )
    user_agent: str = "pinfresh/0.1"


class FetchError(PinfreshError):
    """An image could not be fetched.

    Attributes:
        reason: dead-letter reason code.
        transient: whether retrying may succeed.
    """

    def __init__(self, reason: Reason, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.transient = transient


def _ip_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or not ip.is_global
    )


class Fetcher:
    """Fetches image bytes; one instance per worker, shared HTTP connection pool."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._root = settings.catalog_root.resolve() if settings.catalog_root else None
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            headers={"User-Agent": settings.user_agent, "Accept": "image/*"},
            timeout=httpx.Timeout(settings.timeout_s),
            trust_env=False,
        )

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.aclose()

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
                raise FetchError(
                    Reason.FETCH_FAILED, f"timed out after {self.settings.timeout_s}s",
                    transient=True,
                ) from exc
        if parts.scheme == "file":
            return await asyncio.to_thread(self._read_file, parts.path)
        if parts.scheme == "" and location.startswith("/"):
            return await asyncio.to_thread(self._read_file, location)
        raise FetchError(
            Reason.FORBIDDEN_LOCATION,
            f"unsupported location {location[:80]!r}: use an absolute file path or http(s) URL",
        )

    # ------------------------------------------------------------------ files
    def _read_file(self, path_str: str) -> bytes:
        if self._root is None:
            raise FetchError(
                Reason.FORBIDDEN_LOCATION,
                "file paths are refused: set PINFRESH_FETCH__CATALOG_ROOT to allow a directory",
            )
        try:
            path = Path(path_str).resolve(strict=True)
        except (FileNotFoundError, RuntimeError) as exc:
            raise FetchError(Reason.NOT_FOUND, f"no such file: {path_str}") from exc
        if not path.is_relative_to(self._root):
            raise FetchError(
                Reason.FORBIDDEN_LOCATION, f"{path_str} is outside the catalog root {self._root}"
            )
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise FetchError(Reason.NOT_FOUND, f"no such file: {path_str}") from exc
        except OSError as exc:
            raise FetchError(Reason.FETCH_FAILED, f"cannot open {path_str}: {exc}") from exc
        with os.fdopen(fd, "rb") as f:
            if not os.path.isfile(path):
                raise FetchError(Reason.NOT_FOUND, f"{path_str} is not a regular file")
            data = f.read(self.settings.max_bytes + 1)
        if len(data) > self.settings.max_bytes:
            raise FetchError(
                Reason.TOO_LARGE, f"{path_str} is over the {self.settings.max_bytes}-byte limit"
            )
        return data

    # ------------------------------------------------------------------- http
    async def _check_host(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise FetchError(Reason.FORBIDDEN_LOCATION, f"refused URL {url[:100]!r}")
        if parts.username or parts.password:
            raise FetchError(Reason.FORBIDDEN_LOCATION, "URLs with credentials are refused")
        if self.settings.allow_private_networks or host in self.settings.allowed_hosts:
            return
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except socket.gaierror as exc:
            raise FetchError(
                Reason.FETCH_FAILED, f"cannot resolve {host}: {exc}", transient=True
            ) from exc
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if not _ip_is_public(ip):
                raise FetchError(
                    Reason.FORBIDDEN_LOCATION,
                    f"{host} resolves to non-public address {ip}: refused (set "
                    "PINFRESH_FETCH__ALLOWED_HOSTS to allow it deliberately)",
                )

    async def _fetch_http(self, url: str) -> bytes:
        for _hop in range(self.settings.max_redirects + 1):
            await self._check_host(url)
            try:
                async with self._client.stream("GET", url) as resp:
                    if resp.is_redirect:
                        loc = resp.headers.get("location")
                        if not loc:
                            raise FetchError(Reason.FETCH_FAILED, "redirect without Location")
                        url = urljoin(url, loc)
                        continue
                    self._check_status(resp)
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.settings.max_bytes:
                        raise FetchError(
                            Reason.TOO_LARGE,
                            f"Content-Length {declared} over the {self.settings.max_bytes} limit",
                        )
                    buf = bytearray()
                    async for chunk in resp.aiter_bytes():
                        buf += chunk
                        if len(buf) > self.settings.max_bytes:
                            raise FetchError(
                                Reason.TOO_LARGE,
                                f"body over the {self.settings.max_bytes}-byte limit",
                            )
                    return bytes(buf)
            except httpx.TimeoutException as exc:
                raise FetchError(Reason.FETCH_FAILED, f"timeout: {exc!r}", transient=True) from exc
            except httpx.TransportError as exc:
                raise FetchError(
                    Reason.FETCH_FAILED, f"connection failed: {exc!r}", transient=True
                ) from exc
        raise FetchError(
            Reason.FETCH_FAILED, f"more than {self.settings.max_redirects} redirects"
        )

    @staticmethod
    def _check_status(resp: httpx.Response) -> None:
        code = resp.status_code
        if code < 300:
            return
        if code in (404, 410):
            raise FetchError(Reason.NOT_FOUND, f"HTTP {code}")
        transient = code == 429 or code >= 500
        raise FetchError(Reason.FETCH_FAILED, f"HTTP {code}", transient=transient)
