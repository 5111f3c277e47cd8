"""Pin events (the ``pins`` topic) and dead letters (the ``pins.dlq`` topic).

Wire format: one JSON object per Kafka message, keyed by pin id (UTF-8), so
every event of a pin lands on one partition and is seen in order::

    {"op": "upsert", "pin_id": "tux-animals-frog", "version": 3,
     "image": "https://img.example/frog.jpg", "caption": "A frog.",
     "metadata": {"board": "animals"}, "event_time": 1764100000.25}

``version`` is the per-pin version, increasing with every change of that pin;
``event_time`` is epoch seconds when the change happened (freshness is
measured from it). Deletes need only ``op``, ``pin_id``, ``version`` and
``event_time``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from encoder.errors import MalformedEvent, PinfreshError, Reason

__all__ = ["DeadLetter", "MalformedEvent", "PinEvent", "Reason", "parse_event"]

#: Pin ids: 1-128 characters of ``[A-Za-z0-9._:-]``, starting alphanumeric.
PIN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
#: Longest image location, in UTF-8 bytes (what Milvus's VARCHAR counts).
MAX_IMAGE_BYTES = 4096
#: Longest caption, in characters (at most 16,000 UTF-8 bytes: stored whole).
MAX_CAPTION_CHARS = 4000
#: Largest event value accepted; bigger ones are dead-lettered as malformed.
MAX_EVENT_BYTES = 64 * 1024
#: ``event_time`` at or above this is taken for milliseconds (it is the year 5138 in seconds).
EVENT_TIME_MS_THRESHOLD = 1e11
#: How far ``event_time`` may lie in the future (producer clock skew), in seconds.
MAX_EVENT_TIME_SKEW_S = 3600.0
#: A dead letter keeps at most this many bytes of the original message value
#: (every valid event fits whole; longer values keep a prefix, their length and sha256).
MAX_ORIGINAL_BYTES = MAX_EVENT_BYTES
#: Longest error text and traceback a dead letter carries.
MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 8000


class PinEvent(BaseModel):
    """A validated change to one pin."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    op: Literal["upsert", "delete"]
    pin_id: str = Field(pattern=PIN_ID_PATTERN)
    version: int = Field(ge=0, le=2**62)
    image: str | None = Field(None, min_length=1, description=f"at most {MAX_IMAGE_BYTES} "
                              "UTF-8 bytes")
    caption: str = Field("", max_length=MAX_CAPTION_CHARS)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=64)
    event_time: float = Field(gt=0, description="epoch seconds of the change")
    reencode: bool = Field(
        False, description="re-fetch and re-encode even if this version is stored "
        "(`pinfresh stale --requeue`); never overrides a newer version"
    )

    @field_validator("image")
    @classmethod
    def _location_bytes(cls, v: str | None) -> str | None:
        if v is not None and len(v.encode()) > MAX_IMAGE_BYTES:
            raise ValueError(f"image location is {len(v.encode())} UTF-8 bytes, over the "
                             f"{MAX_IMAGE_BYTES}-byte limit")
        return v

    @field_validator("event_time")
    @classmethod
    def _seconds_not_ms(cls, v: float) -> float:
        if v >= EVENT_TIME_MS_THRESHOLD:
            raise ValueError(f"{v:.0f} looks like milliseconds: event_time is epoch seconds")
        if v > time.time() + MAX_EVENT_TIME_SKEW_S:
            raise ValueError(f"{v:.0f} is more than {MAX_EVENT_TIME_SKEW_S:.0f}s in the future "
                             "(event_time is epoch seconds of the change)")
        return v

    @model_validator(mode="after")
    def _upsert_has_image(self) -> PinEvent:
        if self.op == "upsert" and not self.image:
            raise ValueError("an upsert needs 'image' (a file path or an http(s) URL)")
        return self

    def to_bytes(self) -> bytes:
        """Serialise for the topic."""
        return self.model_dump_json(exclude_none=True, exclude_defaults=False).encode()

    @classmethod
    def upsert(
        cls, pin_id: str, image: str, version: int, caption: str = "",
        metadata: dict[str, Any] | None = None, event_time: float | None = None,
    ) -> PinEvent:
        """Build an upsert event stamped with the current time unless given."""
        return cls(
            op="upsert", pin_id=pin_id, image=image, version=version, caption=caption,
            metadata=metadata or {}, event_time=event_time or time.time(),
        )

    @classmethod
    def delete(cls, pin_id: str, version: int, event_time: float | None = None) -> PinEvent:
        """Build a delete event stamped with the current time unless given."""
        return cls(op="delete", pin_id=pin_id, version=version,
                   event_time=event_time or time.time())


