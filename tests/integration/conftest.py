"""Integration fixtures: the real embedded services, started once per session by
the same launcher the CLI uses, on free loopback ports; workers run as real
``pinfresh worker`` processes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from encoder.config import EncoderSettings
from encoder.engine import ImageEncoder
from store.milvus import MilvusStore
from store.redis import RedisCache
from streams.events import PinEvent
from streams.producer import ensure_topics, publish_events, publish_raw, read_dead_letters
from streams.runtime.catalog import CatalogItem, scan_directory, stamps_dir
from streams.runtime.processes import spawn_worker, wait_readable, wait_settled
from streams.runtime.stack import EmbeddedStack, StackInfo, StackSettings, free_port
from streams.settings import Settings

pytestmark = pytest.mark.integration
_counter = itertools.count()


#: Valkey masters of the cluster stack that tests marked ``cluster`` also run on.
CLUSTER_NODES = 3


def pytest_generate_tests(metafunc):
    """Tests marked ``cluster`` run on a single Valkey node and on a 3-master cluster."""
    if "stack" in metafunc.fixturenames:
        # in a parallel run every cluster test goes to one process (one cluster stack)
        kinds = ["node", pytest.param("cluster", marks=pytest.mark.xdist_group("cluster"))] \
            if metafunc.definition.get_closest_marker("cluster") else ["node"]
        metafunc.parametrize("stack", kinds, indirect=True, scope="session")


@asynccontextmanager
async def served_over_http(app) -> AsyncIterator[str]:
    """``app`` served by uvicorn (a thread, its own event loop) on a free loopback port;
    yields its URL once it listens, stops it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 60)


