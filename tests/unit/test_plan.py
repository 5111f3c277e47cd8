"""The batch planner (streams.plan), exhaustively with hypothesis and by example."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from store.base import PinState
from streams.events import PinEvent
from streams.plan import Lookups, Skip, plan_batch, split_reuse

PINS = ["a", "b", "c", "d"]
VERSIONS = ["live", "next"]


def _event(pin: str, op: str, version: int, reencode: bool) -> PinEvent:
    if op == "delete":
        return PinEvent(op="delete", pin_id=pin, version=version, event_time=1.0)
    return PinEvent(op="upsert", pin_id=pin, version=version, image=f"/img/{pin}-{version}",
                    event_time=1.0, reencode=reencode)


state = st.one_of(st.none(), st.tuples(st.integers(0, 6), st.sampled_from(["h1", "h2"])))


@st.composite
def scenarios(draw):
    pins = draw(st.lists(st.sampled_from(PINS), unique=True, max_size=4))
    events = [_event(p, draw(st.sampled_from(["upsert", "delete"])), draw(st.integers(0, 6)),
                     draw(st.booleans())) for p in pins]
    tombs = {p: t for p in PINS if (t := draw(st.one_of(st.none(), st.integers(0, 6))))
             is not None}
    stores = {}
    for side in ("milvus", "redis"):
        stores[side] = {}
        for v in VERSIONS:
            found = {}
            for p in PINS:
                s = draw(state)
                if s is not None:
                    found[p] = PinState(p, s[0], s[1])
            stores[side][v] = found
    return events, Lookups(tombs, stores["milvus"], stores["redis"])


@settings(max_examples=1500, deadline=None)
@given(scenarios())
def test_plan_never_moves_a_pin_backwards_and_accounts_for_every_event(case):
    events, lk = case
    plan = plan_batch(events, VERSIONS, lk)
    primary = VERSIONS[0]
    deleted = {e.pin_id for e in plan.deletes}
    for ev in events:
        p, tomb = ev.pin_id, lk.tombs.get(ev.pin_id, -1)
        fetched_in = [v for v in VERSIONS if ev in plan.work[v].fetch]
        if ev.op == "delete":
            assert not fetched_in
            # applied xor skipped, and never when something newer is known
            assert (p in deleted) != (p in plan.skipped)
            m0, r0 = lk.milvus[primary].get(p), lk.redis[primary].get(p)
            newer = tomb > ev.version or any(
                s is not None and s.pin_version > ev.version for s in (m0, r0))
            if newer:
                assert plan.skipped[p] is Skip.STALE
            continue
        assert p not in deleted
        # an upsert is fetched for a version only if nothing there is as new, or it re-encodes
        for v in fetched_in:
            ms, rs = lk.milvus[v].get(p), lk.redis[v].get(p)
            assert tomb < ev.version
            assert ms is None or ms.pin_version < ev.version or (
                ms.pin_version == ev.version and ev.reencode)
            assert rs is None or rs.pin_version <= ev.version
        # the primary either fetches it or says why not, never both
        assert (primary in fetched_in) != (p in plan.skipped)
        if p in plan.skipped and plan.skipped[p] is Skip.REDELIVERY:
            assert lk.milvus[primary][p].pin_version == ev.version and not ev.reencode
        # an upsert older than its tombstone is fetched nowhere
        if tomb >= ev.version:
            assert not fetched_in and plan.skipped[p] is Skip.STALE
    for v in VERSIONS:
        for p in plan.work[v].repair:
            ms, rs = lk.milvus[v][p], lk.redis[v].get(p)
            ev = next(e for e in events if e.pin_id == p)
            # repairs copy a Milvus record at least as new as the event into a Redis that
            # differs from it and is not newer; never a tombstoned event's pin
            assert ev.op == "upsert" and ev not in plan.work[v].fetch
            assert ms.pin_version >= ev.version > lk.tombs.get(p, -1)
            assert rs != ms and (rs is None or rs.pin_version <= ms.pin_version)
    fetched = [e.pin_id for e in plan.fetches()]
    assert len(fetched) == len(set(fetched))
    assert set(fetched) == {e.pin_id for e in events
                            if any(e in plan.work[v].fetch for v in VERSIONS)}


def test_redelivered_delete_is_applied_again_while_the_pin_is_still_stored():
    """A worker can die between the tombstone and the store deletes: the delete's
    redelivery (tombstone == version) must finish the job, not skip it."""
    ev = _event("a", "delete", 3, False)
    lk = Lookups({"a": 3}, {"live": {"a": PinState("a", 2, "h")}, "next": {}},
                 {"live": {}, "next": {}})
    assert plan_batch([ev], ["live", "next"], lk).deletes == (ev,)
    done = Lookups({"a": 3}, {"live": {}, "next": {}}, {"live": {}, "next": {}})
    plan = plan_batch([ev], ["live", "next"], done)
    assert plan.deletes == () and plan.skipped == {"a": Skip.REDELIVERY}


def test_redis_newer_than_a_lagging_milvus_read_makes_the_event_stale():
    ev = _event("a", "upsert", 4, False)
    lk = Lookups({}, {"live": {"a": PinState("a", 3, "h")}}, {"live": {"a": PinState("a", 5, "h")}})
    plan = plan_batch([ev], ["live"], lk)
    assert plan.work["live"].fetch == () and plan.skipped == {"a": Skip.STALE}
    assert plan.work["live"].repair == ()  # never move Redis back to Milvus's older record


def test_new_version_fetched_where_missing_repaired_where_redis_lost_it():
    ev = _event("a", "upsert", 4, False)
    lk = Lookups({}, {"live": {"a": PinState("a", 4, "h")}, "next": {}},
                 {"live": {}, "next": {}})
    plan = plan_batch([ev], ["live", "next"], lk)
    assert plan.skipped == {"a": Skip.REDELIVERY}
    assert plan.work["live"].repair == ("a",) and plan.work["next"].fetch == (ev,)


def test_split_reuse_by_content_hash_unless_reencode():
    a, b, c = (_event(p, "upsert", 2, False) for p in "abc")
    r = _event("d", "upsert", 2, True)
    stored = {p: PinState(p, 1, "same") for p in "abcd"}
    encode, reuse = split_reuse([a, b, c, r], {"a": "same", "b": "other", "d": "same"}, stored)
    assert reuse == [a] and encode == [b, r]  # c was not fetched
