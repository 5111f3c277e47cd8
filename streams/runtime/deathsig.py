"""Children that die with their parent: ``PR_SET_PDEATHSIG`` as a ``preexec_fn``.

The embedded broker's wrapper gives Tansu SIGKILL when it dies; a worker pool
gives its encoder processes and feeders SIGTERM (they drain), so a pool's parent
SIGKILLed leaves no pool running beside the next one.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

__all__ = ["die_with"]

_PR_SET_PDEATHSIG = 1


def die_with(parent: int, sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` that has the child sent ``sig`` when ``parent`` dies.

    ``parent`` is the pid of the process starting the child (``os.getpid()``),
    from its main thread: the signal comes when the thread that forked ends.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child

    def run() -> None:  # pragma: no cover - runs in the child before exec
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return run
