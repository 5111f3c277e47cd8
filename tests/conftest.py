"""Shared fixtures: the faults report, one row per case (``make faults``).

A test marked ``faults`` takes the ``fault_case`` fixture and adds one row per
case it checks (each hostile file, malformed event kind, URL guard, kill
point, outage), with what was expected and what was observed. The rows of a
test that fails are kept with ``ok: false`` plus a row naming the failure.
``PINFRESH_FAULTS_REPORT=path`` writes them as JSON and prints the table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

_ROWS: list[dict[str, object]] = []


class FaultRows:
    """The rows one test adds to the faults report."""

    def __init__(self, test: str) -> None:
        self.test = test
        self.rows: list[dict[str, object]] = []

    def add(self, case: str, expected: str, observed: str, ok: bool = True) -> None:
        """One case: what should happen, what did, and whether they agree."""
        self.rows.append({"test": self.test, "case": case, "expected": expected,
                          "observed": observed, "ok": bool(ok)})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def fault_case(request):
    rows = FaultRows(request.node.name)
    yield rows
    rep = getattr(request.node, "rep_call", None)
    passed = bool(rep and rep.passed)
    if not passed:
        for r in rows.rows:
            r["ok"] = False
        why = str(rep.longrepr).splitlines()[-1][:300] if rep is not None else "not run"
        rows.add(request.node.name, "test passes", f"FAILED: {why}", ok=False)
    if not rows.rows:
        rows.add(request.node.name, "test passes", "passed", ok=passed)
    _ROWS.extend(rows.rows)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (minutes each) run first, ``long(N)`` (about N minutes)
    before ``long``: in a parallel run (``make test``, pytest-xdist) the run then does
    not end with one worker still on one of them. After pytest's own ordering
    (trylast), which it keeps otherwise."""
    def weight(item) -> float:
        mark = item.get_closest_marker("long")
        if mark is None or "[cluster" in item.nodeid:  # cluster ones stay with their stack
            return 0
        return -float(mark.args[0] if mark.args else mark.kwargs.get("minutes", 1))

    items.sort(key=weight)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist: a worker process's rows reach the controller, which writes them."""
    _ROWS.extend(json.loads(getattr(node, "workeroutput", {}).get("fault_rows", "[]")))


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: hand them over
        session.config.workeroutput["fault_rows"] = json.dumps(_ROWS)
        return
    path = os.environ.get("PINFRESH_FAULTS_REPORT")
    if not path or not _ROWS:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_ROWS, indent=2) + "\n")
    width = min(48, max(len(str(r["case"])) for r in _ROWS))
    lines = [f"{'case'.ljust(width)}  ok   observed"]
    for r in _ROWS:
        lines.append(f"{str(r['case'])[:width].ljust(width)}  {'yes' if r['ok'] else 'NO '}  "
                     f"{str(r['observed'])[:110]}")
    n_ok = sum(bool(r["ok"]) for r in _ROWS)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write_line("\n" + "\n".join(lines) + f"\n{n_ok}/{len(_ROWS)} cases ok; wrote {path}")
