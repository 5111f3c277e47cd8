"""A load generator for the read API, run as its own process by the benchmark.

``python -m streams.tools.loadgen URL IDS_FILE --concurrency 16 --seconds 10 --batch 25``
prints one JSON line: requests, requests/s, p50/p99 latency in ms, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx
import numpy as np


async def _run(url: str, ids: list[str], concurrency: int, seconds: float, batch: int
               ) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=5.0, limits=limits) as http:

        async def one(seed: int) -> None:
            nonlocal errors
            rnd = random.Random(seed)
            while time.monotonic() < deadline:
                body = {"pin_ids": rnd.sample(ids, batch), "encoding": "base64",
                        "dtype": "float16"}
                t = time.perf_counter()
                r = await http.post("/v1/embeddings:batchGet", json=body)
                lat.append(time.perf_counter() - t)
                errors += r.status_code != 200

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(concurrency)))
        wall = time.monotonic() - t0
    arr = np.array(lat) * 1000
    return {"requests": len(lat), "requests_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(arr, 50)), 3),
            "p99_ms": round(float(np.percentile(arr, 99)), 3), "errors": errors,
            "concurrency": concurrency, "seconds": round(wall, 2)}


def main() -> None:
    """Entry point (see module docstring)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("ids_file")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=25)
    a = ap.parse_args()
    ids = [line.strip() for line in open(a.ids_file) if line.strip()]
    print(json.dumps(asyncio.run(_run(a.url, ids, a.concurrency, a.seconds, a.batch))))


if __name__ == "__main__":
    main()
