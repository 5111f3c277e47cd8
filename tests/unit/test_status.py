"""`pinfresh status`'s pipeline verdict from lag and the workers' progress reports."""

from __future__ import annotations

from streams.runtime.status import pipeline_state


def _rec(moved_at: float, at: float) -> dict[str, object]:
    return {"worker": "w", "committed": 5, "lag": 1, "moved_at": moved_at, "at": at}


def test_a_partition_with_lag_that_has_not_moved_is_stalled():
    now = 1000.0
    assert pipeline_state({0: 0, 1: 0}, {}, now, 60, True) == ("idle", [])
    # moving: reported lately, moved lately
    assert pipeline_state({0: 7}, {0: _rec(990, 995)}, now, 60, True) == ("ok", [])
    # reported lately but its offset stopped moving 2 minutes ago
    assert pipeline_state({0: 7, 1: 3}, {0: _rec(880, 995), 1: _rec(990, 995)}, now, 60,
                          True) == ("stalled", [0])
    # no report for longer than the limit: a frozen worker
    assert pipeline_state({0: 7}, {0: _rec(990, 900)}, now, 60, True) == ("stalled", [0])
    # never reported: just assigned while workers are alive; stalled when none runs
    assert pipeline_state({2: 1}, {}, now, 60, True) == ("ok", [])
    assert pipeline_state({2: 1}, {}, now, 60, False) == ("stalled", [2])
    # no lag: nothing to move, never stalled however old the report
    assert pipeline_state({0: 0}, {0: _rec(0, 0)}, now, 60, False) == ("idle", [])
