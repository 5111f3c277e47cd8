"""The Lua scripts of the Redis cache: one file each under ``store/redis/lua``, by SHA.

Every write of a pin is one script, atomic on the pin's slot (`RedisCache`
calls them; docs/integration.md, "Concurrent writers", states the protocol).
Each file says at its top what its KEYS and ARGV are, by the key names of
`store.redis.keys`. A file whose first line is ``-- uses: lib.lua`` gets the
shared functions of ``lib.lua`` in front of it; such a per-pin script also has
a batch form (`Script.batch_text`): its body as a function, driven once per
pin by ``batch-driver.lua``, so one EVALSHA on a single node runs a whole
batch. Scripts are read once, when this module is imported, and sent as
EVALSHA (the client loads one the server does not know and runs it again).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ALL", "BATCH_CALLS", "Script", "batch_call", "load", "sha1"]

_DIR = Path(__file__).with_name("lua")
_USES_LIB = "-- uses: lib.lua"
#: Calls of one script per EVALSHA on a single node (`store.redis.client.Client._eval_many`).
BATCH_CALLS = 256


@functools.cache
def sha1(text: str) -> str:
    """The SHA-1 a server names a script by (EVALSHA)."""
    return hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis's name for it


@dataclass(frozen=True)
class Script:
    """One script: its file's name and the text the server runs."""

    name: str
    text: str
    #: its body alone (after lib.lua), for the batch form; None for a standalone script
    body: str | None = None

    @property
    def sha(self) -> str:
        """EVALSHA's name for it."""
        return sha1(self.text)

    @functools.cached_property
    def batch_text(self) -> str:
        """The batch form: the body as ``one(KEYS, ARGV)`` run once per call (a node only)."""
        if self.body is None:
            raise ValueError(f"{self.name} is not a per-pin script: it has no batch form")
        return (_read("lib") + "local function one(KEYS, ARGV)\n" + self.body + "\nend\n"
                + _read("batch-driver"))


@functools.cache
def _read(name: str) -> str:
    return (_DIR / f"{name}.lua").read_text()


def load(name: str) -> Script:
    """The script of ``lua/<name>.lua``, with ``lib.lua`` in front when it uses it."""
    text = _read(name)
    if text.startswith(_USES_LIB):
        return Script(name, _read("lib") + text, text)
    return Script(name, text)


def batch_call(calls: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """``(numkeys, *keys, *args)`` of one batch-form call running ``calls``."""
    keys: list[Any] = []
    head: list[Any] = [len(calls)]
    args: list[Any] = []
    for numkeys, *rest in calls:
        keys += rest[:numkeys]
        args += rest[numkeys:]
        head += [numkeys, len(rest) - numkeys]
    return (len(keys), *keys, *head, *args)


CLAIM = load("claim")
WRITE = load("write")
REPLACE = load("replace")
DROP_IF = load("drop-if")
RELEASE = load("release")
DELETE = load("delete")
RENEW = load("renew")
IN_FLIGHT = load("in-flight")
STATES = load("states")
LOOKUP = load("lookup")
MARK = load("mark")
#: Every script the cache runs (a test loads each, and each batch form, into Valkey).
ALL = (CLAIM, WRITE, REPLACE, DROP_IF, RELEASE, DELETE, RENEW, IN_FLIGHT, STATES, LOOKUP, MARK)
