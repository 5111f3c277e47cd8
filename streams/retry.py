"""The one retry helper: capped exponential backoff with jitter, time and sleep injectable.

Every retry loop of the stream uses it: store and encoder outages
(`PinProcessor._retry`), transient fetch errors, the isolation of an event
that raises, and registration at start-up. Tests pass a fake ``sleep`` (and
``clock``) so they run in no time and can check the waits.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Backoff:
    """Waits ``first_s``, then twice as long each time, at most ``max_s``, each +-``jitter``.

    Jitter spreads the retries of many workers that lost the same backend at
    the same moment. ``at_least`` (a server's ``Retry-After``) raises one wait.
    """

    first_s: float
    max_s: float
    jitter: float = 0.1
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: Callable[[], float] = random.random
    attempt: int = field(default=0, init=False)

    def next_delay(self, at_least: float = 0.0) -> float:
        """The next wait, and count the attempt."""
        # the exponent is capped: 2.0 ** 1024 overflows a float, and a retry "for ever"
        # must not raise after ~1,000 attempts (2.8 hours at the defaults)
        base = min(self.max_s, self.first_s * (2.0 ** min(self.attempt, 64)))
        self.attempt += 1
        spread = 1.0 + self.jitter * (2.0 * self.rng() - 1.0)
        return max(at_least, min(self.max_s, base * spread))

    async def wait(self, at_least: float = 0.0) -> float:
        """Sleep the next wait; returns how long."""
        delay = self.next_delay(at_least)
        await self.sleep(delay)
        return delay

    def reset(self) -> None:
        """Start again from ``first_s`` (after a success)."""
        self.attempt = 0


async def retry(
    fn: Callable[[], Awaitable[T]], *, retry_on: tuple[type[BaseException], ...],
    backoff: Backoff, attempts: int | None = None, deadline_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
) -> T:
    """Call ``fn`` until it returns; errors of ``retry_on`` wait and try again.

    Gives up (re-raising the last error) after ``attempts`` calls or when the
    next wait would end after ``deadline_s`` from the first call; without
    either it tries for ever (the stream's way to wait out an outage). An
    error's ``retry_after`` attribute, when it has one, lengthens the wait.
    ``on_retry(error, attempt, delay)`` is called before each wait.
    """
    start = clock()
    n = 0
    while True:
        try:
            return await fn()
        except retry_on as exc:
            n += 1
            delay = backoff.next_delay(float(getattr(exc, "retry_after", 0.0) or 0.0))
            if attempts is not None and n >= attempts:
                raise
            if deadline_s is not None and clock() + delay - start > deadline_s:
                raise
            if on_retry is not None:
                on_retry(exc, n, delay)
            await backoff.sleep(delay)