def parse_event(raw: bytes | None) -> PinEvent:
    """Validate one message value.

    Raises:
        MalformedEvent: with a one-line explanation of what is wrong.
    """
    if raw is None:
        raise MalformedEvent("message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise MalformedEvent(f"event is {len(raw)} bytes, over the {MAX_EVENT_BYTES} limit")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedEvent(f"event must be a JSON object, got {type(data).__name__}")
    try:
        return PinEvent.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'event'}: {e['msg']}" for e in exc.errors()
        )
        raise MalformedEvent(problems) from exc


def guess_pin_id(raw: bytes | None, key: bytes | None = None) -> str | None:
    """Best-effort pin id of a message that failed validation (for the DLQ key)."""
    if key:
        try:
            return key.decode()[:128]
        except UnicodeDecodeError:
            pass
    try:
        data = json.loads(raw or b"")
        pid = data.get("pin_id") if isinstance(data, dict) else None
        return str(pid)[:128] if pid is not None else None
    except (ValueError, UnicodeDecodeError):
        return None


class DeadLetter(BaseModel):
    """A message the pipeline gave up on, with what is needed to replay it.

    Bounded in size whatever the input: ``original`` holds at most
    `MAX_ORIGINAL_BYTES` of the message value (every valid event fits whole),
    ``original_size`` and ``original_sha256`` describe the whole value, and
    ``original_truncated`` says whether the prefix is all there is.
    """

    model_config = ConfigDict(frozen=True)

    reason: Reason
    error: str
    attempts: int = 1
    pin_id: str | None = None
    original: str = Field(description="the original message value (UTF-8, or base64: prefix), "
                          f"at most {MAX_ORIGINAL_BYTES} bytes of it")
    original_size: int = Field(0, description="length of the whole original value in bytes")
    original_sha256: str = Field("", description="sha256 of the whole original value")
    original_truncated: bool = False
    traceback: str | None = Field(None, description="for internal_error: where it was raised")
    failed_at: float = Field(default_factory=time.time)
    worker: str = ""

    @classmethod
    def build(
        cls, reason: Reason, error: str, raw: bytes | None, *, pin_id: str | None = None,
        attempts: int = 1, worker: str = "", traceback: str | None = None,
    ) -> DeadLetter:
        """A dead letter for ``raw`` with every field bounded (see the class docstring)."""
        raw = raw or b""
        kept = raw[:MAX_ORIGINAL_BYTES]
        return cls(
            reason=reason, error=error[:MAX_ERROR_CHARS], attempts=attempts,
            pin_id=pin_id[:128] if pin_id else None, original=cls.encode_original(kept),
            original_size=len(raw), original_sha256=hashlib.sha256(raw).hexdigest(),
            original_truncated=len(raw) > len(kept), worker=worker,
            traceback=traceback[-MAX_TRACEBACK_CHARS:] if traceback else None,
        )

    @property
    def fingerprint(self) -> str:
        """Same for two letters about the same message and reason (retry dedupe)."""
        return f"{self.reason.value}:{self.pin_id}:{self.original_sha256 or self.original}"

    @staticmethod
    def encode_original(raw: bytes | None) -> str:
        """Keep the original bytes printable: UTF-8 as is, anything else as base64."""
        if raw is None:
            return ""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(raw).decode()

    @property
    def replayable(self) -> bool:
        """Whether the whole original is kept (a truncated one cannot be replayed)."""
        return not self.original_truncated

    def original_bytes(self) -> bytes:
        """Inverse of `encode_original`, for replay.

        Raises:
            PinfreshError: the letter keeps only a prefix of the original.
        """
        if self.original_truncated:
            raise PinfreshError(
                f"dead letter of {self.pin_id}: only {MAX_ORIGINAL_BYTES} of "
                f"{self.original_size} bytes kept, cannot replay (republish the pin instead)")
        if self.original.startswith("base64:"):
            return base64.b64decode(self.original[len("base64:") :])
        return self.original.encode("utf-8")
