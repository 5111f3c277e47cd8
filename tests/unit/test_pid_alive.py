"""`pid_alive`: a process is alive until every thread of it is gone."""

from __future__ import annotations

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
