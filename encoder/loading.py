"""Build the encoder a process runs from its settings: the model, or the null stub.

(A feeder's `encoder.remote.RemoteEncoder` needs an event loop to connect and
is built by the stream worker itself.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from encoder.config import EncoderSettings
from encoder.null import NULL_MODEL, NullEncoder

if TYPE_CHECKING:
    from encoder.engine import ImageEncoder


def load_encoder(settings: EncoderSettings) -> ImageEncoder | NullEncoder:
    """`NullEncoder` for ``model = "null"``, else `ImageEncoder.load` (see there for errors).

    torch and open_clip are imported only in the second case.
    """
    if settings.model == NULL_MODEL:
        return NullEncoder(seed=settings.seed)
    from encoder.engine import ImageEncoder

    return ImageEncoder.load(settings)
