"""Every error pinfresh raises on purpose: one tree, sorted by what to do with it.

`encoder` is the lowest of the three packages (`store` and `streams` import
it, it imports neither), so the product's one errors module lives here. It
imports nothing heavy: ``import encoder.errors`` pulls in neither torch nor a
store client.

Three kinds reach the stream, and the processor treats each one way
(``docs/faults.md``):

* `Unavailable` (carries ``retry_after``): an outage of something the
  pipeline depends on: a store down, saturated, read-only or loading, the
  broker, the encoder process or the encoder's device. The stream pauses and
  retries for ever with capped backoff; it never dead-letters for it and
  acknowledges nothing it has not written.
* `Rejected` (carries a `Reason`): this event, image or row is bad. It is
  dead-lettered with that reason and the rest of the batch goes on.
  `TransientRejection` is a rejection worth a few more tries first (an image
  server's timeout or 503): after ``worker.fetch_attempts`` tries it is
  dead-lettered like any rejection.
* Anything else is a bug: the processor isolates the event by bisection and
  dead-letters it as ``internal_error``.

Errors that no stream sees, for the operator, are `ConfigError` (a setting,
a path or an install is wrong: fix it and run again) and `StateError` (the
deployment is in a state the command cannot act on: an unknown or live
version, a coverage gap, a stack that will not start).

Retryability is the class, never a flag or a wrapper: catch `Unavailable`
to wait, `Rejected` to dead-letter. Backends map their own errors onto these
classes at their boundary, by the engine's error code where it has one
(`store.milvus`, `store.redis`). Every message says what happened and what to
do next.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

__all__ = [
    "ApiClientError", "CatalogError", "CheckpointError", "ConfigError", "CoverageError",
    "DeadLetterSendError", "DimensionMismatch", "EncoderUnavailable", "FetchError",
    "ImageError", "KafkaUnavailable", "MalformedEvent", "NoLiveVersion", "PinNotFound",
    "PinfreshError", "Reason", "Rejected", "SettingsError", "StackError", "StateError",
    "StoreRejected", "StoreUnavailable", "TransientFetchError", "TransientRejection",
    "Unavailable", "UnknownVersion", "VersionMismatch",
]


class Reason(StrEnum):
    """Why a pin was dead-lettered: the only form in which reasons travel.

    Stable, machine-readable codes (they appear in dead letters, metrics and
    the integration contract, ``docs/integration.md``); add members, never
    rename them.
    """

    MALFORMED_EVENT = "malformed_event"
    KEY_MISMATCH = "key_mismatch"
    NOT_FOUND = "not_found"
    FETCH_FAILED = "fetch_failed"
    FORBIDDEN_LOCATION = "forbidden_location"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    DECODE_FAILED = "decode_failed"
    TOO_MANY_PIXELS = "too_many_pixels"
    IMAGE_TOO_SMALL = "image_too_small"
    NONFINITE_EMBEDDING = "nonfinite_embedding"
    STORE_REJECTED = "store_rejected"
    INTERNAL_ERROR = "internal_error"


# ------------------------------------------------------------------ the three kinds
class PinfreshError(Exception):
    """Root of every error pinfresh raises on purpose."""


class Unavailable(PinfreshError):
    """Something the pipeline depends on is out; retry after ``retry_after`` seconds.

    Never a reason to dead-letter: the stream pauses and retries for ever.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.retry_after))


class Rejected(PinfreshError):
    """One event, image or row is bad: dead-letter it with ``reason`` and go on."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(reason)  # a typo'd code fails here, where it is made

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable, so a process-pool decoder can send it back
        return (type(self), (self.reason, str(self)))


class TransientRejection(Rejected):
    """A rejection that may pass if tried again soon (a few times, then dead-lettered).

    Attributes:
        retry_after: what the other side asked to wait (seconds), if it said.
    """

    def __init__(self, reason: Reason, message: str, retry_after: float | None = None) -> None:
        super().__init__(reason, message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, str(self), self.retry_after))


class ConfigError(PinfreshError):
    """A setting, a path or an installation is wrong: fix it and run again."""


class StateError(PinfreshError):
    """The deployment is in a state this command cannot act on."""


# ------------------------------------------------------------------------ encoder
class EncoderUnavailable(Unavailable):
    """The encoder process cannot be reached, or the encoder's device failed."""


class ImageError(Rejected):
    """One image cannot be encoded (``not_an_image``, ``decode_failed``, ...)."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, unreadable or does not match its config."""


class VersionMismatch(StateError):
    """A grafted LM's projector was trained on another model version."""


# -------------------------------------------------------------------------- store
class StoreUnavailable(Unavailable):
    """A store is down, saturated, read-only, loading or timed out."""


class StoreRejected(Rejected):
    """A store refused one row for its content (a Milvus parameter or schema error)."""

    def __init__(self, message: str, reason: Reason = Reason.STORE_REJECTED) -> None:
        super().__init__(reason, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.reason))


class DimensionMismatch(StateError):
    """A version's collection or namespace exists with another vector dimension."""


class UnknownVersion(StateError):
    """No such model version in the store."""


class NoLiveVersion(UnknownVersion):
    """No model version is live yet (nothing has been encoded)."""


class PinNotFound(StateError):
    """A pin the request names is not stored in the version read."""

    def __init__(self, pin_id: str, version: str) -> None:
        super().__init__(f"pin {pin_id} not found in version {version}")
        self.pin_id, self.version = pin_id, version


class CoverageError(StateError):
    """A version does not cover the live version's pins; promotion refused."""


class ApiClientError(PinfreshError):
    """The read API answered with an error (``status`` and ``code`` from its envelope)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code = status, code


class ApiUnreachable(Unavailable):
    """The read API gave no answer (refused, reset, timed out)."""


# ------------------------------------------------------------------------ streams
class KafkaUnavailable(Unavailable):
    """The broker cannot be reached."""


class DeadLetterSendError(Unavailable):
    """Dead letters could not all be written; ``sent`` were (do not send them again)."""

    def __init__(self, message: str, sent: Sequence[Any] = (), retry_after: float = 1.0
                 ) -> None:
        super().__init__(message, retry_after)
        self.sent = list(sent)


class MalformedEvent(Rejected):
    """The bytes on the topic are not a valid pin event (or not keyed by their pin id)."""

    def __init__(self, message: str, reason: Reason = Reason.MALFORMED_EVENT) -> None:
        super().__init__(reason, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.reason))


class FetchError(Rejected):
    """An image could not be fetched, for good (not found, forbidden, too large)."""


class TransientFetchError(FetchError, TransientRejection):
    """An image fetch that may work if tried again (timeout, connection error, 429, 5xx)."""

    def __init__(self, reason: Reason, message: str, retry_after: float | None = None) -> None:
        TransientRejection.__init__(self, reason, message, retry_after)


# --------------------------------------------------------------------- operations
class SettingsError(ConfigError):
    """A ``PINFRESH_*`` variable has a value its setting cannot take."""


class CatalogError(ConfigError):
    """A sample catalog cannot be prepared or read."""


class StackError(StateError):
    """The embedded stack could not start or stop."""
