"""The project's exception root and the encoder stage's errors.

`PinfreshError` lives here because `encoder` is the lowest layer: `store` and
`streams` import it from here, and `encoder` imports neither of them.
"""

from __future__ import annotations


class PinfreshError(Exception):
    """Root of every error pinfresh raises on purpose.

    Messages say what happened and what to do next.
    """


class EncoderError(PinfreshError):
    """The encoder stage failed (model build, checkpoint, inference)."""


class CheckpointError(EncoderError):
    """A checkpoint is missing, unreadable or does not match its config."""


class ImageError(EncoderError):
    """One image cannot be encoded; permanent for that image.

    Attributes:
        reason: a stable, machine-readable reason code used in dead letters
            (``not_an_image``, ``decode_failed``, ``too_many_pixels``,
            ``image_too_small``, ``nonfinite_embedding``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        # picklable, so a process-pool decoder can send it back
        return (type(self), (self.reason, str(self)))
