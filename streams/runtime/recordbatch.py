"""The Kafka record batch (format v2) as the broker's log stores it: one per object.

What the object store (`streams.runtime.objectstore`) and the retention's
compaction (`streams.runtime.compaction`) need to know of it: whether a file
holds one whole batch, and the offset after its last record.
"""

from __future__ import annotations

__all__ = ["HEADER_SIZE", "batch_end", "batch_problem"]

#: The header: base offset (8), length (4), leader epoch (4), magic (1), CRC-32C (4),
#: attributes (2), last offset delta (4), ...; the CRC covers every byte from the
#: attributes on.
HEADER_SIZE = 61


def batch_problem(data: bytes, check_crc: bool = True) -> str | None:
    """Why ``data`` is no whole Kafka record batch (None: it is one)."""
    if len(data) < HEADER_SIZE:
        return f"{len(data)} bytes, shorter than a batch header ({HEADER_SIZE})"
    length = int.from_bytes(data[8:12], "big")
    if 12 + length != len(data):
        return f"its header says {12 + length} bytes, the file has {len(data)}"
    if data[16] != 2:
        return f"magic byte {data[16]}, not 2"
    if check_crc:
        from aiokafka.record.util import calc_crc32c

        if calc_crc32c(data[21:]) != int.from_bytes(data[17:21], "big"):
            return "its CRC-32C does not match"
    return None


def batch_end(data: bytes, base_offset: int) -> int:
    """The offset after a batch's last record (its key names its base offset)."""
    return base_offset + int.from_bytes(data[23:27], "big", signed=True) + 1
