"""The project's exception root and the encoder stage's errors.

`PinfreshError` lives here because `encoder` is the lowest layer: `store` and
`streams` import it from here, and `encoder` imports neither of them.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a pin was dead-lettered: the only form in which reasons travel.

    Stable, machine-readable codes (they appear in dead letters, metrics and
    the integration contract, ``docs/integration.md``); add members, never
    rename them.
    """

    MALFORMED_EVENT = "malformed_event"
    NOT_FOUND = "not_found"
    FETCH_FAILED = "fetch_failed"
    FORBIDDEN_LOCATION = "forbidden_location"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    DECODE_FAILED = "decode_failed"
    TOO_MANY_PIXELS = "too_many_pixels"
    IMAGE_TOO_SMALL = "image_too_small"
    NONFINITE_EMBEDDING = "nonfinite_embedding"
    INTERNAL_ERROR = "internal_error"


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
        reason: the dead-letter `Reason` (``not_an_image``, ``decode_failed``,
            ``too_many_pixels``, ``image_too_small``, ``nonfinite_embedding``).
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(reason)  # a typo'd code fails here, where it is made

    def __reduce__(self) -> tuple[type[ImageError], tuple[Reason, str]]:
        # picklable, so a process-pool decoder can send it back
        return (type(self), (self.reason, str(self)))


class EncoderUnavailable(EncoderError):
    """The encoder process cannot be reached; retry after ``retry_after`` seconds.

    An outage, like a store's `StoreUnavailable`: the stream pauses and
    retries, and acknowledges nothing it has not written.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
