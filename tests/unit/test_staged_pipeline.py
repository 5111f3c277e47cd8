"""The staged batch pipeline: dispatch rules, backpressure, overlap, failure isolation.

Fake stages only (no model), so these run in milliseconds; nothing here
asserts a speed, only orderings that must hold.
"""

from __future__ import annotations

import threading
import time

import pytest

from encoder.pipeline import StagedPipeline


def make(batch_size=4, max_wait_s=0.05, depth=1, prepare=None, forward=None):
    seen: list[list[int]] = []

    def prep(items):
        seen.append(list(items))
        return prepare(items) if prepare else list(items)

    def fwd(p):
        return forward(p) if forward else p

    return StagedPipeline(prep, fwd, lambda p: [x * 10 for x in p], batch_size=batch_size,
                          max_wait_s=max_wait_s, depth=depth), seen


def test_results_in_order_and_full_batches():
    pipe, seen = make(batch_size=4, max_wait_s=5.0)
    try:
        assert pipe.map(range(10)) == [x * 10 for x in range(10)]
        assert [len(b) for b in seen] == [4, 4, 2]  # the tail went on flush, not after 5 s
        assert pipe.stats.full_batches == 2
    finally:
        pipe.close()


def test_partial_batch_dispatches_when_the_wait_expires():
    pipe, seen = make(batch_size=64, max_wait_s=0.2)
    try:
        t = time.monotonic()
        futs = [pipe.submit(i) for i in range(3)]  # no flush
        assert [f.result(timeout=10) for f in futs] == [0, 10, 20]
        assert time.monotonic() - t >= 0.2  # it did wait for more items first
        assert seen == [[0, 1, 2]]
        assert pipe.stats.waits_s[0] >= 0.2
    finally:
        pipe.close()


def test_a_full_batch_does_not_wait():
    pipe, seen = make(batch_size=4, max_wait_s=60.0)
    try:
        futs = [pipe.submit(i) for i in range(4)]
        assert [f.result(timeout=10) for f in futs] == [0, 10, 20, 30]
        assert pipe.stats.waits_s[0] < 30
    finally:
        pipe.close()


def test_backpressure_bounds_items_in_flight():
    gate = threading.Event()

    def slow_forward(p):
        gate.wait(10)
        return p

    bs, depth = 4, 1
    pipe, _ = make(batch_size=bs, max_wait_s=0.0, depth=depth, forward=slow_forward)
    submitted = []

    def producer():
        for i in range(200):
            submitted.append(pipe.submit(i))

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    time.sleep(0.5)
    stuck_at = len(submitted)
    bound = bs * (3 * depth + 6)
    assert stuck_at <= bound, f"{stuck_at} items accepted while the forward stage was blocked"
    assert t.is_alive()  # the producer is blocked in submit, not done
    gate.set()
    t.join(10)
    assert [f.result(timeout=10) for f in submitted] == [i * 10 for i in range(200)]
    assert pipe.stats.max_in_flight <= bound + 1
    pipe.close()


def test_prepare_of_the_next_batch_overlaps_the_forward_of_this_one():
    second_prepare_started = threading.Event()
    calls = []

    def prep(items):
        calls.append(items[0])
        if items[0] == 4:
            second_prepare_started.set()
        return items

    def fwd(p):
        if p[0] == 0:
            # would deadlock (and fail) if the stages ran one batch at a time
            assert second_prepare_started.wait(5), "batch 2 was not prepared during forward 1"
        return p

    pipe = StagedPipeline(prep, fwd, lambda p: p, batch_size=4, max_wait_s=5.0, depth=2)
    try:
        assert pipe.map(range(8)) == list(range(8))
    finally:
        pipe.close()


def test_a_failing_stage_fails_only_its_batch():
    def fwd(p):
        if 5 in p:
            raise RuntimeError("device fell over")
        return p

    pipe, _ = make(batch_size=4, max_wait_s=5.0, forward=fwd)
    try:
        futs = [pipe.submit(i) for i in range(12)]
        pipe.flush()
        for i, f in enumerate(futs):
            if 4 <= i < 8:
                with pytest.raises(RuntimeError, match="device fell over"):
                    f.result(timeout=10)
            else:
                assert f.result(timeout=10) == i * 10
        assert pipe.map([20]) == [200]  # still running
    finally:
        pipe.close()


def test_concurrent_callers_share_batches():
    pipe, seen = make(batch_size=8, max_wait_s=0.05)
    out: dict[int, list[int]] = {}

    def call(k):
        out[k] = pipe.map(range(k * 100, k * 100 + 10))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    pipe.close()
    for k in range(4):
        assert out[k] == [x * 10 for x in range(k * 100, k * 100 + 10)]
    assert sum(len(b) for b in seen) == 40


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        StagedPipeline(list, list, list, batch_size=0, max_wait_s=0.1)


def test_items_queued_behind_a_busy_stage_still_travel_in_full_batches():
    gate = threading.Event()
    sizes = []

    def prep(items):
        sizes.append(len(items))
        gate.wait(10)  # a slow decoder: the inbox fills meanwhile
        return items

    pipe = StagedPipeline(prep, lambda p: p, lambda p: p, batch_size=8, max_wait_s=0.001,
                          depth=1)
    try:
        done = []
        t = threading.Thread(target=lambda: done.append(pipe.map(range(64))))
        t.start()
        time.sleep(0.3)  # every queued item is now far past max_wait_s
        gate.set()
        t.join(10)
        assert done == [list(range(64))]
        # the first batch may go out alone; later ones fill up from the backlog
        assert sizes[0] >= 1 and all(s == 8 for s in sizes[2:-1]), sizes
        assert sum(sizes) == 64
    finally:
        pipe.close()
