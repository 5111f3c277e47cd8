"""Streams stage: events, the Faust app and its agent, producer, DLQ, CLI, embedded stack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EmbeddedStack", "PinEvent", "PinProcessor", "Settings"]

if TYPE_CHECKING:
    from streams.events import PinEvent
    from streams.processor import PinProcessor
    from streams.runtime.stack import EmbeddedStack
    from streams.settings import Settings

_LAZY = {
    "EmbeddedStack": "streams.runtime.stack",
    "PinEvent": "streams.events",
    "PinProcessor": "streams.processor",
    "Settings": "streams.settings",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
