"""The one settings object, built once at the entry point and passed down.

Environment variables use the prefix ``PINFRESH_`` and ``__`` for nesting,
e.g. ``PINFRESH_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or
``PINFRESH_ENCODER__CHECKPOINT=/models/v3``. A ``.env`` file in the working
directory is read too. Secrets are `SecretStr` and print masked.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from encoder.config import EncoderSettings
from encoder.errors import SettingsError
from store.config import ApiSettings, MilvusSettings, RedisSettings


class FetchSettings(BaseModel):
    """Image fetching. Env prefix ``PINFRESH_FETCH__``."""

    max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest image body accepted")
    timeout_s: float = Field(10.0, gt=0, description="time limit for one fetch, all hops")
    max_redirects: int = Field(3, ge=0, le=10)
    catalog_root: Path | None = Field(None, description="file paths are allowed only under here")
    allow_private_networks: bool = Field(
        False, description="allow loopback/private/link-local targets (never in production)"
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="host names allowed even if they resolve privately"
    )
    user_agent: str = "pinfresh/0.1"
    max_connections: int = Field(64, ge=1, description="HTTP connections kept per worker")


class StackSettings(BaseModel):
    """Embedded stack. Env prefix ``PINFRESH_STACK__``; a port of 0 picks a free one."""

    data_dir: Path = Field(Path("data"), description="root of all embedded service data")
    host: str = Field("127.0.0.1", description="bind address (loopback unless you mean it)")
    kafka_port: int = Field(19092, ge=0, le=65535)
    kafka_log: Literal["disk", "memory"] = Field(
        "disk",
        description="disk: the broker's log (records, high watermarks, consumer groups' "
        "offsets) is files under <data_dir>/kafka, kept across broker restarts; memory: "
        "Tansu's in-memory engine, lost whenever the broker stops",
    )
    kafka_fsync: bool = Field(
        True, description="disk log: every write (record batch, watermark, committed "
        "offsets) is synced to disk, with its folder, before the broker is answered; false: "
        "a power cut can lose what the OS had not written yet")
    kafka_retention_hours: float = Field(
        168.0, gt=0, description="disk log: record batches older than this are removed once "
        "every consumer group has committed past them (docs/operations.md)")
    kafka_retention_mb: float = Field(
        1024.0, gt=0, description="disk log: the most a partition keeps; past it the oldest "
        "batches go even if a group has not read them (logged, shown by status)")
    kafka_retention_batches: int = Field(
        200_000, ge=100, description="disk log: the most record batches a partition keeps "
        "(the broker lists all of them on each fetch); past it, as past the size")
    redis_port: int = Field(16379, ge=0, le=65535)
    redis_cluster: int = Field(
        0, ge=0, le=16,
        description="0: one Valkey node; N: a Valkey Cluster of N masters (no replicas) on "
        "redis_port, redis_port+1, ... (bus ports +10000), reached as redis+cluster://",
    )
    milvus_port: int = Field(19530, ge=0, le=65535)
    milvus: Literal["server", "lite"] = Field(
        "server",
        description="server: a real Milvus standalone server (the `milvus` wheel) in a "
        "private network namespace, reachable on milvus_port only; lite: Milvus Lite, a "
        "Python reimplementation, for machines where the server cannot run (it accepts "
        "what a server refuses and scans every row per search)",
    )
    start_timeout_s: float = Field(
        180.0, gt=0, description="how long each service may take to answer after a start "
        "(a Milvus server loads every collection and answers a search first)")
    stop_timeout_s: float = Field(
        10.0, gt=0, description="SIGTERM grace before SIGKILL at `down` (a Milvus server "
        "that does not stop in time is killed; its WAL keeps the data)")
    supervise: bool = Field(
        True, description="run a supervisor beside the stack that starts a service that "
        "exits again, with backoff, and counts it (`pinfresh status`)")


class StackAddresses(Protocol):
    """Where a running embedded stack listens (`streams.runtime.stack.StackInfo`)."""

    @property
    def kafka_bootstrap(self) -> str:
        """``host:port`` of the broker."""
        ...

    @property
    def redis_url(self) -> str:
        """URL of Valkey."""
        ...

    @property
    def milvus_uri(self) -> str:
        """URI of the Milvus server."""
        ...


@dataclass(frozen=True)
class DataPaths:
    """The layout of the data dir (``PINFRESH_STACK__DATA_DIR``, default ``data``)."""

    root: Path

    def catalog(self, name: str) -> Path:
        """A sample catalog's JSONL (``tuxpaint``, ``emoji``)."""
        return self.root / "catalog" / f"{name}.jsonl"

    @property
    def features(self) -> Path:
        """Cache of frozen-tower features for training."""
        return self.root / "cache" / "features"

    @property
    def models(self) -> Path:
        """Trained checkpoints and projectors."""
        return self.root / "models"

    def graft(self, version: str) -> Path:
        """The grafted LM's projector for a model version."""
        return self.models / f"graft-{version}"

    @property
    def workers(self) -> Path:
        """Pid files of running workers."""
        return self.root / "workers"

    @property
    def logs(self) -> Path:
        """Logs of processes pinfresh starts."""
        return self.root / "logs"

    @property
    def run(self) -> Path:
        """Sockets of encoder processes."""
        return self.root / "run"


