"""Process plumbing shared by the CLI, the demo, the benchmark and the tests.

* `load_settings` builds the one settings object and, when an embedded stack
  is recorded in the data dir, points every address that the environment does
  not set explicitly at it;
* `spawn_worker` starts ``pinfresh worker`` as a detached process with a pid
  file, so ``pinfresh down`` can stop it;
* `wait_readable` polls Redis until given pins are readable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from store.errors import StoreUnavailable
from store.redis import RedisCache
from streams.events import DeadLetter
from streams.settings import KafkaSettings, Settings
from streams.stack import EmbeddedStack

logger = logging.getLogger(__name__)

_ADDRESS_ENV = {
    "kafka": "PINFRESH_KAFKA__BOOTSTRAP_SERVERS",
    "redis": "PINFRESH_REDIS__URL",
    "milvus": "PINFRESH_MILVUS__URI",
}


def load_settings() -> Settings:
    """Settings from the environment, pointed at a running embedded stack if there is one."""
    settings = Settings()
    info = EmbeddedStack(settings.stack).read()
    if info is None:
        return settings
    update: dict[str, Any] = {}
    if _ADDRESS_ENV["kafka"] not in os.environ:
        update["kafka"] = settings.kafka.model_copy(
            update={"bootstrap_servers": info.kafka_bootstrap})
    if _ADDRESS_ENV["redis"] not in os.environ:
        update["redis"] = settings.redis.model_copy(update={"url": info.redis_url})
    if _ADDRESS_ENV["milvus"] not in os.environ:
        update["milvus"] = settings.milvus.model_copy(update={"uri": info.milvus_uri})
    return settings.model_copy(update=update)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that make a child process build the same settings."""
    s = settings
    env = {
        "PINFRESH_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
        "PINFRESH_KAFKA__TOPIC": s.kafka.topic,
        "PINFRESH_KAFKA__DLQ_TOPIC": s.kafka.dlq_topic,
        "PINFRESH_KAFKA__GROUP_ID": s.kafka.group_id,
        "PINFRESH_KAFKA__PARTITIONS": str(s.kafka.partitions),
        "PINFRESH_REDIS__URL": s.redis.url,
        "PINFRESH_REDIS__KEY_PREFIX": s.redis.key_prefix,
        "PINFRESH_MILVUS__URI": s.milvus.uri,
        "PINFRESH_MILVUS__COLLECTION_PREFIX": s.milvus.collection_prefix,
        "PINFRESH_ENCODER__MODEL": s.encoder.model,
        "PINFRESH_ENCODER__BATCH_SIZE": str(s.encoder.batch_size),
        "PINFRESH_ENCODER__DEVICE": s.encoder.device,
        "PINFRESH_ENCODER__PREPARE": s.encoder.prepare,
        "PINFRESH_ENCODER__PREPARE_POOL": s.encoder.prepare_pool,
        "PINFRESH_ENCODER__MAX_WAIT_S": str(s.encoder.max_wait_s),
        "PINFRESH_WORKER__BATCH_SIZE": str(s.worker.batch_size),
        "PINFRESH_WORKER__BATCH_WAIT_S": str(s.worker.batch_wait_s),
        "PINFRESH_WORKER__METRICS_PORT": str(s.worker.metrics_port),
        "PINFRESH_WORKER__FETCH_ATTEMPTS": str(s.worker.fetch_attempts),
        "PINFRESH_WORKER__RETRY_BACKOFF_S": str(s.worker.retry_backoff_s),
        "PINFRESH_WORKER__RETRY_BACKOFF_MAX_S": str(s.worker.retry_backoff_max_s),
        "PINFRESH_WORKER__FAULT_CRASH_AT": s.worker.fault_crash_at,
        "PINFRESH_FETCH__ALLOWED_HOSTS": json.dumps(s.fetch.allowed_hosts),
        "PINFRESH_FETCH__MAX_BYTES": str(s.fetch.max_bytes),
        "PINFRESH_FETCH__ALLOW_PRIVATE_NETWORKS": str(s.fetch.allow_private_networks).lower(),
        "PINFRESH_FETCH__TIMEOUT_S": str(s.fetch.timeout_s),
        "PINFRESH_STACK__DATA_DIR": str(s.stack.data_dir),
        "PINFRESH_LOG_LEVEL": s.log_level,
    }
    if s.encoder.checkpoint:
        env["PINFRESH_ENCODER__CHECKPOINT"] = str(s.encoder.checkpoint)
    if s.fetch.catalog_root:
        env["PINFRESH_FETCH__CATALOG_ROOT"] = str(s.fetch.catalog_root)
    if s.redis.password:
        env["PINFRESH_REDIS__PASSWORD"] = s.redis.password.get_secret_value()
    return env


