"""`pinfresh status`: the pipeline's verdict, the workers' rows and the exit code."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from streams.runtime.status import (
    EXIT_DEGRADED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    exit_code,
    kafka_log_view,
    pipeline_state,
    render,
    worker_view,
)


def _rec(moved_at: float, at: float, worker: str = "w") -> dict[str, object]:
    return {"worker": worker, "committed": 5, "lag": 1, "moved_at": moved_at, "at": at}


def _live(*parts: int, started: float = 0.0) -> dict[str, dict[str, object]]:
    return {"w": {"at": 995.0, "partitions": list(parts), "started_at": started}}


def test_a_partition_with_lag_that_has_not_moved_is_stalled():
    now = 1000.0
    assert pipeline_state({0: 0, 1: 0}, {}, now, 60, _live()) == ("idle", [], "")
    # moving: reported lately, moved lately
    assert pipeline_state({0: 7}, {0: _rec(990, 995)}, now, 60, _live(0))[:2] == ("ok", [])
    # reported lately but its offset stopped moving 2 minutes ago
    assert pipeline_state({0: 7, 1: 3}, {0: _rec(880, 995), 1: _rec(990, 995)}, now, 60,
                          _live(0, 1))[:2] == ("stalled", [0])
    # no progress report for longer than the limit: a frozen worker
    assert pipeline_state({0: 7}, {0: _rec(990, 900)}, now, 60, _live(0))[:2] == \
        ("stalled", [0])
    # no lag: nothing to move, never stalled however old the report
    assert pipeline_state({0: 0}, {0: _rec(0, 0)}, now, 60, {})[:2] == ("idle", [])


def test_lag_with_no_running_worker_is_stalled_at_once():
    """No worker at all (reports 199 s old): stalled now, not 120 s after the lag."""
    now = 1000.0
    state, parts, why = pipeline_state({0: 785, 3: 2}, {0: _rec(999, 999)}, now, 120, {})
    assert (state, parts) == ("stalled", [0, 3]) and why == "no worker is running"


def test_lag_that_no_running_worker_holds_is_stalled_once_the_join_had_time():
    now = 1000.0
    # just started: a join takes seconds, the partition is not stalled yet
    assert pipeline_state({2: 5}, {}, now, 120, _live(0, started=990.0))[:2] == ("ok", [])
    # every worker runs for longer than a join takes and none holds it
    state, parts, why = pipeline_state({2: 5}, {}, now, 120, _live(0, started=100.0))
    assert (state, parts) == ("stalled", [2]) and "held by no running worker" in why
    # an older worker's report without its partitions: the progress records decide
    old = {"w": {"at": 995.0}}
    assert pipeline_state({2: 5}, {2: _rec(990, 995)}, now, 120, old)[:2] == ("ok", [])


def test_workers_that_stopped_are_not_shown_running_or_holding_partitions():
    now = 1000.0
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = socket.gethostname()
    writers = {
        "a": {"at": 995.0, "partitions": [0, 1], "host": host, "pid": os.getpid()},
        "idle": {"at": 992.0, "partitions": [], "host": host, "pid": os.getpid()},
        "killed": {"at": 990.0, "partitions": [2], "host": host, "pid": int(gone.stdout)},
        "silent": {"at": 900.0, "partitions": [3], "host": "elsewhere", "pid": 1},
        "ancient": {"at": now - 4000, "partitions": [4]},  # an hour gone: forgotten
        "stuck": {"at": 999.0, "partitions": [], "unassigned_since": 900.0},
        "backfill:v2:0of1": {"at": 999.0},
    }
    rows, live, forget = worker_view(writers, {}, now, fresh_s=40, stuck_s=60)
    assert set(rows) == {"a", "idle", "silent", "stuck"}
    assert rows["a"] == {"state": "ok", "last_report_s_ago": 5.0, "writes": [],
                         "partitions": [0, 1]}
    assert rows["idle"]["state"] == "ok"  # idle workers report every interval too
    assert rows["silent"] == {"state": "down: no report for 100 s", "last_report_s_ago": 100.0,
                              "writes": [], "partitions": []}
    assert rows["stuck"]["state"].startswith("stuck: no partition for 100 s")
    assert set(live) == {"a", "idle", "stuck"}
    assert sorted(forget) == ["ancient", "killed"]


def test_the_exit_code_says_ok_degraded_or_unreachable():
    ok = {"health": {"kafka": "ok", "redis": "ok", "milvus": "ok"}, "pipeline": "ok",
          "workers": {"w": {"state": "ok"}}, "encoders": {}}
    assert exit_code(ok) == EXIT_OK == 0
    assert exit_code({**ok, "pipeline": "idle"}) == EXIT_OK
    assert exit_code({**ok, "pipeline": "stalled"}) == EXIT_DEGRADED == 1
    assert exit_code({**ok, "encoders": {"e": {"state": "down: gone"}}}) == EXIT_DEGRADED
    assert exit_code({**ok, "health": {"kafka": "ok", "redis": "down: refused",
                                       "milvus": "down: x"}}) == EXIT_UNREACHABLE == 3


def test_status_shows_the_broker_logs_retention_and_what_it_lost(tmp_path):
    """The disk log's policy, a forced removal (groups behind) and a torn batch reach
    the status view from the broker wrapper's reports; no report: no section."""
    import json

    from rich.console import Console

    assert kafka_log_view(tmp_path) is None
    (tmp_path / "retention.json").write_text(json.dumps({
        "policy": {"max_age_s": 7 * 24 * 3600, "max_bytes": 1 << 30, "max_batches": 200_000},
        "checked_at": 1.0, "partitions": {"pins/0": {"batches": 3}},
        "forced": [{"topic": "pins", "partition": 0, "from": 0, "to": 40,
                    "groups_behind": {"pinfresh": 5}, "at": 1.0}]}))
    (tmp_path / "quarantine.jsonl").write_text(json.dumps({
        "key": "tansu/clusters/c/topics/pins/partitions/0000000003/records/"
               "00000000000000000070.batch", "reason": "its CRC-32C does not match",
        "at": 2.0, "base_offset": 70}) + "\n" + '{"key": "torn by a cr')
    view = kafka_log_view(tmp_path)
    assert view is not None
    assert view["retention"] == "168 h, 1024 MiB, 200,000 batches per partition"
    assert view["partitions"] == {"pins/0": {"batches": 3}}
    assert [q["base_offset"] for q in view["quarantined"]] == [70]
    st = {"health": {}, "stack": {"supervisor": "running (pid 1)", "restarts": {},
                                  "held_down": [], "kafka_log": view}}
    console = Console(width=200, record=True)
    console.print(render(st))
    text = console.export_text()
    assert "pins[0] offsets 0 to 39 (groups pinfresh)" in text
    assert "from offset 70 (its CRC-32C does not match)" in text