class KafkaSettings(BaseModel):
    """Kafka (or any Kafka-protocol broker). Env prefix ``PINFRESH_KAFKA__``."""

    bootstrap_servers: str = Field("127.0.0.1:19092", description="comma-separated host:port")
    topic: str = Field("pins", description="pin events, keyed by pin id")
    dlq_topic: str = Field("pins.dlq", description="dead letters")
    partitions: int = Field(
        64, ge=1,
        description="partitions of a newly created topic: the most consumers (feeders) that can "
        "share it, for the topic's life on brokers that cannot add partitions (Tansu); 64 = "
        "four 16-core GPU hosts at 14 feeders each, with room (docs/capacity.md)",
    )
    replication_factor: int = Field(1, ge=1)
    group_id: str = Field("pinfresh-workers", description="consumer group of the workers")
    rebalance_timeout_s: float = Field(
        3.0, gt=0, description="short for the embedded broker, which needs it to finish joins"
    )
    session_timeout_s: float = Field(10.0, gt=0)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    commit_interval_s: float = Field(1.0, gt=0, description="how often acked offsets commit")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = Field(None, description="CA bundle for SSL/SASL_SSL")


class WorkerSettings(BaseModel):
    """Stream workers. Env prefix ``PINFRESH_WORKER__``."""

    batch_size: int = Field(32, ge=1, le=4096, description="max events per micro-batch")
    batch_wait_s: float = Field(0.25, gt=0, description="max wait to fill a micro-batch")
    fetch_concurrency: int = Field(16, ge=1, description="images fetched at once per worker")
    batches_in_flight: int = Field(
        2, ge=1, le=8, description="micro-batches processed at once (acknowledged in order; "
        "a batch sharing a pin with one in flight waits for it)"
    )
    fetch_attempts: int = Field(3, ge=1, description="tries for a transient fetch error")
    retry_backoff_s: float = Field(0.2, gt=0, description="first backoff; doubles per retry")
    retry_backoff_max_s: float = Field(10.0, gt=0)
    drain_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM, time to finish the in-flight batch (keep below "
        "the orchestrator's termination grace period)"
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 = off")
    progress_interval_s: float = Field(
        10.0, gt=0, description="how often a worker reports its partitions' committed offsets "
        "and lag (Redis, for `status`; Prometheus gauges)")
    state_dir: Path | None = Field(
        None, description="Faust's state folder; default <stack data dir>/faust (never the "
        "working directory)"
    )
    metrics_host: str = "127.0.0.1"
    version_release_s: float = Field(
        60.0, ge=0, description="a refresh's version that left the write set (retired) has "
        "its encoder released after this long: closed here, unloaded by the encoder process "
        "when no feeder writes it")
    unassigned_stall_s: float = Field(
        60.0, gt=0, description="a worker that holds no partition this long while partitions "
        "with lag have no live worker logs it, shows it in `status` and fails /healthz "
        "(its consumer group does not finish its join)")
    liveness_stall_s: float = Field(
        900.0, gt=0, description="the metrics port's /healthz answers 503 (the pod's liveness "
        "probe restarts the worker) when a held partition with lag has not moved for this "
        "long (not while the stream waits out an outage), or the progress loop stopped for "
        "3 intervals + 60 s")
    internal_error_attempts: int = Field(
        3, ge=1, le=20, description="tries for an event that raises an unexpected error "
        "(isolated from its batch first) before it is dead-lettered as internal_error"
    )


class Settings(BaseSettings):
    """Everything configurable, one section per concern."""

    model_config = SettingsConfigDict(
        env_prefix="PINFRESH_", env_nested_delimiter="__", env_file=".env", extra="ignore",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    stack: StackSettings = Field(default_factory=StackSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    log_json: bool = Field(False, description="JSON log lines")
    log_level: str = "INFO"

    @property
    def paths(self) -> DataPaths:
        """Every place under the data dir, named once."""
        return DataPaths(self.stack.data_dir.resolve())

    def worker_state_dir(self) -> Path:
        """Where Faust keeps its per-app state folder."""
        return (self.worker.state_dir or self.paths.root / "faust").resolve()

    def with_stack(self, info: StackAddresses) -> Settings:
        """Return a copy pointing Kafka, Redis and Milvus at a running embedded stack."""
        return self.model_copy(
            update={
                "kafka": self.kafka.model_copy(
                    update={"bootstrap_servers": info.kafka_bootstrap}
                ),
                "redis": self.redis.model_copy(update={"url": info.redis_url}),
                "milvus": self.milvus.model_copy(update={"uri": info.milvus_uri}),
            }
        )

    def masked(self) -> dict[str, Any]:
        """JSON-ready dump with secrets shown as ``**********``."""
        return json.loads(self.model_dump_json())

    def to_env(self) -> dict[str, str]:
        """Environment variables from which a child process builds these same settings.

        Generated from the model, so every field travels (a round-trip test
        covers each one); a field that is None is left out (every optional
        setting defaults to None). Secrets are included unmasked: pass this only
        as a process environment, never on a command line or to a log. See
        `child_environ` for the whole environment of a child.
        """
        return {name: _env_value(value) for name, value in _leaves(self) if value is not None}

    def child_environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (usually ``os.environ``) without its ``PINFRESH_*`` variables, plus `to_env`.

        So a child builds exactly these settings, not a mix with whatever the
        parent's environment held.
        """
        return {**{k: v for k, v in base.items() if not k.upper().startswith(ENV_PREFIX)},
                **self.to_env()}


ENV_PREFIX = "PINFRESH_"


def _leaves(model: BaseModel, prefix: str = ENV_PREFIX) -> Iterator[tuple[str, Any]]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        env = f"{prefix}{name.upper()}"
        if isinstance(value, BaseModel):
            yield from _leaves(value, env + "__")
        else:
            yield env, value


def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def env_names() -> list[str]:
    """Every ``PINFRESH_*`` variable the settings read (one per leaf field)."""
    return [name for name, _ in _leaves(Settings())]


def build_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """`Settings` from the environment and ``.env``, with errors as one clear line.

    Raises:
        SettingsError: naming the variable, the value and what is expected.
    """
    try:
        return Settings()
    except PydanticSettingsError as exc:
        # a list or dict setting whose value is not JSON: pydantic-settings names
        # only the section, so find the variable by parsing each complex one
        env = environ if environ is not None else {}
        raise SettingsError("bad setting: " + _json_problem(env, str(exc))) from None
    except ValidationError as exc:
        env = environ if environ is not None else {}
        problems = []
        for err in exc.errors():
            name = ENV_PREFIX + "__".join(str(p).upper() for p in err["loc"])
            shown = env.get(name, err.get("input"))
            if "PASSWORD" in name or "TOKEN" in name:
                shown = "**********"
            problems.append(f"{name}={shown!r}: {err['msg']}")
        raise SettingsError("bad setting: " + "; ".join(problems)) from None


def _json_problem(env: Mapping[str, str], fallback: str) -> str:
    """``NAME='value': expected JSON ...`` for the first list/dict setting that is not JSON."""
    values = {k.upper(): v for k, v in env.items()}
    dotenv = Path(".env")
    if dotenv.is_file():
        from dotenv import dotenv_values

        values = {**{k.upper(): v for k, v in dotenv_values(dotenv).items() if v is not None},
                  **values}
    for name, default in _leaves(Settings.model_construct()):
        if not isinstance(default, list | dict) or name not in values:
            continue
        try:
            json.loads(values[name])
        except ValueError:
            example = '["a.example", "b.example"]' if isinstance(default, list) else '{"M": 16}'
            kind = "a list" if isinstance(default, list) else "an object"
            return (f"{name}={values[name]!r}: expected JSON ({kind}, e.g. "
                    f"{name}='{example}')")
    return fallback


def unknown_env(names: list[str]) -> list[tuple[str, str | None]]:
    """``PINFRESH_*`` names that no setting reads, each with the closest real one."""
    known = set(env_names())
    sections = {f"{ENV_PREFIX}{n.upper()}" for n, f in Settings.model_fields.items()}
    out = []
    for name in sorted(n for n in names if n.upper().startswith(ENV_PREFIX)):
        if name.upper() in known or name.upper() in sections:
            continue
        # compare without the shared prefix, which would make everything look close
        tails = {k.removeprefix(ENV_PREFIX): k for k in known}
        tail = name.upper().removeprefix(ENV_PREFIX)
        close = difflib.get_close_matches(tail, tails, n=1, cutoff=0.75)
        if not close:
            # a field without its section (PINFRESH_DATA_DIR): match the field's own name
            fields: dict[str, list[str]] = {}
            for k in tails:
                fields.setdefault(k.rsplit("__", 1)[-1], []).append(k)
            near = difflib.get_close_matches(tail.rsplit("__", 1)[-1], fields, n=1, cutoff=0.85)
            close = fields[near[0]] if near else []
        # a field several sections have (TIMEOUT_S): every candidate, not one at random
        out.append((name, " or ".join(tails[c] for c in sorted(close)) if close else None))
    return out