def workers_dir(settings: Settings) -> Path:
    """Where worker pid files live."""
    return settings.stack.data_dir.resolve() / "workers"


def spawn_worker(settings: Settings, name: str, log_path: Path | None = None
                 ) -> subprocess.Popen[bytes]:
    """Start ``pinfresh worker`` in its own session with a pid file; returns the process."""
    wdir = workers_dir(settings)
    wdir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or settings.stack.data_dir.resolve() / "logs" / f"worker-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings_env(settings)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
    (wdir / f"{name}.pid").write_text(str(proc.pid))
    return proc


def stop_workers(settings: Settings, timeout: float = 15.0) -> int:
    """SIGTERM every recorded worker (SIGKILL after ``timeout``); returns how many."""
    wdir = workers_dir(settings)
    n = 0
    for pid_file in sorted(wdir.glob("*.pid")) if wdir.is_dir() else []:
        try:
            pid = int(pid_file.read_text().strip())
        except ValueError:
            pid_file.unlink(missing_ok=True)
            continue
        if stop_pid(pid, timeout):
            n += 1
        pid_file.unlink(missing_ok=True)
    return n


def stop_pid(pid: int, timeout: float = 15.0) -> bool:
    """SIGTERM, wait, then SIGKILL one process. Returns whether it was running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return True
        except ChildProcessError:
            pass
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


async def wait_readable(
    cache: RedisCache, pin_ids: Sequence[str], timeout_s: float, *, version: str | None = None,
    min_pin_version: int | None = None, progress: bool = False, poll_s: float = 0.2,
) -> dict[str, dict[str, str]]:
    """Poll Redis until every pin has a vector (at ``min_pin_version`` or newer).

    Returns the metadata hashes of the pins readable when it stopped (all of
    them, unless the timeout passed).
    """
    from tqdm import tqdm

    deadline = time.monotonic() + timeout_s
    bar = tqdm(total=len(pin_ids), unit="pin", desc="readable", disable=not progress)
    meta: dict[str, dict[str, str]] = {}
    todo = list(pin_ids)
    try:
        while True:
            try:
                ver = version or await cache.get_live()
                if ver is not None:
                    for i in range(0, len(todo), 1000):
                        chunk = todo[i:i + 1000]
                        _, found = await cache.get_vectors(ver, chunk)
                        hits = [p for p, ok in zip(chunk, found, strict=True) if ok]
                        for pid, m in (await cache.get_meta(ver, hits)).items():
                            if min_pin_version is None or \
                                    int(m["pin_version"]) >= min_pin_version:
                                meta[pid] = m
                    bar.update(len(meta) - bar.n)
                    todo = [p for p in pin_ids if p not in meta]
            except StoreUnavailable:  # keep polling through an outage
                pass
            if not todo or time.monotonic() > deadline:
                return meta
            await asyncio.sleep(poll_s)
    finally:
        bar.close()


async def wait_settled(
    cache: RedisCache, kafka: KafkaSettings, pin_ids: Sequence[str], timeout_s: float, *,
    min_pin_version: int | None = None, progress: bool = False,
) -> tuple[dict[str, dict[str, str]], dict[str, DeadLetter]]:
    """Wait until every pin is readable or dead-lettered.

    Returns ``(metadata of readable pins, dead letters by pin id)``; together
    they cover every pin unless the timeout passed.
    """
    from streams.producer import read_dead_letters

    deadline = time.monotonic() + timeout_s
    wanted = set(pin_ids)
    letters: dict[str, DeadLetter] = {}
    meta: dict[str, dict[str, str]] = {}
    while True:
        todo = [p for p in pin_ids if p not in letters]
        meta = await wait_readable(cache, todo, min(2.0, max(0.0, deadline - time.monotonic())),
                                   min_pin_version=min_pin_version, progress=False)
        if len(meta) == len(todo) or time.monotonic() > deadline:
            break
        for dl in await read_dead_letters(kafka):
            if dl.pin_id in wanted and (min_pin_version is None
                                        or _letter_version(dl) >= min_pin_version):
                letters[dl.pin_id] = dl
        if progress:
            logger.info("%d/%d readable, %d dead-lettered", len(meta), len(pin_ids), len(letters))
    return meta, letters


def _letter_version(dl: DeadLetter) -> int:
    try:
        return int(json.loads(dl.original_bytes()).get("version", -1))
    except (ValueError, AttributeError, TypeError):
        return -1
