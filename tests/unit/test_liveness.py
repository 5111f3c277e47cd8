"""The worker's liveness: what its /healthz tells the pod's probe."""

from __future__ import annotations

import urllib.error
import urllib.request

from streams.metrics import Liveness, serve_metrics
from streams.runtime.stack import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_liveness_fails_on_a_stuck_partition_or_a_silent_loop():
    clock = Clock()
    live = Liveness(stall_s=900, beat_s=60, clock=clock, outage=lambda: None)
    assert live.check() == (True, "starting")  # loading the model, joining the group
    live.beat(0.0)
    assert live.check()[0]
    live.beat(899.0)
    assert live.check()[0]
    live.beat(901.0)  # a partition with lag has not moved for 15 min: a hung encoder
    alive, why = live.check()
    assert not alive and "has not moved for 901 s" in why
    live.beat(0.0)  # it moved again
    assert live.check()[0]
    clock.now += 61  # the progress loop stopped beating: the event loop is blocked
    alive, why = live.check()
    assert not alive and "no progress report for 61 s" in why


def test_a_stall_while_waiting_out_an_outage_passes():
    clock = Clock()
    outage: list[float] = []
    live = Liveness(stall_s=900, beat_s=60, clock=clock,
                    outage=lambda: outage[0] if outage else None)
    live.beat(1000.0)
    assert not live.check()[0]
    outage.append(clock.now - 5)  # the processor retried a store 5 s ago
    alive, why = live.check()
    assert alive and "waiting out an outage" in why
    clock.now += 61  # ... and then not any more, still stalled
    live.beat(1061.0)
    assert not live.check()[0]


def test_metrics_port_serves_healthz_and_metrics():
    clock = Clock()
    live = Liveness(stall_s=10, beat_s=60, clock=clock, outage=lambda: None)
    port = serve_metrics("127.0.0.1", free_port(), live)
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(base + "/healthz", timeout=30) as r:
        assert r.status == 200 and r.read() == b"starting\n"
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        assert b"pinfresh_partition_stalled_seconds" in r.read()
    live.beat(11.0)
    try:
        urllib.request.urlopen(base + "/healthz", timeout=30)
        raise AssertionError("expected 503")
    except urllib.error.HTTPError as err:
        assert err.code == 503 and b"has not moved for 11 s" in err.read()


def test_a_worker_stuck_outside_its_group_fails_and_says_so(caplog):
    """Holding no partition while partitions with lag have no live worker, for longer
    than a join takes: logged once, /healthz fails; holding one again clears it. A
    surplus member (every lagging partition is held by others) is fine."""
    from streams.app import Membership

    clock = Clock()
    member = Membership(limit_s=60, clock=clock)
    live = Liveness(stall_s=900, beat_s=60, clock=clock, outage=lambda: None)
    live.stuck_limit_s = 60
    member.observe(set(), set())  # nothing behind: an idle surplus member
    assert member.stuck_s() == 0 and member.report()["unassigned_since"] is None
    member.observe(set(), {3, 5})
    clock.now += 30
    member.observe(set(), {3, 5})
    live.beat(0.0, member.stuck_s())
    assert live.check()[0] and not caplog.records  # within a join's time
    clock.now += 31
    member.observe(set(), {3, 5})
    member.observe(set(), {3, 5})
    live.beat(0.0, member.stuck_s())
    alive, why = live.check()
    assert not alive and "held no partition for 61 s" in why
    assert [r.levelname for r in caplog.records] == ["ERROR"]  # said once
    assert "partitions [3, 5] have lag and no live worker" in caplog.records[0].getMessage()
    assert member.report()["unassigned_since"] == 1000.0
    member.observe({3}, {5})  # it holds a partition again
    live.beat(0.0, member.stuck_s())
    assert live.check()[0] and member.report()["partitions"] == [3]
