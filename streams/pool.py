"""``pinfresh worker --devices 0,1,...``: one worker process per GPU, supervised.

Each child is an ordinary ``pinfresh worker`` (a member of the one consumer
group) that sees exactly one GPU: ``CUDA_VISIBLE_DEVICES=N`` and
``PINFRESH_ENCODER__DEVICE=cuda``. One process per GPU keeps each CUDA
context, nvjpeg handle and allocator to itself and lets Kafka spread the
partitions over the GPUs. ``cpu`` entries run CPU workers (tests, mixed hosts).

The launcher forwards SIGTERM/SIGINT to every child, which drains (finishes
its in-flight batch, writes, commits, leaves the group), and waits for them.
A child that dies on its own is restarted with a doubling back-off; more than
``max_restarts`` restarts in ten minutes stops the pool with an error, since
a worker that keeps crashing needs an operator, not a loop.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

RESTART_WINDOW_S = 600.0


def parse_devices(spec: str, cuda_count: Callable[[], int] | None = None) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``; ``"all"`` -> every visible GPU; ``"cpu"`` stays.

    Raises:
        ValueError: an entry that is neither a GPU index nor ``cpu``, or no GPU for ``all``.
    """
    if spec.strip() == "all":
        if cuda_count is None:
            import torch

            cuda_count = torch.cuda.device_count
        n = cuda_count()
        if n == 0:
            raise ValueError("--devices all: no CUDA device is visible")
        return [str(i) for i in range(n)]
    out = []
    for part in spec.split(","):
        p = part.strip().lower().removeprefix("cuda:")
        if p == "cpu" or p.isdigit():
            out.append(p)
        else:
            raise ValueError(f"--devices wants GPU indexes, 'cpu' or 'all', got {part!r}")
    if not out:
        raise ValueError("--devices is empty")
    return out


def child_env(device: str, slot: int, base: dict[str, str], metrics_port: int) -> dict[str, str]:
    """Environment of the worker for one device slot."""
    env = dict(base)
    if device == "cpu":
        env["PINFRESH_ENCODER__DEVICE"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["PINFRESH_ENCODER__DEVICE"] = "cuda"
        env["CUDA_VISIBLE_DEVICES"] = device
    if metrics_port:
        env["PINFRESH_WORKER__METRICS_PORT"] = str(metrics_port + slot)
    return env


@dataclass
class _Child:
    slot: int
    device: str
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0


class WorkerPool:
    """Start, watch and stop one worker process per device."""

    def __init__(self, devices: Sequence[str], *, env: dict[str, str] | None = None,
                 metrics_port: int = 0, command: Sequence[str] | None = None,
                 max_restarts: int = 5, stop_timeout_s: float = 60.0) -> None:
        self.children = [_Child(i, d) for i, d in enumerate(devices)]
        self.env = dict(os.environ if env is None else env)
        self.metrics_port = metrics_port
        self.command = list(command or [sys.executable, "-m", "streams.cli", "worker"])
        self.max_restarts = max_restarts
        self.stop_timeout_s = stop_timeout_s
        self._stopping = False
        self.failed: str | None = None

    def _start(self, child: _Child) -> None:
        env = child_env(child.device, child.slot, self.env, self.metrics_port)
        child.proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL)
        logger.info("worker %d on %s started (pid %d)", child.slot,
                    "cpu" if child.device == "cpu" else f"GPU {child.device}", child.proc.pid)

    def start(self) -> None:
        """Start every child."""
        for c in self.children:
            self._start(c)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask every child to drain and exit (idempotent)."""
        self._stopping = True
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(sig)

    def poll(self) -> bool:
        """Restart children that died on their own; False once the pool is done."""
        now = time.monotonic()
        alive = False
        for c in self.children:
            rc = c.proc.poll() if c.proc is not None else None
            if rc is None and c.proc is not None:
                alive = True
                continue
            if self._stopping or self.failed:
                continue
            if c.proc is not None:  # just died
                c.restarts = [t for t in c.restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(c.restarts) > self.max_restarts:
                    self.failed = (f"worker {c.slot} on device {c.device} exited {rc} "
                                   f"{len(c.restarts)} times in {RESTART_WINDOW_S:.0f} s")
                    logger.error("%s: stopping the pool", self.failed)
                    self.stop()
                    continue
                delay = min(30.0, 2.0 ** (len(c.restarts) - 1))
                logger.warning("worker %d on device %s exited with %s; restarting in %.0f s",
                               c.slot, c.device, rc, delay)
                c.proc, c.next_start = None, now + delay
            if c.proc is None and now >= c.next_start:
                self._start(c)
            alive = True
        return alive

    def wait_stopped(self) -> None:
        """After `stop`: wait for the children, SIGKILL those past the timeout."""
        deadline = time.monotonic() + self.stop_timeout_s
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker %d did not drain in %.0f s: SIGKILL", c.slot,
                             self.stop_timeout_s)
                c.proc.kill()
                c.proc.wait()

    def run(self, poll_s: float = 0.5) -> int:
        """Run until SIGTERM/SIGINT (forwarded) or a crash loop; returns an exit code."""
        def on_signal(signum: int, _frame: object) -> None:
            logger.info("signal %d: draining %d workers", signum, len(self.children))
            self.stop(signal.SIGTERM)

        old = {}
        if threading.current_thread() is threading.main_thread():  # signals: main thread only
            old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while self.poll():
                if self._stopping:
                    break
                time.sleep(poll_s)
            self.wait_stopped()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return 1 if self.failed else 0
