"""`pid_alive`: a process is alive until every thread of it is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from streams.runtime.stackstate import pid_alive

# the main thread exits (pthread_exit) while another thread runs on: the process's
# leader shows "Z" in /proc, but the process and its files live on
_MAIN_EXITS_FIRST = """
import ctypes, socket, sys, threading, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
threading.Thread(target=time.sleep, args=(60,)).start()
print(s.getsockname()[1], flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_process_whose_main_thread_exited_is_alive_while_a_thread_runs():
    proc = subprocess.Popen([sys.executable, "-c", _MAIN_EXITS_FIRST], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip()
        deadline = time.monotonic() + 60
        while _state(proc.pid) != "Z":  # the main thread is gone
            assert time.monotonic() < deadline, _state(proc.pid)
            time.sleep(0.05)
        assert pid_alive(proc.pid)  # it was taken for dead (a zombie) before
        proc.kill()
        proc.wait(timeout=60)
        assert not pid_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=60)


def _recorded_stack(data: Path, pid: int, started: int) -> None:
    """A stack.json whose broker and supervisor are ``pid`` (started at ``started``)."""
    import json

    svc = {"pid": pid, "port": 1, "log": "x", "bus_port": 0, "started": started}
    none = {**svc, "pid": 0, "started": 0}
    (data / "stack.json").write_text(json.dumps({
        "host": "127.0.0.1", "kafka": {"name": "kafka", **svc},
        "redis": {"name": "redis", **none}, "milvus": {"name": "milvus", **none},
        "supervisor_pid": pid, "supervisor_started": started}))


def test_a_recorded_pid_another_process_took_is_not_alive_and_never_signalled(tmp_path):
    """`down` after the services died long ago: their pids may name other processes now
    (pid_max is 32768 here). Such a process, a group leader of its own, must not be
    taken for the service, nor SIGTERMed and SIGKILLed with its group."""
    from streams.runtime.stack import EmbeddedStack
    from streams.runtime.stackstate import proc_started
    from streams.settings import StackSettings

    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        began = proc_started(other.pid)
        # the start time, not another field that stays put: boot time + ticks is now
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text()
                     .splitlines() if line.startswith("btime "))
        assert abs(btime + began / os.sysconf("SC_CLK_TCK") - time.time()) < 120
        assert pid_alive(other.pid) and pid_alive(other.pid, began)
        assert not pid_alive(other.pid, began - 1)  # the recorded one started earlier
        _recorded_stack(tmp_path, other.pid, began - 1)
        assert EmbeddedStack(StackSettings(data_dir=tmp_path)).stop(timeout=5)
        assert other.poll() is None, "an unrelated process was signalled"
        assert not (tmp_path / "stack.json").exists()
        # the process recorded (same start time) is stopped, group and all
        _recorded_stack(tmp_path, other.pid, began)
        assert EmbeddedStack(StackSettings(data_dir=tmp_path)).stop(timeout=5)
        assert not pid_alive(other.pid, began)  # (reaped by that check: it is our child)
    finally:
        other.kill()
        other.wait(timeout=60)


def test_a_stack_json_with_fields_this_release_does_not_know_is_read(tmp_path):
    """A later release's stack.json (a new field per service) is still read: a supervisor
    that cannot read it exits, and the stack runs unwatched (what happened to the
    supervisor of the release before start times were recorded)."""
    import json

    from streams.runtime.stackstate import StackFile

    _recorded_stack(tmp_path, 123, 456)
    raw = json.loads((tmp_path / "stack.json").read_text())
    raw["kafka"]["cgroup"] = "/later"
    (tmp_path / "stack.json").write_text(json.dumps(raw))
    info = StackFile(tmp_path).read()
    assert info is not None and (info.kafka.pid, info.kafka.started) == (123, 456)
    assert info.supervisor_started == 456


def test_a_worker_record_whose_pid_another_process_took_is_not_stopped(tmp_path):
    """`pinfresh down` stops the workers recorded under the data dir; a record left by a
    worker that died long ago may name a pid another process has now, even one whose
    command line looks like pinfresh's: it is dropped, and that process not signalled."""
    import socket

    from streams.runtime.processes import stop_workers, workers_dir
    from streams.runtime.stackstate import proc_started
    from streams.runtime.status import pid_gone
    from streams.settings import Settings, StackSettings

    settings = Settings(stack=StackSettings(data_dir=tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                              "streams.cli"], start_new_session=True)
    try:
        began = proc_started(other.pid)
        wdir = workers_dir(settings)
        wdir.mkdir(parents=True, exist_ok=True)
        record = wdir / f"{socket.gethostname()}-{other.pid}.pid"
        record.write_text(f"{other.pid} {began - 1}")
        assert stop_workers(settings, timeout=5) == 0
        assert other.poll() is None and not record.exists()
        # a file that names another pid than its own name does: not trusted either
        odd = wdir / f"{socket.gethostname()}-1{other.pid}.pid"
        odd.write_text(f"{other.pid} {began}")
        assert stop_workers(settings, timeout=5) == 0
        assert other.poll() is None and not odd.exists()
        # `status`: a report of that dead worker is gone, one of this process is not
        host = socket.gethostname()
        assert pid_gone({"host": host, "pid": other.pid, "proc_started": began - 1})
        assert not pid_gone({"host": host, "pid": other.pid, "proc_started": began})
        assert not pid_gone({"host": host, "pid": other.pid})  # a report from before
        # the worker it names (same start time) is stopped
        record.write_text(f"{other.pid} {began}")
        assert stop_workers(settings, timeout=30) == 1
        deadline = time.monotonic() + 60  # SIGTERMed: it may still be exiting
        while pid_alive(other.pid, began):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        other.kill()
        other.wait(timeout=60)
