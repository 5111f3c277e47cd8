"""The docs' links lead somewhere: every relative file exists, every #anchor is a heading."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_exists():
    anchors = {f.resolve(): {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$",
                                                                    f.read_text(), re.M)}
               for f in DOCS}
    bad = []
    for f in DOCS:
        for m in re.finditer(r"\]\(([^)\s#]*)(?:#([\w-]+))?\)", f.read_text()):
            target, anchor = m.group(1), m.group(2)
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (f.parent / target).resolve() if target else f.resolve()
            if not path.exists():
                bad.append(f"{f.name}: {target} does not exist")
            elif anchor and path in anchors and anchor not in anchors[path]:
                bad.append(f"{f.name}: #{anchor} is no heading of {path.name}")
    assert not bad, bad
