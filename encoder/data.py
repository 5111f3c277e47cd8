"""(image, caption) pairs for training and evaluating encoders.

Pairs come from catalog JSONL files (``{"image": path, "caption": text, ...}``
per line, as written by ``pinfresh catalog prepare``). The held-out split is a
function of the caption alone (a hash), so a caption is either always in the
test split or never, on every machine and in every run: test captions are
never seen in training.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from encoder.errors import ConfigError


@dataclass(frozen=True)
class Pair:
    """One training/eval example."""

    image: Path
    caption: str


def normalize_caption(text: str) -> str:
    """Case- and space-folded caption: the unit the split and recall use."""
    return re.sub(r"\s+", " ", text.strip().lower())


def read_pairs(paths: Iterable[Path]) -> list[Pair]:
    """Pairs with a non-empty caption from JSONL catalogs, in file order.

    Raises:
        ConfigError: a file is missing (with the command that writes it).
    """
    out: list[Pair] = []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"catalog {path} not found: run `pinfresh catalog prepare`")
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            if d.get("caption", "").strip():
                out.append(Pair(Path(d["image"]), d["caption"].strip()))
    return out


#: Share of captions held out of every training run (encoder and graft alike), so no
#: evaluation caption is ever trained on. The one place this number lives.
HELD_OUT_FRACTION = 0.25


def is_test_caption(caption: str, test_fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether a caption belongs to the held-out split (stable hash of the caption)."""
    h = int.from_bytes(hashlib.sha256(normalize_caption(caption).encode()).digest()[:8], "big")
    return h / 2**64 < test_fraction


def split_by_caption(
    pairs: Sequence[Pair], test_fraction: float = HELD_OUT_FRACTION
) -> tuple[list[Pair], list[Pair]]:
    """``(train, test)``; all pairs sharing a caption land on the same side."""
    train = [p for p in pairs if not is_test_caption(p.caption, test_fraction)]
    test = [p for p in pairs if is_test_caption(p.caption, test_fraction)]
    return train, test
