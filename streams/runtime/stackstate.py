"""The embedded stack's record: ``<data_dir>/stack.json``, its lock and process helpers.

`streams.runtime.stack.EmbeddedStack` (``pinfresh up``, ``down``, ``restart``)
and the stack's supervisor (`streams.runtime.supervisor`) both change the
record; every change happens under one file lock (`StackFile.lock`), so a
service is never started twice at once, whoever notices it is down.

``stack.json`` holds, per service, its pid, port and log, and for the stack:
the Milvus engine and the broker's log engine it runs, the supervisor's pid,
the services held down on purpose (`EmbeddedStack.kill_service`: the
supervisor leaves them alone) and how often the supervisor restarted each
service, when, and why.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ServiceInfo", "StackFile", "StackInfo", "free_port", "free_ports",
           "listening_inodes", "listens_on", "pid_alive", "pid_reused",
           "port_in_use", "proc_started", "service_of"]


@dataclass
class ServiceInfo:
    """One running embedded service."""

    name: str
    pid: int
    port: int
    log: str
    #: Valkey Cluster bus port (0: not a cluster node).
    bus_port: int = 0
    #: when the process started (`proc_started`; 0: unknown, a stack.json from before):
    #: a pid alone may name another process once this one is gone
    started: int = 0


def _service(raw: dict[str, Any]) -> ServiceInfo:
    """A recorded service; keys it does not know (a later release's) are left out."""
    return ServiceInfo(**{k: v for k, v in raw.items() if k in ServiceInfo.__dataclass_fields__})


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
    #: the supervisor watching the services (0: none), and when it started
    supervisor_pid: int = 0
    supervisor_started: int = 0
    #: services stopped on purpose (a fault test's kill): the supervisor leaves them down
    held: list[str] = field(default_factory=list)
    #: per service: ``{"count", "last_at", "last_error"}`` of the supervisor's restarts
    restarts: dict[str, dict[str, Any]] = field(default_factory=dict)

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

    def service(self, name: str, node: int = 0) -> ServiceInfo:
        """The service ``name`` (``redis`` with ``node`` for a cluster node)."""
        svc: ServiceInfo = self.redis_node(node) if name == "redis" else getattr(self, name)
        return svc

    def replace(self, name: str, node: int, new: ServiceInfo) -> None:
        """Record ``new`` as service ``name`` (node ``node``)."""
        if name == "redis" and node > 0:
            self.redis_nodes[node - 1] = new
        else:
            setattr(self, name, new)


class StackFile:
    """``stack.json`` of one data dir, and the lock every change takes."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "stack.json"
        self._lock_path = data_dir / "stack.lock"
        self._depth = 0
        self._fd: int | None = None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the stack's lock (re-entrant within this object; blocks other processes)."""
        if self._depth == 0:
            self._lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    def read(self) -> StackInfo | None:
        """The recorded stack, or None."""
        try:
            raw = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return StackInfo(
            host=raw["host"],
            kafka=_service(raw["kafka"]),
            redis=_service(raw["redis"]),
            milvus=_service(raw["milvus"]),
            redis_nodes=[_service(n) for n in raw.get("redis_nodes", [])],
            redis_cluster=bool(raw.get("redis_cluster", False)),
            milvus_engine=str(raw.get("milvus_engine", "lite")),
            kafka_log=str(raw.get("kafka_log", "memory")),
            supervisor_pid=int(raw.get("supervisor_pid", 0)),
            supervisor_started=int(raw.get("supervisor_started", 0)),
            held=list(raw.get("held", [])),
            restarts=dict(raw.get("restarts", {})),
        )

    def write(self, info: StackInfo) -> None:
        """Replace the record (atomically: a reader sees the old one or the new one)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2))
        tmp.replace(self.path)

    def remove(self) -> None:
        """Forget the stack (it was stopped)."""
        self.path.unlink(missing_ok=True)


def service_of(name: str) -> tuple[str, int]:
    """``(service, node)`` of a recorded process name (``redis-2`` is Valkey node 2)."""
    if name.startswith("redis-"):
        return "redis", int(name.split("-", 1)[1])
    return name, 0


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (and for ``bind(0)``)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


#: Ports handed out below the ephemeral range start here.
_PICK_FLOOR = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free a moment ago on ``host``.

    Picked at random below the kernel's ephemeral range where that range leaves
    room: a port from ``bind(0)`` comes from the range every outgoing connection
    takes its source port from, and was often handed out a moment before to
    another caller, so on a busy machine it is taken again before the service
    that was given it binds it. Falls back to ``bind(0)``.
    """
    low, _ = _ephemeral_range()
    if low - _PICK_FLOOR >= 1000:
        for _ in range(50):
            port = random.randrange(_PICK_FLOOR, low)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> int:
    """The first of ``n`` consecutive ports that were all free a moment ago on ``host``."""
    low, _ = _ephemeral_range()
    for _ in range(100):
        base = free_port(host)
        if base + n > 65535 or base < low < base + n:  # not into the ephemeral range
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


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on TCP ``port`` in this network namespace."""
    out = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/net/{table}") as fh:
            next(fh)
            for line in fh:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    out.add(f[9])
    return out


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` or one of its descendants listens on TCP ``port``.

    By the socket's inode among their open files; None where /proc cannot tell.
    """
    inodes: set[str] = set()
    todo, seen = [pid], set()
    try:
        while todo:
            p = todo.pop()
            seen.add(p)
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{p}/fd"):
                    with contextlib.suppress(OSError):
                        target = os.readlink(f"/proc/{p}/fd/{fd}")
                        if target.startswith("socket:["):
                            inodes.add(target[8:-1])
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{p}/task"):
                    kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                    todo += [int(k) for k in kids if int(k) not in seen]
        return bool(listening_inodes(port) & inodes)
    except OSError:
        return None


def port_in_use(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def proc_started(pid: int) -> int:
    """When process ``pid`` started, in clock ticks after boot (``/proc``); 0 if unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def pid_reused(pid: int, started: int) -> bool:
    """Whether a process runs as ``pid`` that started at another time than ``started``.

    Then the recorded process is gone, and its process group with it (Linux
    gives no pid that still names a group to a new process): signalling the
    pid's group would hit an unrelated one. False when ``started`` is 0 (not
    recorded) or nothing has the pid.
    """
    began = proc_started(pid) if started and pid > 0 else 0
    return bool(began) and began != started


def pid_alive(pid: int, started: int = 0) -> bool:
    """Whether process ``pid`` runs (a zombie does not; one that is our child is reaped).

    ``started`` (`proc_started` when it was recorded; 0: unchecked): a process
    with that pid that started at another time is another process, which took
    the pid of the recorded one after it exited: not alive.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return not started or proc_started(pid) in (0, started)
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:  # a zombie that is not our child (its parent has not reaped it yet)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # a process whose main thread has exited shows "Z" while its other threads still
        # run, or are still exiting, and hold its files: its listening sockets too (CI saw
        # a port still listening after `stop` returned)
        threads = len(os.listdir(f"/proc/{pid}/task"))
        state, began = fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return True
    if started and began != started:
        return False
    return state != "Z" or threads > 1
