"""Retention of the embedded broker's disk log, as Kafka's: by age and by size, per partition.

Tansu keeps every record batch it was given, one object each, and lists a
partition's whole ``records/`` prefix on every fetch behind the high
watermark: a log that only grows makes every fetch slower until consumers
hang. The broker's wrapper (`streams.runtime.broker`) runs `Retention` every
`CHECK_S` seconds over the object store's index:

* a partition's oldest batches are removed once they are older than
  ``max_age_s`` (``PINFRESH_STACK__KAFKA_RETENTION_HOURS``, 168), or while the
  partition holds more than ``max_bytes`` (``..._RETENTION_MB`` per
  partition, 1,024) or more than ``max_batches`` (``..._RETENTION_BATCHES``,
  200,000: what a fetch can list within the consumers' wait);
* a batch that a consumer group has not yet committed past is kept, whatever
  its age; only the size and count bounds remove it, and then the removal is
  logged as a warning and recorded with the groups that were behind;
* a partition's newest batch is always kept;
* then a partition's old small batches are merged into larger ones
  (`streams.runtime.compaction`), so that the number of objects a fetch lists
  stays small whatever the publish rate.

A consumer whose committed offset fell out of retention resumes from the
oldest batch kept: Tansu answers a fetch below it with the batches that
follow, as Kafka's ``auto.offset.reset=earliest`` would. The last check is
written to ``<kafka data>/retention.json`` for `pinfresh status`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streams.runtime.compaction import compact_partition
from streams.runtime.objectstore import ObjectStore

logger = logging.getLogger(__name__)

#: Seconds between two retention checks.
CHECK_S = 30.0
#: Forced removals kept in the report.
KEEP_FORCED = 50


@dataclass(frozen=True)
class RetentionPolicy:
    """The bounds of one partition's log."""

    max_age_s: float = 168 * 3600.0
    max_bytes: int = 1024 << 20
    max_batches: int = 200_000


class Retention:
    """Applies a `RetentionPolicy` to every partition of one bucket (see module docstring)."""

    def __init__(self, store: ObjectStore, bucket: str, policy: RetentionPolicy,
                 report: Path) -> None:
        self.store, self.bucket, self.policy, self.report_path = store, bucket, policy, report
        self.forced: list[dict[str, Any]] = []
        self.removed_total = 0

    def _committed(self, cluster: Path, topic: str, part: str) -> dict[str, int]:
        """``group -> committed offset`` of every group that committed on this partition."""
        out: dict[str, int] = {}
        for group in self.store.subfolders(cluster / "groups" / "consumers"):
            path = group / "offsets" / topic / "partitions" / f"{part}.json"
            if self.store.size(path):
                try:
                    out[group.name] = int(json.loads(path.read_bytes())["offset"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return out

    def run_once(self, now: float | None = None) -> dict[str, Any]:
        """One check of every partition; returns (and writes) the report."""
        now = time.time() if now is None else now
        parts: dict[str, Any] = {}
        for cluster in self.store.subfolders(self.store.root / self.bucket / "clusters"):
            for topic in self.store.subfolders(cluster / "topics"):
                for part in self.store.subfolders(topic / "partitions"):
                    key = f"{topic.name}/{int(part.name)}"
                    parts[key] = self._partition(cluster, topic.name, part, now)
        report = {"policy": asdict(self.policy), "checked_at": now,
                  "removed_total": self.removed_total, "forced": self.forced[-KEEP_FORCED:],
                  "partitions": parts}
        tmp = self.report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.replace(self.report_path)
        return report

    def _partition(self, cluster: Path, topic: str, part: Path, now: float
                   ) -> dict[str, Any]:
        batches = self.store.objects(part / "records")
        sizes = [self.store.size(p) for _n, p in batches]
        total, count = sum(sizes), len(batches)
        groups = self._committed(cluster, topic, part.name)
        floor = min(groups.values()) if groups else None
        p = self.policy
        removed = 0
        for (_name, path), size in zip(batches[:-1], sizes[:-1], strict=True):
            over = total > p.max_bytes or count > p.max_batches
            if not over and now - self.store.mtime(path) <= p.max_age_s:
                break  # oldest first: the rest is newer
            end = self.store.batch_end(path)
            consumed = floor is None or (end is not None and end <= floor)
            if not consumed and not over:
                break  # expired, but a group has not read it yet: kept
            if not consumed:
                behind = {g: o for g, o in groups.items() if end is None or o < end}
                base = int(path.name[:20])
                self.forced.append({"topic": topic, "partition": int(part.name),
                                    "from": base, "to": end, "groups_behind": behind,
                                    "at": now})
                logger.warning("retention removed offsets %d..%s of %s[%d] before consumer "
                               "group(s) %s read them: the partition is over its size bound "
                               "(PINFRESH_STACK__KAFKA_RETENTION_MB / _BATCHES); they resume "
                               "at the oldest offset kept", base, end, topic, int(part.name),
                               ", ".join(sorted(behind)))
            self.store.delete(path)
            total, count, removed = total - size, count - 1, removed + 1
        self.removed_total += removed
        if removed:
            logger.info("retention removed %d batch(es) of %s[%d]", removed, topic,
                        int(part.name))
        merged = compact_partition(self.store, part / "records", now)
        kept = self.store.objects(part / "records")
        return {"batches": len(kept), "bytes": total,
                "oldest_offset": int(kept[0][0][:20]) if kept else None,
                "removed": removed, "merged": merged}
