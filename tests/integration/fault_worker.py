"""A `pinfresh worker` with fault-injection hooks; only the fault tests start it.

Production settings hold no test switches: crash points and bugs come in
through `streams.processor.ProcessorHooks`, wired here.

    python -m tests.integration.fault_worker --crash-at after_milvus
    python -m tests.integration.fault_worker --raise-for-pin bug-pin
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Sequence

from streams.app import run_worker
from streams.events import PinEvent
from streams.processor import ProcessorHooks
from streams.runtime.logconf import configure_logging
from streams.runtime.processes import register_worker
from streams.settings import build_settings

logger = logging.getLogger("fault_worker")


class FaultHooks(ProcessorHooks):
    """SIGKILL the worker at ``crash_at`` of its first batch with work, or raise as a bug
    would for every batch that holds ``raise_for_pin``."""

    def __init__(self, crash_at: str = "", raise_for_pin: str = "") -> None:
        self.crash_at, self.raise_for_pin = crash_at, raise_for_pin

    def before_batch(self, events: Sequence[PinEvent]) -> None:
        if self.raise_for_pin and any(e.pin_id == self.raise_for_pin for e in events):
            raise RuntimeError(f"fault injection: processing pin {self.raise_for_pin} raises")

    def at(self, point: str) -> None:
        if point == self.crash_at:
            logger.warning("fault injection: killing this worker %s", point)
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crash-at", default="", choices=["", "after_encode", "after_milvus",
                                                       "after_redis"])
    ap.add_argument("--raise-for-pin", default="")
    args = ap.parse_args()
    settings = build_settings(os.environ)
    configure_logging(settings.log_level, settings.log_json)
    run_worker(settings, on_exit=register_worker(settings),
               hooks=FaultHooks(args.crash_at, args.raise_for_pin))


if __name__ == "__main__":
    main()
