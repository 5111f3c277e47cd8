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


class NoLiveVersion(UnknownVersion):
    """No model version is live yet (nothing has been encoded)."""


class PinNotFound(StoreError):
    """A pin the request names is not stored in the version read."""

    def __init__(self, pin_id: str, version: str) -> None:
        super().__init__(f"pin {pin_id} not found in version {version}")
        self.pin_id, self.version = pin_id, version
