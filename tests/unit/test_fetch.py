"""Fetch guards that need no network: schemes, SSRF address checks, file rules."""

from __future__ import annotations

import pytest

from streams.events import Reason
from streams.fetch import Fetcher, FetchError, FetchSettings


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
    assert err.value.reason == Reason.FORBIDDEN_LOCATION and not err.value.transient


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
    with pytest.raises(FetchError) as err:
        await fetcher.fetch(str(tmp_path / ".." / "x" / "..") + "/etc/hosts")
    assert err.value.reason in (Reason.FORBIDDEN_LOCATION, Reason.NOT_FOUND)


async def test_symlink_out_of_root_refused(fetcher, tmp_path):
    (tmp_path / "link.png").symlink_to("/etc/hostname")
    with pytest.raises(FetchError) as err:
        await fetcher.fetch(str(tmp_path / "link.png"))
    assert err.value.reason in (Reason.FORBIDDEN_LOCATION, Reason.NOT_FOUND)


async def test_files_refused_without_root():
    f = Fetcher(FetchSettings())
    with pytest.raises(FetchError) as err:
        await f.fetch("/etc/hostname")
    assert err.value.reason == Reason.FORBIDDEN_LOCATION
    await f.close()
