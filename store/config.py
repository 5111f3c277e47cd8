"""Settings of the store stage (sections of the project's settings object)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator


class RedisSettings(BaseModel):
    """Redis/Valkey cache. Env prefix ``PINFRESH_REDIS__``."""

    url: str = Field("redis://127.0.0.1:16379/0", description="redis:// or rediss:// URL")
    password: SecretStr | None = Field(None, description="password (kept out of logs)")
    key_prefix: str = Field(
        "pf", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="key namespace root"
    )
    vector_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of cached vectors (little-endian raw bytes)"
    )
    timeout_s: float = Field(2.0, gt=0, description="socket timeout per command")
    tombstone_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, description="how long a delete's version is remembered"
    )
    writer_ttl_s: float = Field(
        60.0, gt=0, description="a writer's claim on a pin (see docs/integration.md, "
        "concurrent writers) counts as abandoned this long after its last renewal; a "
        "writer renews it every quarter of this while its Milvus write runs, and keeps "
        "its release's answer this long",
    )

#: Search parameters an index refuses below the topk: HNSW's ``ef``, DiskANN's
#: ``search_list``; `MilvusStore.search` raises a configured one to the hits it asks for.
TOPK_BOUND_PARAMS = ("ef", "search_list")


class MilvusSettings(BaseModel):
    """Milvus vector store. Env prefix ``PINFRESH_MILVUS__``."""

    uri: str = Field("http://127.0.0.1:19530", description="Milvus gRPC endpoint")
    token: SecretStr | None = Field(None, description="user:password or API token")
    collection_prefix: str = Field("pins", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
    timeout_s: float = Field(10.0, gt=0, description="per-RPC timeout")
    deadline_s: float = Field(
        30.0, gt=0, description="the longest one store call may take, pymilvus's own retries "
        "included; past it the call is an outage (StoreUnavailable). Loads and flushes get "
        "5x this (a restarted server loads its collections)")
    metric: Literal["COSINE", "IP"] = "COSINE"
    keepalive_s: float = Field(
        300.0, gt=0, description="gRPC keepalive ping interval; servers (Milvus Lite) refuse "
        "pings more often than every 5 minutes on idle connections"
    )
    index_type: str = Field(
        "AUTOINDEX", pattern=r"^[A-Z_0-9]{2,32}$",
        description="vector index of a new version's collection: AUTOINDEX (the server "
        "chooses; HNSW on Milvus Lite with faiss), HNSW, IVF_FLAT, FLAT, ...",
    )
    index_params: dict[str, int | float | str] = Field(
        default_factory=dict,
        description='build parameters of that index, as JSON: {"M": 16, '
        '"efConstruction": 200} for HNSW, {"nlist": 1024} for IVF_FLAT',
    )
    search_params: dict[str, int | float | str] = Field(
        default_factory=dict,
        description='search parameters of `similar`, as JSON: {"ef": 64} for HNSW, '
        '{"nprobe": 16} for IVF_FLAT; empty: the index\'s defaults',
    )
    seal_rows: int = Field(
        0, ge=0,
        description="seal (flush) a collection after this many rows upserted by one "
        "process; 0: never, the server seals by itself. On Milvus Lite sealing every 256 "
        "rows halved the write rate and helped search little at 200k rows "
        "(docs/benchmarks.md); it pays only for small collections",
    )

    @field_validator("search_params")
    @classmethod
    def _bounds_are_counts(cls, v: dict[str, int | float | str]) -> dict[str, int | float | str]:
        # `similar` compares these with its topk: a value that is not a positive whole
        # number would fail every search, so it fails at start-up instead
        for key in TOPK_BOUND_PARAMS:
            if key in v:
                try:
                    n = float(v[key])
                except ValueError:
                    n = 0.0
                if n < 1 or n != int(n):
                    raise ValueError(f"search_params.{key} must be a positive whole number, "
                                     f"not {v[key]!r}")
                v[key] = int(n)
        return v


class ApiSettings(BaseModel):
    """The read API. Env prefix ``PINFRESH_API__``."""

    host: str = Field("127.0.0.1", description="bind address (loopback unless configured)")
    port: int = Field(8080, ge=1, le=65535)
    max_batch: int = Field(1000, ge=1, description="most pin ids per batchGet")
    max_k: int = Field(100, ge=1, description="largest k for similar")
    max_body_bytes: int = Field(1 << 20, ge=1024,
                                description="largest request body, checked before parsing")
    read_deadline_s: float = Field(
        3.0, gt=0, le=60, description="a read (batchGet, similar) whose stores have not "
        "answered in this long answers 503 store_unavailable; the API's store calls use it "
        "as their deadline too (the workers keep PINFRESH_MILVUS__DEADLINE_S). /readyz "
        "answers within 2 s")
