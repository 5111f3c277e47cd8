"""Logging set-up for the command-line processes (the library itself configures nothing).

`configure_logging` installs one stderr handler (plain or JSON lines) and a
`RateLimitFilter` that turns the flood a Kafka client writes while the broker
is unreachable (about 60 lines a second from aiokafka, Faust and mode) into
one WARNING per interval that says how many similar lines it swallowed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

#: Loggers of the Kafka client stack whose repeated errors are rate-limited.
KAFKA_LOGGERS = ("aiokafka", "faust", "mode", "kafka")
#: Substrings that mark a record as "the broker cannot be reached".
_CONNECTION_HINTS = ("connect", "unable to update metadata", "not ready", "nodenotready",
                     "coordinator", "connection", "broker")


class RateLimitFilter(logging.Filter):
    """Lets one record per key through per ``interval_s``; counts the rest.

    Records of the Kafka loggers at WARNING or above are keyed as one
    "broker unreachable" key when they look like connection errors (whatever
    their wording), else by their message template. The record that gets
    through is rewritten as one WARNING line naming what was suppressed.
    """

    def __init__(self, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def _key(self, record: logging.LogRecord) -> str | None:
        if record.levelno < logging.WARNING:
            return None
        if record.name.split(".", 1)[0] not in KAFKA_LOGGERS:
            return None
        text = record.getMessage().lower()
        if any(h in text for h in _CONNECTION_HINTS):
            return "kafka-unreachable"
        return f"{record.name}:{record.msg}"

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to emit ``record`` (rewritten when it stands for suppressed ones)."""
        key = self._key(record)
        if key is None:
            return True
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        what = "Kafka broker unreachable" if key == "kafka-unreachable" else "repeated"
        original = record.getMessage()
        # no "retrying" here: a one-shot command that logs this then exits retries nothing
        record.msg = (f"{what}: %s ({n} similar line(s) suppressed before this one, "
                      f"the next suppressed for {self.interval_s:.0f}s)")
        record.args = (original,)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON."""
        out = {"ts": record.created, "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str, as_json: bool, interval_s: float = 60.0) -> None:
    """Root logger to stderr at ``level``; quiet, rate-limited client libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RateLimitFilter(interval_s))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in (*KAFKA_LOGGERS, "pymilvus", "httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
