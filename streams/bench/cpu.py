"""Where a stream process spends its CPU: ``/proc`` counters and py-spy stacks.

Two measurements, both of the process's own CPU time (never wall time, so
the stack sharing the machine's cores does not blur them):

* `CpuSampler` reads ``utime + stime`` of the stream processes under a
  ``pinfresh worker`` supervisor (its children, less the encoder process) and
  of each of their threads, so a benchmark can take the CPU spent between
  two moments of a drain and split it into the event-loop thread, helper
  threads (``asyncio.to_thread``: pymilvus calls, file reads, hashing) and
  gRPC's own C threads.
* `stage_shares` reads a ``py-spy record --gil --format raw`` profile and
  attributes each sample to a stage of the pipeline (`STAGES`) by the
  innermost frame that names one. ``--gil`` keeps only samples of the thread
  that holds the GIL, i.e. Python doing work, not threads waiting in epoll or
  in a C call. Work done outside the GIL (syscalls, gRPC's C threads, hashing
  inside hashlib) is not in these samples; the thread split above says how
  much of the CPU that is.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_HZ = os.sysconf("SC_CLK_TCK")

#: Stage names, in the order of a batch's path through a feeder.
STAGE_ORDER = ("consume (Kafka fetch, Faust stream)", "parse and validate",
               "lookups (tombstones, Redis and Milvus states)", "file read or HTTP", "hash",
               "encoder round trip", "Milvus upsert", "Redis write (claim, write, release)",
               "ack and commit", "progress and metrics", "plan and bookkeeping",
               "event loop and other")

#: (stage, frame prefixes): a sample belongs to the stage of its innermost frame whose
#: qualified name starts with one of the prefixes (checked in this order per frame).
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hash", ("Gather.fetch_all.<locals>.<lambda>",)),
    ("file read or HTTP", ("Fetcher.", "_fd_path", "Gather.fetch_all", "Gather._fetch_one",
                           "Gather._retry_fetch")),
    ("encoder round trip", ("RemoteEncoder.", "decode_response", "encode_request",
                            "RegistryVersions.", "Gather.records", "Gather._reuse",
                            "NullEncoder.", "null_vector")),
    ("Milvus upsert", ("MilvusStore.upsert", "MilvusStore._upsert_columns",
                       "MilvusStore._seal_after", "ClaimWriter._upsert_rows",
                       "ClaimWriter._claim_and_upsert", "MilvusClient.upsert")),
    ("Redis write (claim, write, release)", (
        "WriteOps.", "ClaimWriter.")),
    ("lookups (tombstones, Redis and Milvus states)", (
        "ReadOps.lookup", "MilvusStore.get_states", "MilvusStore._query",
        "MilvusClient.query", "LookUp.")),
    ("parse and validate", ("parse_event", "PinEvent.", "guess_pin_id", "parse ")),
    ("progress and metrics", ("RegistryOps.report_writer",
                              "RegistryOps.record_batch_stats",
                              "RegistryOps.report_progress", "Reporter.",
                              "_report_progress")),
    ("ack and commit", ("BatchesInFlight._ack_in_order", "Stream.ack", "Consumer.commit",
                        "Consumer._commit", "Consumer.ack", "AIOKafkaConsumer.commit",
                        "DrainingWorker._commit_acked")),
    ("plan and bookkeeping", ("plan_batch", "PinProcessor.", "BatchesInFlight.", "Batch.",
                              "BatchReport.", "split_reuse", "Lookups", "Context.",
                              "Letters.")),
)
#: Libraries whose frames, with no stage frame inside them, are the consumer's work.
_CONSUME_PATHS = ("aiokafka/", "faust/", "mode/", "kafka/")
#: Frames that run callbacks: what is below them in a stack is the work.
_RUNNERS = ("Handle._run ", "Thread.run ", "_worker ", "WorkerThread.run ")


def _stat(path: Path) -> tuple[str, float] | None:
    """``(comm, utime + stime seconds)`` from a ``stat`` file, or None if it is gone."""
    try:
        raw = path.read_text()
    except OSError:
        return None
    head, _, rest = raw.rpartition(")")
    f = rest.split()
    return head.partition("(")[2], (int(f[11]) + int(f[12])) / _HZ


def process_cpu(pid: int, reaped: bool = False) -> float | None:
    """Seconds of CPU ``pid`` has used (every thread, also those that ended).

    ``reaped``: plus that of its children that ended and were waited for.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw.rpartition(")")[2].split()
    return sum(int(x) for x in f[11:15 if reaped else 13]) / _HZ


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (of any of its threads), from ``/proc``."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for t in tasks:
        try:
            out += [int(c) for c in (t / "children").read_text().split()]
        except OSError:
            continue
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def thread_group(pid: int, tid: int, comm: str) -> str:
    """Which of a stream process's threads ``tid`` is (see the module docstring)."""
    if tid == pid:
        return "event loop thread"
    if comm.startswith(("grpc", "event_engine", "lifeguard", "resolver", "default-execut")):
        return "gRPC C threads"
    return "helper threads"


