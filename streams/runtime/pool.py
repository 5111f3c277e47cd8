"""``pinfresh worker --devices 0,1,... [--feeders N]``: the processes of one host, supervised.

With ``--feeders N`` each device gets one encoder process that owns the GPU
(``pinfresh encoder serve``) and N feeder workers (consume, validate, fetch,
hash, write, commit) that share it over a Unix socket, because one Python
process cannot feed a GPU (`encoder.remote`). Without it, as below:


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
from pathlib import Path

from streams.runtime.deathsig import die_with

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


def child_env(device: str, slot: int, base: dict[str, str], metrics_port: int,
              remote: str | None = None) -> dict[str, str]:
    """Environment of one child: a worker or encoder process on ``device``, or a feeder.

    A feeder (``remote`` set: the encoder process's socket) sees no GPU at all.
    """
    env = dict(base)
    if remote is not None:
        env["PINFRESH_ENCODER__REMOTE"] = remote
        env["PINFRESH_ENCODER__DEVICE"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device == "cpu":
        env["PINFRESH_ENCODER__DEVICE"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["PINFRESH_ENCODER__DEVICE"] = "cuda"
        env["CUDA_VISIBLE_DEVICES"] = device
    if metrics_port:
        env["PINFRESH_WORKER__METRICS_PORT"] = str(metrics_port + slot)
    return env


def auto_feeders(devices: int, cores: int | None = None) -> int:
    """Feeders per device: the cores left after one encoder process per device, shared out.

    One feeder kept about 0.85 of a core busy at 861-1,129 pins/s (measured with
    a null encoder, 2-core dev machine), so a GPU host's cores, not its GPUs,
    set how many it can run.
    """
    cores = cores or os.cpu_count() or 1
    return max(1, min(16, (cores - 2 * devices) // max(1, devices)))


@dataclass
class _Child:
    slot: int
    device: str
    role: str = "worker"  # "worker" (encodes itself), "encoder" or "feeder"
    socket: str | None = None  # the encoder process's socket (encoder and feeders)
    metrics_slot: int = 0  # serves metrics on port + this (encoders after the others)
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0

    @property
    def label(self) -> str:
        where = "cpu" if self.device == "cpu" else f"GPU {self.device}"
        return f"{self.role} {self.slot} on {where}"


class WorkerPool:
    """Start, watch and stop the processes of one host.

    Without feeders: one worker process per device. With ``feeders`` N: per
    device one encoder process (``pinfresh encoder serve``) and N feeder
    workers that send it their images over a Unix socket under ``run_dir``.
    """

    def __init__(self, devices: Sequence[str], *, env: dict[str, str] | None = None,
                 metrics_port: int = 0, command: Sequence[str] | None = None,
                 max_restarts: int = 5, stop_timeout_s: float = 60.0, feeders: int = 0,
                 run_dir: Path | None = None,
                 encoder_command: Sequence[str] | None = None) -> None:
        self.children: list[_Child] = []
        run_dir = run_dir or Path("data/run")
        served = 0  # metrics ports: the stream processes base, base+1, ..., then encoders
        for d in devices:
            if feeders:
                sock = str((run_dir / f"encoder-{d}.sock").resolve())
                self.children.append(_Child(len(self.children), d, "encoder", sock))
                for _ in range(feeders):
                    self.children.append(_Child(len(self.children), d, "feeder", sock,
                                                metrics_slot=served))
                    served += 1
            else:
                self.children.append(_Child(len(self.children), d, metrics_slot=served))
                served += 1
        for c in self.children:
            if c.role == "encoder":
                c.metrics_slot = served
                served += 1
        self.env = dict(os.environ if env is None else env)
        self.metrics_port = metrics_port
        self.command = list(command or [sys.executable, "-m", "streams.cli", "worker"])
        self.encoder_command = list(encoder_command or [sys.executable, "-m", "streams.cli",
                                                        "encoder", "serve", "--socket"])
        self.max_restarts = max_restarts
        self.stop_timeout_s = stop_timeout_s
        self._stopping = False
        self.failed: str | None = None

    def _start(self, child: _Child) -> None:
        if child.role == "encoder":
            assert child.socket is not None
            env = child_env(child.device, child.metrics_slot, self.env, self.metrics_port)
            cmd = [*self.encoder_command, child.socket]
        else:
            remote = child.socket if child.role == "feeder" else None
            env = child_env(child.device, child.metrics_slot, self.env, self.metrics_port,
                            remote)
            cmd = self.command
        # SIGTERM (a drain) when the pool's process dies, even by SIGKILL: no pool is left
        # running beside the next one
        child.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                      preexec_fn=die_with(os.getpid(), signal.SIGTERM))
        logger.info("%s started (pid %d)", child.label, child.proc.pid)

    def start(self) -> None:
        """Start every child (encoder processes first)."""
        for c in sorted(self.children, key=lambda c: c.role != "encoder"):
            self._start(c)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask the children to drain and exit (idempotent).

        Encoder processes are signalled by `wait_stopped`, after their
        feeders, which need them to finish their in-flight batches.
        """
        self._stopping = True
        for c in self.children:
            if c.role != "encoder" and c.proc is not None and c.proc.poll() is None:
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
                    self.failed = (f"{c.label} exited {rc} {len(c.restarts)} times in "
                                   f"{RESTART_WINDOW_S:.0f} s")
                    logger.error("%s: stopping the pool", self.failed)
                    self.stop()
                    continue
                delay = min(30.0, 2.0 ** (len(c.restarts) - 1))
                logger.warning("%s exited with %s; restarting in %.0f s", c.label, rc, delay)
                c.proc, c.next_start = None, now + delay
            if c.proc is None and now >= c.next_start:
                self._start(c)
            alive = True
        return alive

    def wait_stopped(self) -> None:
        """After `stop`: wait for workers and feeders, then stop the encoder processes.

        SIGKILL for whatever is still running when ``stop_timeout_s`` is over.
        """
        deadline = time.monotonic() + self.stop_timeout_s
        for role in ("worker", "feeder", "encoder"):
            for c in self.children:
                if c.role != role or c.proc is None:
                    continue
                if role == "encoder" and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.error("%s did not stop in %.0f s: SIGKILL", c.label,
                                 self.stop_timeout_s)
                    c.proc.kill()
                    c.proc.wait()
    def run(self, poll_s: float = 0.5) -> int:
        """Run until SIGTERM/SIGINT (forwarded) or a crash loop; returns an exit code."""
        def on_signal(signum: int, _frame: object) -> None:
            logger.info("signal %d: draining %d processes", signum, len(self.children))
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