class Relay:
    """A TCP relay to a local service that can misbehave like a network or a server.

    `freeze`: nothing goes through either way until `thaw` (a frozen server: the
    client's requests wait unanswered). `drop_next_reply`: the next bytes the
    service sends are dropped and the client's connection is closed, after the
    service ran the command (a reset connection or a timeout, as a client sees it).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.dropped = 0
        self._drop = False
        self._open = asyncio.Event()
        self._open.set()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        self._open.clear()

    def thaw(self) -> None:
        self._open.set()

    def drop_next_reply(self) -> None:
        self._drop = True

    async def _serve(self, creader, cwriter) -> None:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(reader, writer, replies: bool) -> None:
            try:
                while data := await reader.read(1 << 16):
                    await self._open.wait()
                    if replies and self._drop:
                        self._drop = False
                        self.dropped += 1
                        cwriter.transport.abort()
                        swriter.close()
                        return
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(creader, swriter, False), pipe(sreader, cwriter, True))

    async def close(self) -> None:
        self._open.set()
        if self.server is not None:
            self.server.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, request) -> Iterator[StackInfo]:
    """The shared embedded stack; ``cluster``: Valkey as a cluster (``--redis-cluster 3``)."""
    kind = getattr(request, "param", "node")
    data = tmp_path_factory.mktemp(f"stack-{kind}")
    st = EmbeddedStack(StackSettings(
        data_dir=data, kafka_port=0, redis_port=0, milvus_port=0,
        redis_cluster=CLUSTER_NODES if kind == "cluster" else 0))
    info = st.start()  # on picked ports: started again on new ones if one was taken
    info.data_dir = data  # the fixture below hands it to pipelines
    yield info
    st.stop()


@pytest.fixture
def stack_dir(stack) -> Path:
    return stack.data_dir


@pytest.fixture(scope="session")
def stamps(tmp_path_factory) -> Path:
    try:
        return stamps_dir(tmp_path_factory.mktemp("tux"), install=False)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"sample catalog missing ({exc}): `make setup` installs it")


@pytest.fixture(scope="session")
def catalog(stamps) -> list[CatalogItem]:
    return scan_directory(stamps, prefix="tux", require_caption=True)


@pytest.fixture(scope="session")
def encoder() -> Iterator[ImageEncoder]:
    enc = ImageEncoder.load(EncoderSettings())
    yield enc
    enc.close()


class Pipeline:
    """One isolated deployment on the shared stack: own topics, group and namespaces."""

    def __init__(self, stack: StackInfo, stack_dir: Path, stamps: Path, logs: Path,
                 shared: bool = False) -> None:
        self.stack: EmbeddedStack | None = None
        #: on the session's shared stack: `close` drops what it made there
        self.shared = shared
        n = next(_counter)
        tag = f"{os.getpid()}_{n}"
        base = Settings()
        self.settings = base.with_stack(stack).model_copy(update={
            "kafka": base.kafka.model_copy(update={
                "bootstrap_servers": stack.kafka_bootstrap, "topic": f"pins-{tag}",
                "dlq_topic": f"pins-{tag}.dlq", "group_id": f"workers-{tag}",
                "partitions": 4}),
            "redis": base.redis.model_copy(update={"url": stack.redis_url,
                                                   "key_prefix": f"t{tag}"}),
            "milvus": base.milvus.model_copy(update={"uri": stack.milvus_uri,
                                                     "collection_prefix": f"c{tag}"}),
            "fetch": base.fetch.model_copy(update={"catalog_root": stamps}),
            "worker": base.worker.model_copy(update={"batch_size": 16, "batch_wait_s": 0.2,
                                                     "retry_backoff_s": 0.05}),
            "stack": base.stack.model_copy(update={"data_dir": stack_dir}),
        })
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.metrics_ports: dict[str, int] = {}
        self.cache = RedisCache(self.settings.redis)
        # the tests check what the workers wrote: read it as Strong
        self.milvus = MilvusStore(self.settings.milvus, read_consistency="Strong")

    async def setup(self) -> None:
        await ensure_topics(self.settings.kafka)

    def start_worker(self, name: str = "w1", crash_at: str = "", raise_for_pin: str = "",
                     **worker: object) -> subprocess.Popen[bytes]:
        """A worker process; ``crash_at``/``raise_for_pin`` start the fault-injection
        entry point (tests/integration/fault_worker.py) instead of `pinfresh worker`."""
        port = free_port()
        s = self.settings.model_copy(update={
            "worker": self.settings.worker.model_copy(update={"metrics_port": port, **worker})})
        command: tuple[str, ...] = ("-m", "streams.cli", "worker")
        if crash_at or raise_for_pin:
            command = ("-m", "tests.integration.fault_worker", "--crash-at", crash_at,
                       "--raise-for-pin", raise_for_pin)
        proc = spawn_worker(s, f"{self.settings.kafka.group_id}-{name}",
                            log_path=self.logs / f"{name}.log", command=command)
        self.procs[name] = proc
        self.metrics_ports[name] = port
        return proc

    def kill_worker(self, name: str = "w1", sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def metric(self, name: str, worker: str = "w1", labels: str = "",
               labels_prefix: bool = False, wait_s: float = 180) -> float:
        """A worker's metric; ``labels_prefix`` matches any labels (the first sample).

        Waits (up to ``wait_s``) for a worker that runs but does not serve its metrics
        yet: one just started serves them once its encoder is loaded (a test read a
        worker that had nothing to do before that, on a loaded machine).
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{self.metrics_ports[worker]}/metrics",
                                 timeout=5).text
                break
            except httpx.ConnectError:
                proc = self.procs.get(worker)
                if proc is None or proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        lab = r"(?:\{[^}]*\})?" if labels_prefix else re.escape(labels)
        pat = re.compile(rf"^{re.escape(name)}{lab}\s+([0-9.e+-]+)$", re.M)
        m = pat.search(text)
        return float(m.group(1)) if m else 0.0

    def wait_metric(self, name: str, at_least: float, timeout: float = 60, worker: str = "w1",
                    labels: str = "", labels_prefix: bool = False) -> float:
        deadline = time.monotonic() + timeout
        while True:
            try:
                v = self.metric(name, worker, labels, labels_prefix,
                                wait_s=max(0.0, deadline - time.monotonic()))
            except httpx.HTTPError:
                v = 0.0
            if v >= at_least or time.monotonic() > deadline:
                return v
            time.sleep(0.2)

    async def publish(self, events: Sequence[PinEvent]) -> None:
        await publish_events(self.settings.kafka, events, progress=False, stamp=False)

    async def publish_raw(self, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
        await publish_raw(self.settings.kafka, messages)

    async def wait(self, pin_ids: Sequence[str], timeout: float = 120,
                   min_pin_version: int | None = None) -> dict[str, dict[str, str]]:
        return await wait_readable(self.cache, pin_ids, timeout, min_pin_version=min_pin_version)

    async def settle(self, pin_ids: Sequence[str], timeout: float = 120):
        return await wait_settled(self.cache, self.settings.kafka, pin_ids, timeout)

    async def dead_letters(self):
        return await read_dead_letters(self.settings.kafka)

    def worker_log(self, name: str = "w1") -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    async def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=30)
        await self.cache.close()
        await self.milvus.close()
        if self.shared:
            await asyncio.to_thread(self._drop_collections)

    def _drop_collections(self) -> None:
        """Drop this pipeline's collections (their aliases first) from the shared Milvus:
        each loaded collection costs the server CPU (its channels' time ticks) for the
        rest of the session (about 0.1 % of a core each, measured)."""
        from store.milvus import connect

        prefix = f"{self.settings.milvus.collection_prefix}_"
        try:
            client = connect(self.settings.milvus.uri, timeout_s=30)
            try:
                for name in client.list_collections(timeout=30):
                    if name.startswith(prefix):
                        for alias in client.list_aliases(name, timeout=30).get("aliases", []):
                            client.drop_alias(alias, timeout=30)
                        client.drop_collection(name, timeout=30)
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - a test that stopped Milvus, say
            logging.getLogger(__name__).warning("collections %s* not dropped: %s", prefix, exc)


