"""Catalogs: the sample Tux Paint catalog and loading a catalog to publish.

A catalog is either a JSONL file (one ``{"pin_id", "image", "caption",
"metadata"}`` object per line) or a directory of images, each optionally with
a sibling ``.txt`` whose first line is the caption.

The sample catalog comes from Debian's ``tuxpaint-stamps-default`` (GPL-2),
installed at set-up time and never committed: with root it is installed with
``apt-get install --no-install-recommends``; without root it is unpacked with
``apt-get download`` + ``dpkg-deb -x`` under the data dir. Stamps whose image
is SVG are skipped (the product decodes raster formats only), which leaves
785 captioned PNG stamps.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from encoder.errors import CatalogError
from streams.events import PinEvent

logger = logging.getLogger(__name__)

SYSTEM_STAMPS = Path("/usr/share/tuxpaint/stamps")
PACKAGE = "tuxpaint-stamps-default"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}


@dataclass(frozen=True)
class CatalogItem:
    """One pin of a catalog."""

    pin_id: str
    image: str
    caption: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def event(self, version: int = 1) -> PinEvent:
        """An upsert event for this pin."""
        return PinEvent.upsert(self.pin_id, self.image, version, self.caption, self.metadata)


def stamps_dir(data_dir: Path, install: bool = True) -> Path:
    """Return the Tux Paint stamps directory, installing the package if needed.

    Raises:
        CatalogError: not installed and could not be installed.
    """
    local = data_dir / "tuxpaint" / "usr" / "share" / "tuxpaint" / "stamps"
    for cand in (SYSTEM_STAMPS, local):
        if cand.is_dir() and any(cand.iterdir()):
            return cand
    if not install:
        raise CatalogError(f"{PACKAGE} is not installed: run `make setup`")
    if os.geteuid() == 0 and shutil.which("apt-get"):
        logger.info("installing %s with apt-get (no recommends)", PACKAGE)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        res = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                              PACKAGE], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            res = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                  PACKAGE], env=env, capture_output=True, text=True)
        if res.returncode == 0 and SYSTEM_STAMPS.is_dir():
            return SYSTEM_STAMPS
        logger.warning("apt-get install failed: %s", res.stderr[-500:])
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp,
                                 capture_output=True, text=True)
            debs = list(Path(tmp).glob("*.deb"))
            if res.returncode == 0 and debs:
                (data_dir / "tuxpaint").mkdir(parents=True, exist_ok=True)
                subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(data_dir / "tuxpaint")],
                               check=True)
                if local.is_dir():
                    return local
    raise CatalogError(
        f"could not install {PACKAGE}: run `sudo apt-get install --no-install-recommends "
        f"{PACKAGE}` or check that apt can reach Debian's mirrors"
    )


def _caption(txt: Path) -> str:
    try:
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return first[0].strip() if first else ""


def _pin_id(prefix: str, rel: Path) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(rel.with_suffix("")).replace(os.sep, "-"))
    return f"{prefix}-{slug}"[:128]


def scan_directory(root: Path, prefix: str = "img", require_caption: bool = False
                   ) -> list[CatalogItem]:
    """Catalog items for every raster image under ``root`` (sorted, stable ids)."""
    items: list[CatalogItem] = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in _IMAGE_SUFFIXES or not path.is_file():
            continue
        txt = path.with_suffix(".txt")
        caption = _caption(txt) if txt.is_file() else ""
        if require_caption and not caption:
            continue
        rel = path.relative_to(root)
        items.append(CatalogItem(
            pin_id=_pin_id(prefix, rel), image=str(path.resolve()), caption=caption,
            metadata={"category": str(rel.parent)},
        ))
    return items


def prepare_sample_catalog(data_dir: Path) -> Path:
    """Write ``<data_dir>/catalog/tuxpaint.jsonl`` (installing the stamps if needed).

    Raises:
        CatalogError: no captioned stamp was found (the package is missing, or
            still being installed by another command).
    """
    out = data_dir / "catalog" / "tuxpaint.jsonl"
    root = stamps_dir(data_dir)
    items = scan_directory(root, prefix="tux", require_caption=True)
    if not items:
        raise CatalogError(
            f"no captioned Tux Paint stamp under {root}: the tuxpaint-stamps package is "
            "missing or still being installed; run `pinfresh catalog prepare` again once it "
            "is there")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for it in items:
            f.write(json.dumps({"pin_id": it.pin_id, "image": it.image, "caption": it.caption,
                                "metadata": it.metadata}) + "\n")
    tmp.replace(out)
    logger.info("sample catalog: %d captioned stamps from %s -> %s", len(items), root, out)
    return out


def catalog_root_of(path: Path) -> Path:
    """The directory the catalog's images live under (for ``FetchSettings.catalog_root``)."""
    if path.is_dir():
        return path.resolve()
    items = list(load_catalog(path))
    if not items:
        return path.parent.resolve()
    return Path(os.path.commonpath([str(Path(i.image).parent) for i in items])).resolve()


