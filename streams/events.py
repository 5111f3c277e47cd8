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
import json
import time
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from encoder.errors import PinfreshError

#: Pin ids: 1-128 characters of ``[A-Za-z0-9._:-]``, starting alphanumeric.
PIN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
MAX_EVENT_BYTES = 64 * 1024


class Reason(StrEnum):
    """Reason codes carried by dead letters."""

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


class MalformedEvent(PinfreshError):
    """The bytes on the topic are not a valid pin event."""


class PinEvent(BaseModel):
    """A validated change to one pin."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    op: Literal["upsert", "delete"]
    pin_id: str = Field(pattern=PIN_ID_PATTERN)
    version: int = Field(ge=0, le=2**62)
    image: str | None = Field(None, min_length=1, max_length=4096)
    caption: str = Field("", max_length=4000)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=64)
    event_time: float = Field(gt=0)
    reencode: bool = Field(
        False, description="re-fetch and re-encode even if this version is stored "
        "(`pinfresh stale --requeue`); never overrides a newer version"
    )

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
    """A message the pipeline gave up on, with everything needed to replay it."""

    model_config = ConfigDict(frozen=True)

    reason: Reason
    error: str
    attempts: int = 1
    pin_id: str | None = None
    original: str = Field(description="the original message value (UTF-8, or base64: prefix)")
    failed_at: float = Field(default_factory=time.time)
    worker: str = ""

    @staticmethod
    def encode_original(raw: bytes | None) -> str:
        """Keep the original bytes printable: UTF-8 as is, anything else as base64."""
        if raw is None:
            return ""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(raw).decode()

    def original_bytes(self) -> bytes:
        """Inverse of `encode_original`, for replay."""
        if self.original.startswith("base64:"):
            return base64.b64decode(self.original[len("base64:") :])
        return self.original.encode("utf-8")
