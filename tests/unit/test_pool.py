"""The per-GPU worker pool launcher, with a stand-in worker command (no GPU, no Kafka)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import pytest

from streams.runtime.pool import WorkerPool, child_env, parse_devices

FAKE_WORKER = r"""
import json, os, signal, sys, time
out = sys.argv[1]
slot = os.environ["CUDA_VISIBLE_DEVICES"] or "cpu"
path = f"{out}/{slot}"
runs = len(open(path).read().splitlines()) if os.path.exists(path) else 0
with open(path, "a") as f:
    f.write(json.dumps({k: os.environ.get(k) for k in (
        "CUDA_VISIBLE_DEVICES", "PINFRESH_ENCODER__DEVICE",
        "PINFRESH_WORKER__METRICS_PORT")}) + "\n")
if slot == "1" and runs == 0:
    sys.exit(3)  # the GPU-1 worker crashes once at start
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
while not stop:
    time.sleep(0.05)
open(f"{out}/{slot}.drained", "w").write("ok")
"""


def test_parse_devices():
    assert parse_devices("0,1") == ["0", "1"]
    assert parse_devices("cuda:2, cpu") == ["2", "cpu"]
    assert parse_devices("all", cuda_count=lambda: 3) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="no CUDA"):
        parse_devices("all", cuda_count=lambda: 0)
    with pytest.raises(ValueError, match="GPU indexes"):
        parse_devices("0,gpu1")


def test_child_env_pins_one_gpu_per_process():
    env = child_env("3", 1, {"X": "y"}, metrics_port=9100)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["PINFRESH_ENCODER__DEVICE"] == "cuda"
    assert env["PINFRESH_WORKER__METRICS_PORT"] == "9101" and env["X"] == "y"
    cpu = child_env("cpu", 0, {}, metrics_port=0)
    assert cpu["PINFRESH_ENCODER__DEVICE"] == "cpu" and "PINFRESH_WORKER__METRICS_PORT" not in cpu


def wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_pool_starts_restarts_and_drains(tmp_path):
    pool = WorkerPool(["0", "1"], env={"PATH": "/usr/bin:/bin"}, metrics_port=9200,
                      command=[sys.executable, "-c", FAKE_WORKER, str(tmp_path)],
                      stop_timeout_s=10)
    t = threading.Thread(target=lambda: setattr(pool, "rc", pool.run(poll_s=0.05)))
    t.start()
    try:
        # worker 1 crashed once and was restarted after its back-off
        assert wait_for(lambda: (tmp_path / "1").exists()
                        and len((tmp_path / "1").read_text().splitlines()) == 2)
        assert wait_for(lambda: all(c.proc is not None and c.proc.poll() is None
                                    for c in pool.children))
    finally:
        pool.stop(signal.SIGTERM)
        t.join(20)
    assert pool.rc == 0 and pool.failed is None
    first = [json.loads(x) for x in (tmp_path / "0").read_text().splitlines()]
    assert first == [{"CUDA_VISIBLE_DEVICES": "0", "PINFRESH_ENCODER__DEVICE": "cuda",
                      "PINFRESH_WORKER__METRICS_PORT": "9200"}]
    assert json.loads((tmp_path / "1").read_text().splitlines()[-1])[
        "PINFRESH_WORKER__METRICS_PORT"] == "9201"
    # both drained on SIGTERM instead of being killed
    assert (tmp_path / "0.drained").exists() and (tmp_path / "1.drained").exists()


def test_a_crash_loop_stops_the_pool(tmp_path):
    pool = WorkerPool(["cpu"], env={"PATH": "/usr/bin:/bin"},
                      command=[sys.executable, "-c", "import sys; sys.exit(5)"],
                      max_restarts=1, stop_timeout_s=5)
    import streams.runtime.pool as sp

    orig = sp.time.monotonic
    skew = [0.0]
    # skip the back-off waits: each poll advances the pool's clock by a minute
    sp.time.monotonic = lambda: orig() + skew[0]  # type: ignore[assignment]
    try:
        pool.start()
        for _ in range(200):
            skew[0] += 60
            if not pool.poll():
                break
            time.sleep(0.02)
    finally:
        sp.time.monotonic = orig  # type: ignore[assignment]
    assert pool.failed and "exited 5" in pool.failed


def test_feeders_layout_one_encoder_per_device_and_distinct_slots(tmp_path):
    from streams.runtime.pool import WorkerPool, auto_feeders, child_env

    pool = WorkerPool(["0", "1"], feeders=3, run_dir=tmp_path, metrics_port=9000)
    roles = [(c.role, c.device, c.slot) for c in pool.children]
    assert roles == [("encoder", "0", 0), ("feeder", "0", 1), ("feeder", "0", 2),
                     ("feeder", "0", 3), ("encoder", "1", 4), ("feeder", "1", 5),
                     ("feeder", "1", 6), ("feeder", "1", 7)]
    assert [c.metrics_slot for c in pool.children if c.role == "feeder"] == [0, 1, 2, 3, 4, 5]
    socks = {c.device: c.socket for c in pool.children}
    assert socks["0"] != socks["1"] and all(c.socket == socks[c.device] for c in pool.children)
    env = child_env("0", 2, {}, 9000, remote=socks["0"])
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["PINFRESH_ENCODER__REMOTE"] == socks["0"]
    assert env["PINFRESH_WORKER__METRICS_PORT"] == "9002"
    assert auto_feeders(1, cores=16) == 14 and auto_feeders(2, cores=16) == 6
    assert auto_feeders(1, cores=2) == 1
