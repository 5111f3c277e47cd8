"""Encoder stage: open_clip model factory, checkpoints, preprocessing, staged inference.

Re-exports are lazy so that ``import encoder.errors`` (used by `store`) does
not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EncoderSettings", "ImageEncoder", "ImageError", "PinfreshError"]

if TYPE_CHECKING:
    from encoder.config import EncoderSettings
    from encoder.engine import ImageEncoder
    from encoder.errors import ImageError, PinfreshError

_LAZY = {
    "EncoderSettings": "encoder.config",
    "ImageEncoder": "encoder.engine",
    "ImageError": "encoder.errors",
    "PinfreshError": "encoder.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
