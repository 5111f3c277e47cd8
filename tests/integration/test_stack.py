"""The embedded stack launcher, directly and through the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from streams.tools.stack import EmbeddedStack, StackError, StackSettings

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


def test_cli_up_status_down(tmp_path):
    env = {**os.environ, "PINFRESH_STACK__DATA_DIR": str(tmp_path),
           "PINFRESH_STACK__KAFKA_PORT": "0", "PINFRESH_STACK__REDIS_PORT": "0",
           "PINFRESH_STACK__MILVUS_PORT": "0"}

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
        assert again.returncode == 0
        assert json.loads((tmp_path / "stack.json").read_text()) == info
    finally:
        down = run("down")
    assert down.returncode == 0
    assert not (tmp_path / "stack.json").exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", info["redis"]["port"])) != 0


def test_milvus_connections_survive_idle_time(stack):
    """Regression: pymilvus's shared default channel pings every 10 s while idle;
    the server answers GOAWAY "Too many pings" after about a minute, and the next
    client on that address failed to connect (seen in CI). `connect()` gives each
    client its own channel that only pings during calls."""
    import time

    from store.milvus import connect
    from streams.tools.stack import check_milvus

    check_milvus(stack.milvus_uri)  # what `pinfresh up` and the tests do first
    idle = connect(stack.milvus_uri, timeout_s=2.0)
    idle.list_collections()
    time.sleep(75)  # past the server's ping-strike window
    assert isinstance(idle.list_collections(), list)
    fresh = connect(stack.milvus_uri, timeout_s=2.0)
    try:
        assert isinstance(fresh.list_collections(), list)
    finally:
        fresh.close()
        idle.close()
