"""Benchmark reporting: the machine's conditions, a table on the console, JSON on disk.

Light on purpose (torch, rich, stdlib): the device check script imports it on
a GPU machine that has none of the streaming stack installed.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem_gb = round(kb / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    info: dict[str, object] = {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb,
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def emit(title: str, rows: list[tuple[str, object]], report: dict[str, object], out: Path,
         console: Console) -> None:
    """Print a two-column table (with the machine) and write ``report`` as JSON to ``out``."""
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    m: Any = report.get("machine", {})
    console.print(f"machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb')} GB, "
                  f"torch {m.get('torch')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


def percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs`` by nearest rank; NaN when empty."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]