@dataclass
class CpuSampler:
    """CPU of the stream processes under ``root`` (a process, or a pool supervisor).

    `sample` is cheap (a few ``/proc`` reads); call it as often as progress is
    polled, then `between` gives the CPU spent between two sample times.
    """

    root: int
    skip: bytes = b"encoder\x00serve"  # the encoder process: not a stream process
    samples: list[tuple[float, dict[int, float], dict[str, float]]] = field(
        default_factory=list)
    pids: list[int] = field(default_factory=list)
    _looked: float = 0.0

    def _discover(self) -> list[int]:
        kids = [c for c in children(self.root) if self.skip not in _cmdline(c)]
        if kids:
            return kids
        # a process without stream children is the stream process itself (bare consumer)
        return [] if b"streams.cli" in _cmdline(self.root) else [self.root]

    def sample(self, at: float | None = None) -> None:
        """Record each stream process's CPU, and its threads' by group, now."""
        now = time.monotonic()
        if not self.pids or now - self._looked > 1.0:  # a pool starts its children one by one
            self.pids, self._looked = self._discover(), now
        procs: dict[int, float] = {}
        groups: dict[str, float] = collections.defaultdict(float)
        for pid in self.pids:
            total = process_cpu(pid)
            if total is None:
                continue
            procs[pid] = total
            seen = 0.0
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                tasks = []
            for t in tasks:
                got = _stat(t / "stat")
                if got is None:
                    continue
                groups[thread_group(pid, int(t.name), got[0])] += got[1]
                seen += got[1]
            groups["threads that ended"] += max(0.0, total - seen)
        self.samples.append((time.time() if at is None else at, procs, dict(groups)))

    def _at(self, t: float) -> tuple[dict[int, float], dict[str, float]]:
        """The first sample taken at or after ``t`` (the last one if none)."""
        for at, procs, groups in self.samples:
            if at >= t:
                return procs, groups
        return self.samples[-1][1], self.samples[-1][2]

    def between(self, t0: float, t1: float) -> tuple[float, dict[str, float]]:
        """CPU seconds of the stream processes between ``t0`` and ``t1``, and by thread group."""
        p0, g0 = self._at(t0)
        p1, g1 = self._at(t1)
        total = sum(p1[p] - p0[p] for p in p1 if p in p0)
        groups = {g: round(g1[g] - g0.get(g, 0.0), 3) for g in g1}
        return total, groups


def stage_of(frames: list[str]) -> str:
    """The stage of one stack (outermost frame first), by its innermost stage frame."""
    for frame in reversed(frames):
        name = frame.partition(" (")[0]
        for stage, prefixes in STAGES:
            if name.startswith(prefixes):
                return stage
    # library frames: only those the event loop (or a thread) called count, not the
    # frames that run the loop itself (mode's worker sits at the root of every stack)
    start = max((i for i, f in enumerate(frames) if f.startswith(_RUNNERS)), default=-1) + 1
    if not start:  # the loop between callbacks (select, scheduling)
        return "event loop and other"
    for frame in reversed(frames[start:]):
        where = frame.rpartition("(")[2]
        if where.startswith(_CONSUME_PATHS):
            return STAGE_ORDER[0]
    return "event loop and other"


def stage_shares(lines: Iterable[str]) -> tuple[dict[str, float], int]:
    """Share of the samples per stage (`STAGE_ORDER`), and the number of samples."""
    counts: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            continue
        counts[stage_of(stack.split(";"))] += int(n)
    total = sum(counts.values())
    return ({s: round(counts[s] / total, 4) for s in STAGE_ORDER if counts[s]} if total
            else {}), total


def py_spy(pid: int, out: Path, rate: int = 200) -> subprocess.Popen[bytes] | None:
    """Start ``py-spy record --gil`` on ``pid`` (stopped by SIGINT); None if py-spy is missing."""
    import shutil
    import sys

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-r", str(rate), "--gil",
                             "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_STAGE_LINE = re.compile(
    r'^pinfresh_stage_seconds_(sum|count)\{stage="([^"]+)"\} ([0-9.eE+-]+)$', re.M)


def stage_seconds(metrics_text: str) -> dict[str, tuple[float, float]]:
    """``stage -> (seconds, batches)`` from a process's ``pinfresh_stage_seconds`` histogram.

    The processor observes each batch's wall time per stage (waits included:
    a look-up that waits for a store is look-up time); the difference of two
    scrapes is what the batches between them spent.
    """
    out: dict[str, list[float]] = {}
    for kind, stage, value in _STAGE_LINE.findall(metrics_text):
        out.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def scrape_stages(ports: Iterable[int], host: str = "127.0.0.1"
                  ) -> dict[str, tuple[float, float]]:
    """`stage_seconds` summed over the processes serving metrics on ``ports``."""
    import urllib.request

    total: dict[str, list[float]] = {}
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            continue  # not serving yet (or gone): its batches are not counted
        for stage, (secs, n) in stage_seconds(text).items():
            acc = total.setdefault(stage, [0.0, 0.0])
            acc[0] += secs
            acc[1] += n
    return {k: (v[0], v[1]) for k, v in total.items()}


def stage_wall_ms(before: dict[str, tuple[float, float]],
                  after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean wall milliseconds per batch of each stage between two `scrape_stages`."""
    batches = after.get("total", (0.0, 0.0))[1] - before.get("total", (0.0, 0.0))[1]
    if batches <= 0:
        return {}
    return {stage: round(1000 * (secs - before.get(stage, (0.0, 0.0))[0]) / batches, 2)
            for stage, (secs, _) in sorted(after.items())}
