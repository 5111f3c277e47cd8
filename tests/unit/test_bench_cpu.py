"""The feeder CPU measurement (`streams.bench.cpu`): stage attribution and /proc counters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from streams.bench.cpu import STAGE_ORDER, CpuSampler, stage_of, stage_shares


def _stack(*frames: str) -> list[str]:
    root = ["<module> (streams/cli/__main__.py:5)", "Worker.execute_from_commandline "
            "(mode/worker.py:281)", "BaseEventLoop._run_once (asyncio/base_events.py:1922)",
            "Handle._run (asyncio/events.py:80)"]
    return root + list(frames)


def test_a_sample_belongs_to_its_innermost_stage_frame():
    # the Redis write's own frames decide, not the shared helper below it
    assert stage_of(_stack(
        "ClaimWriter._round (streams/claims.py:140)",
        "ClaimWriter._write_redis (streams/claims.py:190)",
        "WriteOps.write (store/redis/writes.py:60)",
        "Client._eval_many (store/redis/client.py:150)",
        "AbstractConnection.pack_commands (redis/asyncio/connection.py:1390)",
    )) == "Redis write (claim, write, release)"
    # hashing inside the fetch step is hashing
    assert stage_of(_stack(
        "Gather.fetch_all (streams/gather.py:60)",
        "Gather.fetch_all.<locals>.<lambda> (streams/gather.py:70)",
    )) == "hash"
    # a helper thread running a Milvus query is a lookup
    assert stage_of(["Thread._bootstrap (threading.py:1002)", "Thread.run (threading.py:982)",
                     "_worker (concurrent/futures/thread.py:83)",
                     "MilvusClient.query (pymilvus/milvus_client/milvus_client.py:500)"]
                    ) == "lookups (tombstones, Redis and Milvus states)"
    # Faust's own work under the loop is consuming; the loop itself is not
    assert stage_of(_stack("Stream._c_aiter (faust/streams.py:1180)")) == STAGE_ORDER[0]
    assert stage_of(_stack()[:3] + ["EpollSelector.select (selectors.py:468)"]) == \
        "event loop and other"


def test_stage_shares_count_samples():
    lines = [";".join(_stack("parse_event (streams/events.py:90)")) + " 3",
             ";".join(_stack("RemoteEncoder._request (encoder/remote.py:300)")) + " 1",
             "garbage line"]
    shares, n = stage_shares(lines)
    assert n == 4
    assert shares == {"parse and validate": 0.75, "encoder round trip": 0.25}


def test_cpu_sampler_reads_a_childs_cpu_time():
    """A child that burns about 0.3 s of CPU is measured as such, from /proc, by thread."""
    code = ("import time\ntime.sleep(2)\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\ntime.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"p = subprocess.Popen([sys.executable, '-c', {code!r}]); "
                               "time.sleep(60)"], start_new_session=True)
    try:
        from streams.bench.cpu import children

        deadline = time.monotonic() + 60
        while not children(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        sampler = CpuSampler(parent.pid, skip=b"never")
        t0 = time.time()
        sampler.sample(t0)
        deadline = time.monotonic() + 120
        while True:  # until the child has burnt its 0.3 s (or the deadline)
            time.sleep(0.2)
            sampler.sample()
            total, groups = sampler.between(t0, time.time())
            if total >= 0.29 or time.monotonic() > deadline:
                break
        assert len(sampler.pids) == 1 and sampler.pids[0] != parent.pid
        assert 0.29 <= total < 0.6, total
        assert groups.get("event loop thread", 0) >= 0.28, groups
        assert os.sysconf("SC_CLK_TCK") > 0
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child too
        parent.wait()