def load_catalog(path: Path, limit: int | None = None) -> Iterator[CatalogItem]:
    """Yield the items of a JSONL catalog or an image directory.

    Raises:
        CatalogError: the path does not exist or a JSONL line is invalid.
    """
    if path.is_dir():
        yield from scan_directory(path)[:limit]
        return
    if not path.is_file():
        raise CatalogError(f"catalog {path} not found: run `pinfresh catalog prepare`")
    n = 0
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                yield CatalogItem(pin_id=d["pin_id"], image=d["image"],
                                  caption=d.get("caption", ""), metadata=d.get("metadata", {}))
            except KeyError as exc:
                raise CatalogError(
                    f"{path}:{lineno}: missing field {exc.args[0]!r}; each line needs "
                    '"pin_id" and "image" (a path or URL), optionally "caption" and '
                    '"metadata"') from exc
            except (ValueError, TypeError) as exc:
                raise CatalogError(f"{path}:{lineno}: {exc}") from exc
            n += 1
            if limit is not None and n >= limit:
                return


EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"


def emoji_dir(data_dir: Path, install: bool = True) -> Path:
    """Directory of the npm package ``emoji-datasource-google`` (installed under data/npm).

    Raises:
        CatalogError: npm is missing or the install failed.
    """
    pkg = data_dir / "npm" / "node_modules" / "emoji-datasource-google"
    if (pkg / "emoji.json").is_file():
        return pkg
    if not install:
        raise CatalogError("emoji-datasource-google is not installed: run `make setup`")
    npm = shutil.which("npm")
    if npm is None:
        raise CatalogError("npm not found: install Node.js/npm to get the generic emoji corpus")
    (data_dir / "npm").mkdir(parents=True, exist_ok=True)
    res = subprocess.run([npm, "install", "--prefix", str(data_dir / "npm"), "--no-audit",
                          "--no-fund", "--silent", EMOJI_PACKAGE], capture_output=True, text=True)
    if res.returncode != 0 or not (pkg / "emoji.json").is_file():
        raise CatalogError(f"npm install {EMOJI_PACKAGE} failed: {res.stderr[-500:]}")
    return pkg


def prepare_emoji_catalog(data_dir: Path) -> Path:
    """Write ``<data_dir>/catalog/emoji.jsonl``: 1,911 Google emoji images named in English.

    The images are Apache-2.0 (the npm package), installed at set-up time and
    never committed. Captions are the emoji names, lower-cased.
    """
    pkg = emoji_dir(data_dir)
    entries = json.loads((pkg / "emoji.json").read_text())
    out = data_dir / "catalog" / "emoji.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for e in entries:
            img = pkg / "img" / "google" / "64" / e["image"]
            name = (e.get("name") or e.get("short_name") or "").strip().lower()
            if not e.get("has_img_google") or not img.is_file() or not name:
                continue
            f.write(json.dumps({"pin_id": f"emoji-{e['unified'].lower()}", "image": str(img),
                                "caption": name, "metadata": {"category": e.get("category", "")}})
                    + "\n")
            n += 1
    tmp.replace(out)
    logger.info("generic catalog: %d emoji -> %s", n, out)
    return out
