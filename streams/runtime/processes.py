"""Process plumbing shared by the CLI, the demo, the benchmark and the tests.

* `load_settings` builds the one settings object and, when an embedded stack
  is recorded in the data dir, points every address that the environment does
  not set explicitly at it;
* every ``pinfresh worker`` records its pid under ``<data_dir>/workers``
  (`register_worker`), so ``pinfresh down`` stops workers started by hand as
  well as those `spawn_worker` started;
* `wait_readable` polls Redis until given pins are readable.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from encoder.errors import Unavailable
from store.redis import RedisCache
from streams.events import DeadLetter
from streams.runtime.stack import EmbeddedStack, ServiceInfo, StackInfo
from streams.runtime.stackstate import pid_reused, proc_started
from streams.settings import KafkaSettings, Settings, build_settings, unknown_env

logger = logging.getLogger(__name__)

def load_settings() -> Settings:
    """Settings from the environment and ``.env``, then an embedded stack, lowest first.

    Precedence, highest first: environment variables, ``.env``, the addresses
    of an embedded stack recorded in the data dir, the stack's configured
    ports (``PINFRESH_STACK__*_PORT``, unless 0) when none is recorded, the
    defaults. So an address
    set anywhere (``PINFRESH_REDIS__URL`` in the environment or in ``.env``)
    is never overridden by a leftover embedded stack.

    Raises:
        SettingsError: a variable has a bad value (one line naming it).
    """
    settings = build_settings(os.environ)
    st = settings.stack
    # Without a running stack, addresses follow the stack's configured ports (a
    # fixed port, not 0), so a client of this data dir never joins another
    # stack listening on the default ports: the addresses a stack started with
    # those ports would record.
    info = EmbeddedStack(st).read() or StackInfo(
        st.host, ServiceInfo("kafka", 0, st.kafka_port, ""),
        ServiceInfo("redis", 0, st.redis_port, ""), ServiceInfo("milvus", 0, st.milvus_port, ""),
        redis_cluster=bool(st.redis_cluster))
    kafka = info.kafka_bootstrap if info.kafka.port else None
    redis = info.redis_url if info.redis.port else None
    milvus = info.milvus_uri if info.milvus.port else None
    update: dict[str, Any] = {}
    if kafka and "bootstrap_servers" not in settings.kafka.model_fields_set:
        update["kafka"] = settings.kafka.model_copy(update={"bootstrap_servers": kafka})
    if redis and "url" not in settings.redis.model_fields_set:
        update["redis"] = settings.redis.model_copy(update={"url": redis})
    if milvus and "uri" not in settings.milvus.model_fields_set:
        update["milvus"] = settings.milvus.model_copy(update={"uri": milvus})
    return settings.model_copy(update=update)


def settings_warnings(dotenv: Path = Path(".env")) -> list[str]:
    """One line per ``PINFRESH_*`` variable (environment or ``.env``) that no setting reads."""
    names = list(os.environ)
    if dotenv.is_file():
        from dotenv import dotenv_values

        names += [n for n in dotenv_values(dotenv) if n not in os.environ]
    return [f"{name} is not a setting and is ignored"
            + (f"; did you mean {close}?" if close else "")
            for name, close in unknown_env(names)]


def workers_dir(settings: Settings) -> Path:
    """Where every running worker records its pid (``pinfresh down`` reads it)."""
    return settings.paths.workers


def _pid_file(settings: Settings, pid: int) -> Path:
    return workers_dir(settings) / f"{socket.gethostname()}-{pid}.pid"


def _write_pid_file(path: Path, pid: int) -> None:
    """``<pid> <start time>`` (`proc_started`), replaced whole: `down` never reads it empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{pid} {proc_started(pid)}")
    os.replace(tmp, path)


def register_worker(settings: Settings) -> Callable[[], None]:
    """Record this process as a worker; returns the function that removes the record.

    Called by ``pinfresh worker`` itself, however it was started (by hand,
    by `spawn_worker`, by a ``--devices`` pool), so ``pinfresh down`` finds
    every worker of this data dir. The record is also removed at normal
    interpreter exit.
    """
    path = _pid_file(settings, os.getpid())
    _write_pid_file(path, os.getpid())

    def remove() -> None:
        path.unlink(missing_ok=True)

    atexit.register(remove)
    return remove


def spawn_worker(settings: Settings, name: str, log_path: Path | None = None,
                 command: Sequence[str] = ("-m", "streams.cli", "worker"),
                 ) -> subprocess.Popen[bytes]:
    """Start ``pinfresh worker`` in its own session; returns the process.

    Settings travel as environment variables (never as arguments, which
    other users can read); the worker records its own pid file. ``command``
    (the interpreter's arguments) lets a test start its own entry point.
    """
    log_path = log_path or settings.paths.logs / f"worker-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = settings.child_environ(os.environ)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *command], stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
    # written here too, so a `down` right after the spawn finds it; the worker rewrites it
    _write_pid_file(_pid_file(settings, proc.pid), proc.pid)
    return proc


def _is_worker(pid: int) -> bool:
    """Whether ``pid`` is a live pinfresh process (not a recycled pid)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:  # no /proc: trust the pid file
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return b"pinfresh" in cmd or b"streams.cli" in cmd


def stop_workers(settings: Settings, timeout: float = 45.0) -> int:
    """SIGTERM every recorded worker of this host, wait for all (SIGKILL after ``timeout``).

    Returns how many were running. Stale records (a pid that is gone or no
    longer a pinfresh process) are removed without signalling anything.
    """
    wdir = workers_dir(settings)
    host = socket.gethostname()
    pids: dict[int, tuple[int, Path]] = {}  # pid -> (its start time, its file)
    for pid_file in sorted(wdir.glob(f"{host}-*.pid")) if wdir.is_dir() else []:
        try:
            # "<pid> <start time>" (a file of an earlier release: the pid alone)
            pid, started = (int(f) for f in (pid_file.read_text().split() + ["0"])[:2])
        except (ValueError, OSError):
            pid_file.unlink(missing_ok=True)
            continue
        if (pid > 0 and pid_file.name == f"{host}-{pid}.pid" and pid != os.getpid()
                and _alive(pid, started)):
            pids[pid] = (started, pid_file)
        else:
            pid_file.unlink(missing_ok=True)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p, pids[p][0])}
        if alive:
            time.sleep(0.1)
    for pid in alive:
        if not _alive(pid, pids[pid][0]):  # it exited, and its pid may be another's now
            continue
        logger.warning("worker %d did not drain in %.0fs: SIGKILL", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for _started, path in pids.values():
        path.unlink(missing_ok=True)
    return len(pids)


def _alive(pid: int, started: int = 0) -> bool:
    """Whether ``pid`` is a live pinfresh process (that started at ``started``, if given)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not pid_reused(pid, started) and _is_worker(pid)


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """SIGTERM a child started in its own session (and its children), SIGKILL after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_pid(pid: int, timeout: float = 15.0) -> bool:
    """SIGTERM, wait, then SIGKILL one process. Returns whether it was running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
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
            except Unavailable:  # keep polling through an outage
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
