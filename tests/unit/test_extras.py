"""Each extra runs what the README says it runs, with every module it does not bring
blocked (a partial install, simulated in a subprocess); a missing part is one line
naming the extra that brings it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streams.entry import EXTRA_OF

#: what an install with each extra has (extras bring the ones below them)
CLOSURE = {"client": set(), "server": {"server"}, "encoder": {"server", "encoder"},
           "worker": {"server", "encoder", "worker"}}

BLOCK = """
import sys
blocked = set(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
def pinfresh(*args):
    import streams.entry
    sys.argv = ["pinfresh", *args]
    try:
        streams.entry.main()
    except SystemExit as exc:
        return exc.code or 0
    return 0
"""

CASES = {
    "client": """
import store.client, streams.settings
streams.settings.Settings()
assert pinfresh("status") == 2
""",
    "server": """
import store.api, store.lifecycle, uvicorn
for args in (["--help"], ["serve", "--help"], ["versions", "list", "--help"],
             ["get", "--help"]):
    assert pinfresh(*args) == 0, args
""",
    "encoder": """
import encoder.server, encoder.engine
assert pinfresh("encoder", "serve", "--help") == 0
""",
    "worker": """
import streams.app, streams.runtime.pool, streams.runtime.status, streams.refresh
for args in (["worker", "--help"], ["backfill", "--help"], ["status", "--help"]):
    assert pinfresh(*args) == 0, args
""",
}


@pytest.mark.parametrize("extra", list(CASES))
def test_an_install_with_one_extra_runs_its_commands(extra):
    blocked = sorted(m for m, e in EXTRA_OF.items() if e not in CLOSURE[extra])
    run = subprocess.run([sys.executable, "-c", BLOCK + CASES[extra], ",".join(blocked)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    if extra == "client":  # the command is not installed: one line naming the extra
        assert "install pinfresh[server]" in run.stderr
