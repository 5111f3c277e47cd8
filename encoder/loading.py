"""Build the encoder a process runs from its settings: the model, or the null stub.

(A feeder's `encoder.remote.RemoteEncoder` needs an event loop to connect and
is built by the stream worker itself.)
"""

from __future__ import annotations

from encoder.config import EncoderSettings
from encoder.engine import ImageEncoder
from encoder.null import NULL_MODEL, NullEncoder


def load_encoder(settings: EncoderSettings) -> ImageEncoder | NullEncoder:
    """`NullEncoder` for ``model = "null"``, else `ImageEncoder.load` (see there for errors)."""
    if settings.model == NULL_MODEL:
        return NullEncoder()
    return ImageEncoder.load(settings)