@contextmanager
def feeder_pool(settings: Settings, log_path: Path, feeders: int = 2) -> Iterator[FeederPool]:
    """`pinfresh worker --devices cpu --feeders N` as a subprocess; killed with its children
    after (a test that stops it on purpose calls `FeederPool.stop`)."""
    pool = FeederPool(settings, log_path, feeders)
    try:
        yield pool
    finally:
        pool.kill()


class FeederPool:
    """A running CPU pool: one encoder process and ``feeders`` feeders, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path, feeders: int) -> None:
        import sys

        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed by kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--devices", "cpu", "--feeders",
             str(feeders)], env=settings.child_environ(os.environ), stdout=self._log,
            stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def started(self, role: str) -> list[int]:
        """Pids of every ``encoder`` or ``feeder`` the pool started (restarts included)."""
        return [int(p) for p in re.findall(rf"{role} \d+ on cpu started \(pid (\d+)\)",
                                           self.log())]

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM (the pool drains its feeders) and its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            # its children now, not every pid its log names: a pid of a child that died
            # earlier may be another process's by now (pid_max is 32768 here, and four
            # test processes start many)
            children = _children(self.proc.pid)
            self.proc.kill()
            for pid in children:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


def _children(pid: int) -> list[int]:
    """The live children of ``pid`` (every thread's), from /proc."""
    out: list[int] = []
    with suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with suppress(OSError):
                out += [int(c) for c in
                        Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


@pytest.fixture
async def pipeline(stack, stack_dir, stamps, tmp_path) -> Iterator[Pipeline]:
    p = Pipeline(stack, stack_dir, stamps, tmp_path, shared=True)
    await p.setup()
    yield p
    await p.close()


@pytest.fixture
async def private_pipeline(tmp_path, stamps, request):
    """A pipeline on its own embedded stack, for tests that kill services.

    Parametrized indirectly with a number N > 0, Valkey runs as an N-master cluster.
    """
    data = tmp_path / "stack"
    st = EmbeddedStack(StackSettings(data_dir=data, kafka_port=0, redis_port=0, milvus_port=0,
                                     redis_cluster=getattr(request, "param", 0)))
    info = st.start()
    p = Pipeline(info, data, stamps, tmp_path)
    p.stack = st
    await p.setup()
    yield p
    await p.close()
    st.stop()
