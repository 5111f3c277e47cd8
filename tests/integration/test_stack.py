"""The embedded stack launcher, directly and through the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from streams.runtime.stack import EmbeddedStack, StackError, StackSettings
from streams.runtime.stackstate import free_port, listening_inodes, listens_on, pid_alive

pytestmark = pytest.mark.integration


def test_taken_port_gives_an_error_naming_the_fix(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        st = EmbeddedStack(StackSettings(data_dir=tmp_path, kafka_port=port, redis_port=0,
                                         milvus_port=0))
        with pytest.raises(StackError, match="PINFRESH_STACK__KAFKA_PORT"):
            st.start()
    assert st.read() is None


def test_a_picked_port_taken_before_its_service_binds_it_starts_on_new_ports(
        tmp_path, monkeypatch, caplog):
    """A picked port is only free a moment; if another process takes it before Valkey
    binds it, the stack starts again on new ports instead of failing (the race CI saw:
    "redis-2 exited during start-up")."""
    import streams.runtime.stack as stack_mod
    from streams.runtime.stackstate import _ephemeral_range

    low, _ = _ephemeral_range()
    if low - 20000 >= 1000:  # room below the range: never where bind(0) and clients go
        assert all(free_port() < low for _ in range(20))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([None, busy])  # kafka's pick, then Valkey's: the taken one

        def pick(host: str = "127.0.0.1") -> int:
            port = next(picks, None)
            return port if port is not None else free_port(host)

        monkeypatch.setattr(stack_mod, "free_port", pick)
        st = EmbeddedStack(StackSettings(data_dir=tmp_path, kafka_port=0, redis_port=0,
                                         milvus_port=0))
        with caplog.at_level("WARNING"):
            info = st.start()
        try:
            assert info.redis.port != busy
            assert "redis exited during start-up" in caplog.text
            assert st.read().redis.port == info.redis.port
            from streams.runtime.stack import check_redis
            check_redis(info.redis_url)
        finally:
            st.stop()


def test_a_port_answered_by_another_process_is_not_taken_for_the_service():
    """The launcher checks that a service's port is its own, not only that it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        port = s.getsockname()[1]
        other = subprocess.Popen(["sleep", "60"])
        try:
            assert listens_on(os.getpid(), port) is True
            assert listens_on(other.pid, port) is False
        finally:
            other.kill()
            other.wait()


