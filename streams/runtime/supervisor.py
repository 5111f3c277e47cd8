"""The embedded stack's supervisor: a service that exits is started again.

``python -m streams.runtime.supervisor --data DIR`` is started by
`streams.runtime.stack.EmbeddedStack.start` (``pinfresh up``) and runs until the
stack is stopped. Once a second it looks at every service recorded in
``DIR/stack.json``; one whose process is gone, and that nobody holds down on
purpose (a fault test's `EmbeddedStack.kill_service`), is started again on its
ports and data, under the stack's lock, with backoff: at once the first time,
then 2, 4, ... up to 60 s between tries while it keeps failing; a service that
stays up for `HEALTHY_S` starts from the beginning again. Each restart is
logged (``DIR/logs/supervisor.log``) and counted in ``stack.json``, which
`pinfresh status` shows: a Milvus server that panicked after a long SIGSTOP,
a broker or a Valkey node that crashed, come back without an operator.

It exits when ``stack.json`` is gone (``pinfresh down``) or names another
supervisor, and on SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from encoder.errors import StackError
from streams.runtime.stack import EmbeddedStack
from streams.runtime.stackstate import StackFile, pid_alive, service_of
from streams.settings import Settings

logger = logging.getLogger("streams.runtime.supervisor")

#: Longest wait between two restarts of a service that keeps failing.
MAX_BACKOFF_S = 60.0
#: A restarted service that stays up this long is backed off from the start again.
HEALTHY_S = 300.0


class Supervisor:
    """Watches one data dir's stack (see the module docstring)."""

    def __init__(self, data_dir: Path, poll_s: float = 1.0) -> None:
        self.file = StackFile(data_dir.resolve())
        self.data_dir = data_dir.resolve()
        self.poll_s = poll_s
        self.failures: dict[str, int] = {}
        self.next_try: dict[str, float] = {}
        self.up_since: dict[str, float] = {}
        self.stopping = False

    def run(self) -> int:
        """Watch until the stack is stopped; the exit status."""
        logger.info("supervising the stack of %s (pid %d)", self.data_dir, os.getpid())
        while not self.stopping:
            info = self.file.read()
            if info is None or info.supervisor_pid != os.getpid():
                logger.info("the stack was stopped (or another supervisor took over): exiting")
                return 0
            now = time.monotonic()
            for svc in info.services():
                if svc.name in info.held:
                    continue
                if pid_alive(svc.pid, svc.started):
                    since = self.up_since.setdefault(svc.name, now)
                    if now - since > HEALTHY_S:
                        self.failures.pop(svc.name, None)
                    continue
                self.up_since.pop(svc.name, None)
                if now >= self.next_try.get(svc.name, 0.0):
                    self.restart(svc.name)
            time.sleep(self.poll_s)
        return 0

    def restart(self, name: str) -> None:
        """Start ``name`` again unless it came back or was held meanwhile; record it."""
        settings = Settings()
        with self.file.lock():
            info = self.file.read()
            if info is None or info.supervisor_pid != os.getpid():
                return
            service, node = service_of(name)
            svc = info.service(service, node)
            if name in info.held or pid_alive(svc.pid, svc.started):
                return
            n = self.failures.get(name, 0)
            logger.warning("%s (pid %d) exited: starting it again (restart %d of this run; "
                           "its log: %s)", name, svc.pid, info.restarts.get(name, {}).get(
                               "count", 0) + 1, svc.log)
            stack = EmbeddedStack(settings.stack.model_copy(update={
                "data_dir": self.data_dir, "host": info.host, "milvus": info.milvus_engine,
                "kafka_log": info.kafka_log}))
            error = None
            try:
                info = stack._start_service(service, node)  # noqa: SLF001 - under our lock
                logger.info("%s is back (pid %d)", name, info.service(service, node).pid)
            except StackError as exc:
                error = str(exc)[:500]
                info = self.file.read() or info
                logger.error("%s did not start again: %s", name, exc)
            # the n-th restart since it last stayed up for HEALTHY_S: the next one waits
            # 1, 2, 4, ... s (a service that keeps dying is not restarted in a tight loop)
            self.failures[name] = n + 1
            self.next_try[name] = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** n)
            rec = info.restarts.setdefault(name, {"count": 0})
            rec.update(count=int(rec.get("count", 0)) + 1, last_at=time.time(),
                       last_error=error)
            self.file.write(info)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m streams.runtime.supervisor --data DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the stack's data dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sup = Supervisor(args.data)

    def stop(_signum: int, _frame: object) -> None:
        sup.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
