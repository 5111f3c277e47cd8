"""Store stage: Milvus and Redis backends behind one interface, and the reader.

Backends are imported lazily so `import store` stays cheap and pulls in
neither pymilvus nor redis until used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EmbeddingReader", "EmbeddingRecord", "MilvusStore", "RedisCache"]

if TYPE_CHECKING:
    from store.base import EmbeddingRecord
    from store.milvus import MilvusStore
    from store.reader import EmbeddingReader
    from store.redis import RedisCache

_LAZY = {
    "EmbeddingReader": "store.reader",
    "EmbeddingRecord": "store.base",
    "MilvusStore": "store.milvus",
    "RedisCache": "store.redis",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
