"""The retry helper: capped exponential backoff with jitter, injectable sleep and clock."""

from __future__ import annotations

import pytest

from streams.retry import Backoff, retry


class Boom(Exception):
    def __init__(self, retry_after: float = 0.0) -> None:
        super().__init__("boom")
        self.retry_after = retry_after


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter():
    b = Backoff(0.5, 4.0, jitter=0.0)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    lo = Backoff(1.0, 100.0, jitter=0.2, rng=lambda: 0.0)
    hi = Backoff(1.0, 100.0, jitter=0.2, rng=lambda: 1.0)
    assert lo.next_delay() == pytest.approx(0.8) and hi.next_delay() == pytest.approx(1.2)
    assert Backoff(1.0, 10.0, jitter=0.0).next_delay(at_least=7.0) == 7.0


async def test_retry_waits_then_succeeds_and_honours_retry_after():
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    calls = iter([Boom(), Boom(retry_after=3.0), "ok"])

    async def fn() -> str:
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v

    got = await retry(fn, retry_on=(Boom,), backoff=Backoff(0.1, 10.0, jitter=0.0, sleep=sleep))
    assert got == "ok" and waits == [0.1, 3.0]


async def test_retry_gives_up_after_attempts_or_deadline():
    async def sleep(s: float) -> None:
        now[0] += s

    now = [0.0]

    async def fail() -> None:
        raise Boom()

    with pytest.raises(Boom):
        await retry(fail, retry_on=(Boom,), attempts=3,
                    backoff=Backoff(1.0, 10.0, jitter=0.0, sleep=sleep))
    assert now[0] == 3.0  # two waits (1 + 2), then the third failure is final
    now[0] = 0.0
    with pytest.raises(Boom):
        await retry(fail, retry_on=(Boom,), deadline_s=5.0, clock=lambda: now[0],
                    backoff=Backoff(1.0, 10.0, jitter=0.0, sleep=sleep))
    assert now[0] == 3.0  # the next wait (4 s) would have ended past the deadline


async def test_other_errors_are_not_retried():
    async def sleep(s: float) -> None:
        raise AssertionError("must not wait")

    async def bad() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await retry(bad, retry_on=(Boom,), backoff=Backoff(1.0, 2.0, sleep=sleep))