def test_cli_up_status_down(tmp_path):
    env = {**os.environ, "PINFRESH_STACK__DATA_DIR": str(tmp_path),
           "PINFRESH_STACK__KAFKA_PORT": "0", "PINFRESH_STACK__REDIS_PORT": "0",
           "PINFRESH_STACK__MILVUS_PORT": "0",
           # the broker (tansu) logs through Rust's tracing: at info it writes lines at
           # once, in colour unless told not to (CI saw ESC[ in kafka.log on an error)
           "RUST_LOG": "info"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    try:
        up = run("up")
        assert up.returncode == 0, up.stderr
        info = json.loads((tmp_path / "stack.json").read_text())
        assert all(info[s]["port"] > 0 for s in ("kafka", "redis", "milvus"))
        st = run("status", "--json")
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["health"] == {"kafka": "ok", "redis": "ok", "milvus": "ok"}
        again = run("up")  # idempotent
        assert again.returncode == 0 and "started: nothing" in again.stdout
        assert json.loads((tmp_path / "stack.json").read_text()) == info

        # one service down: `up` starts that one only; the broker (and its log) stays
        from streams.producer import publish_raw
        from streams.settings import KafkaSettings, StackSettings

        k = KafkaSettings(bootstrap_servers=f"127.0.0.1:{info['kafka']['port']}",
                          topic="kept")
        asyncio.run(publish_raw(k, [(b"p", b"an event the broker must keep")]))
        EmbeddedStack(StackSettings(data_dir=tmp_path)).kill_service("redis")
        partial = run("up")
        assert partial.returncode == 0, partial.stderr
        assert "started: redis" in partial.stdout and "kafka" not in partial.stdout.split(
            "started:")[1].splitlines()[0]
        after = json.loads((tmp_path / "stack.json").read_text())
        assert after["kafka"] == info["kafka"] and after["milvus"] == info["milvus"]
        assert after["redis"]["port"] == info["redis"]["port"]
        assert asyncio.run(_topic_size(k)) == 1  # the broker's log survived
        # restart one service by name; the others keep running
        assert run("restart", "milvus").returncode == 0
        assert json.loads((tmp_path / "stack.json").read_text())["kafka"] == info["kafka"]
        # the broker's log is files under data/kafka: a restart keeps the event
        restarted = run("restart", "kafka")
        assert restarted.returncode == 0, restarted.stderr
        now = json.loads((tmp_path / "stack.json").read_text())
        assert now["kafka"]["port"] == info["kafka"]["port"]
        assert now["kafka"]["pid"] != info["kafka"]["pid"]
        assert asyncio.run(_topic_size(k)) == 1
        # a read API of this data dir: `down` stops it too (it kept answering)
        api_port = free_port()
        serve = subprocess.Popen([sys.executable, "-m", "streams.cli", "serve", "--port",
                                  str(api_port)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not _answers(api_port):
            assert serve.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
    finally:
        down = run("down")
    assert down.returncode == 0
    try:
        # stopped by `down`: uvicorn shuts down on SIGTERM, then re-raises it
        assert serve.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert not (tmp_path / "stack.json").exists()
    # no service left (their ports may be anyone's by now: another stack runs beside)
    assert not [s for s in ("kafka", "redis", "milvus") if pid_alive(now[s]["pid"])]
    # every service gone: status says so and exits 3 (it exited 0 before)
    gone = run("status", "--json")
    assert gone.returncode == 3, gone.stdout[-2000:] + gone.stderr[-2000:]
    assert all(v.startswith("down") for v in json.loads(gone.stdout)["health"].values())
    # the services' logs are text: no terminal escapes
    kafka_log = (tmp_path / "logs" / "kafka.log").read_text(errors="replace")
    assert "INFO" in kafka_log, kafka_log[-2000:]
    for path in sorted((tmp_path / "logs").glob("*.log")):
        assert "\x1b[" not in path.read_text(errors="replace"), path


def _answers(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def _topic_size(k) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.kafka import aiokafka_kwargs
    from streams.producer import end_offsets

    c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **aiokafka_kwargs(k))
    await c.start()
    try:
        parts = c.partitions_for_topic(k.topic) or set()
        ends = await end_offsets(c, [TopicPartition(k.topic, p) for p in parts])
        return sum(ends.values())
    finally:
        await c.stop()


def _listening(pid: int, view: int | str = "self") -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket ``pid`` listens on in the network
    namespace of process ``view`` (/proc/VIEW/net/tcp{,6} by ``pid``'s socket inodes)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{view}/net/{table}") as fh:
            next(fh)
            for line in fh:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # LISTEN
                    hexaddr, hexport = f[1].split(":")
                    raw = bytes.fromhex(hexaddr)
                    if table == "tcp":
                        addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
                    else:
                        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        addr = socket.inet_ntop(socket.AF_INET6, words)
                    out.append((addr, int(hexport, 16)))
    return out


def _socket_holders(inodes: set[str]) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of every process with one of these sockets open."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] in inodes:
                        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
                        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
                        out.append((int(pid), stat, cmd.decode(errors="replace")[:200]))
                        break
    return out


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(x) for x in fh.read().split()]


def _milvus_processes(data_dir) -> list[int]:
    """Pids of `milvus run standalone` servers whose working dir is under ``data_dir``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if len(cmd) > 2 and cmd[1:3] == [b"run", b"standalone"] and \
                    os.readlink(f"/proc/{pid}/cwd").startswith(str(data_dir)):
                out.append(int(pid))
    return out


@pytest.mark.long
def test_milvus_server_is_real_loopback_only_and_leaves_no_process(tmp_path):
    """The embedded Milvus is a real server (it counts VARCHAR lengths in bytes, as
    Milvus Lite did not), reachable on its one loopback port only; SIGKILLing its
    wrapper and `down` leave no server behind."""
    from pymilvus import DataType, MilvusException

    from store.milvus import connect

    st = EmbeddedStack(StackSettings(data_dir=tmp_path, kafka_port=0, redis_port=0,
                                     milvus_port=0))
    info = st.start()
    try:
        assert info.milvus_engine == "server"
        (server,) = _children(info.milvus.pid)
        assert _milvus_processes(tmp_path) == [server]
        # in this host's network namespace: one socket, the wrapper's, on loopback
        assert _listening(info.milvus.pid) == [("127.0.0.1", info.milvus.port)]
        assert _listening(server) == []
        # the server's own ports (gRPC, etcd, metrics) live in a namespace of its own
        assert os.readlink(f"/proc/{server}/ns/net") != os.readlink("/proc/self/ns/net")
        assert len(_listening(server, view=server)) >= 10
        client = connect(info.milvus_uri, timeout_s=30)
        try:
            schema = client.create_schema(auto_id=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=10)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
            index = client.prepare_index_params()
            index.add_index(field_name="v", index_type="AUTOINDEX", metric_type="COSINE")
            client.create_collection("bytes", schema=schema, index_params=index)
            client.upsert("bytes", [{"id": "日本語", "v": [1, 0, 0, 0]}])  # 9 bytes: fits
            with pytest.raises(MilvusException) as refused:
                client.upsert("bytes", [{"id": "日本語の", "v": [1, 0, 0, 0]}])  # 12 bytes
            assert refused.value.code == 1100
        finally:
            client.close()

        # a SIGKILLed wrapper takes the server with it (PR_SET_PDEATHSIG)
        st.kill_service("milvus")
        deadline = time.monotonic() + 30
        while _milvus_processes(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _milvus_processes(tmp_path) == []
        # started again on its port with its data: the collection is loaded and searchable
        info = st.start_service("milvus")
        client = connect(info.milvus_uri, timeout_s=30)
        try:
            assert client.query("bytes", filter='id == "日本語"', output_fields=["id"],
                                consistency_level="Strong")[0]["id"] == "日本語"
            assert len(client.search("bytes", data=[[1, 0, 0, 0]], limit=1)[0]) == 1
        finally:
            client.close()
        listening = listening_inodes(info.milvus.port)
        assert listening, (info.milvus, _listening(info.milvus.pid))  # the wrapper's socket
    finally:
        st.stop()
    assert _milvus_processes(tmp_path) == []
    # its loopback socket is closed (the port itself may be anyone's now: CI saw a
    # connect to it succeed, another process had bound it meanwhile)
    assert not listening_inodes(info.milvus.port) & listening, \
        (info.milvus, _socket_holders(listening))


def test_milvus_data_of_the_other_engine_is_refused(tmp_path):
    (tmp_path / "milvus").mkdir()
    (tmp_path / "milvus" / "ENGINE").write_text("lite\n")
    st = EmbeddedStack(StackSettings(data_dir=tmp_path, kafka_port=0, redis_port=0,
                                     milvus_port=0))
    with pytest.raises(StackError, match="PINFRESH_STACK__MILVUS=lite"):
        st.start()
    assert st.read() is None


def test_the_stack_restarts_a_service_that_exits_and_up_waits_for_a_dying_one(tmp_path):
    """A service that exits (SIGKILL, not a held kill) is started again by the stack's
    supervisor, on its port and data, and counted; `up` right after a kill counts the
    broker as running only once it answers (it said "started: nothing" while the
    broker was gone)."""
    from streams.runtime.stack import check_kafka, check_redis
    from streams.runtime.stackstate import pid_alive
    from streams.runtime.status import stack_view
    from streams.settings import Settings

    st = EmbeddedStack(StackSettings(data_dir=tmp_path, kafka_port=0, redis_port=0,
                                     milvus_port=0))
    info = st.start()
    try:
        assert pid_alive(info.supervisor_pid)
        os.killpg(info.redis.pid, signal.SIGKILL)  # a crash: nobody asked for it
        deadline = time.monotonic() + 180
        while True:
            now = st.read()
            if now.redis.pid != info.redis.pid and now.restarts.get("redis", {}).get("count"):
                try:
                    check_redis(now.redis_url)
                    break
                except Exception:  # noqa: BLE001 - still starting
                    pass
            assert time.monotonic() < deadline, (tmp_path / "logs/supervisor.log").read_text()
            time.sleep(0.2)
        assert now.redis.port == info.redis.port
        settings = Settings().model_copy(update={"stack": StackSettings(data_dir=tmp_path)})
        view = stack_view(settings)
        assert view["supervisor"].startswith("running") and view["restarts"]["redis"][
            "count"] == 1 and view["restarts"]["redis"]["last_error"] is None
        # `up` a moment after the broker was killed: it returns with a broker that answers
        os.killpg(now.kafka.pid, signal.SIGKILL)
        st.start()
        check_kafka(st.read().kafka_bootstrap)
        assert st.read().kafka.port == info.kafka.port
    finally:
        st.stop()
    assert not pid_alive(info.supervisor_pid)
