"""Errors of the store stage."""

from __future__ import annotations

from encoder.errors import PinfreshError


class StoreError(PinfreshError):
    """A store operation failed for a reason that retrying will not fix."""


class StoreUnavailable(StoreError):
    """A backend is down, saturated or timed out; retry after ``retry_after`` seconds.

    The stream pauses and retries on this error instead of dropping events.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DimensionMismatch(StoreError):
    """A version's collection exists with another vector dimension."""


class UnknownVersion(StoreError):
    """No such model version in the store."""
