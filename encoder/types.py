"""Light types of the encoder stage: importable without torch or open_clip.

Feeder workers (`encoder.remote`) and the null encoder use only these, so a
feeder process never loads the model stack (seconds of start-up and about a
gigabyte of memory each).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from encoder.errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: What encoding one image gives: an L2-normalised float32 vector, or why not.
EncodeResult = np.ndarray | ImageError


@dataclass(frozen=True)
class EncoderInfo:
    """What the store needs to know about an encoder."""

    version: str
    dim: int
    model: str
    checkpoint: str | None
    preprocess: dict[str, object]


@dataclass(frozen=True)
class PreprocessSpec:
    """How image bytes become the tower's input; part of the model version.

    Images are decoded with PIL, transparent pixels composited over
    ``background``, the shortest side resized to ``image_size`` (bicubic) and
    the centre cropped to a square, then normalised with ``mean``/``std``.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "shortest_side_bicubic_center_crop"
    background: tuple[int, int, int] = (255, 255, 255)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description (stored in checkpoints and versions)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        """Inverse of `to_dict`."""
        return cls(
            image_size=int(data["image_size"]),
            mean=tuple(data["mean"]),  # type: ignore[arg-type]
            std=tuple(data["std"]),  # type: ignore[arg-type]
            resize=str(data.get("resize", cls.resize)),
            background=tuple(data.get("background", cls.background)),  # type: ignore[arg-type]
        )
