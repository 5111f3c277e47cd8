"""A load generator for the read API, run as its own process by the benchmark.

``python -m streams.bench.loadgen URL IDS_FILE --concurrency 16 --rate 400 --seconds 10``
prints one JSON line: requests answered 200, their rate, their p50/p99 latency in
ms, and errors (other answers, failures, 30 s timeouts; not in the latencies).

``--rate R`` paces the load (open loop): client ``i`` of ``c`` sends its
``k``-th request at ``t0 + (k + i / c) * c / R``, and a request's latency is
counted from that scheduled time, so a server that falls behind shows the
wait too (no coordinated omission). ``--rate 0`` sends as fast as answers
come back (closed loop: the throughput ceiling). Requests ask for ``--batch``
random ids with ``--encoding`` (``binary``: the client's default; ``base64``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import aiohttp
import numpy as np


async def _run(url: str, ids: list[str], concurrency: int, seconds: float, batch: int,
               rate: float, encoding: str) -> dict[str, float | str]:
    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=concurrency)
    target = url.rstrip("/") + "/v1/embeddings:batchGet"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:

        async def one(i: int, t0: float, until: float) -> None:
            nonlocal errors
            rnd = random.Random(i)
            period = concurrency / rate if rate > 0 else 0.0
            k = 0
            while True:
                due = t0 + (k + i / concurrency) * period if period else time.perf_counter()
                if due >= until:
                    return
                k += 1
                if period and (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                body = json.dumps({"pin_ids": rnd.sample(ids, batch), "encoding": encoding,
                                   "dtype": "float16"}).encode()
                try:
                    async with http.post(target, data=body, headers={
                            "Content-Type": "application/json"}) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:  # an error's latency (a fast 503) would flatter the figures
                    lat.append(time.perf_counter() - due)
                else:
                    errors += 1

        async def warm() -> None:
            body = json.dumps({"pin_ids": ids[:batch], "encoding": encoding}).encode()
            async with http.post(target, data=body,
                                 headers={"Content-Type": "application/json"}) as r:
                await r.read()

        # open the pool's connections before the clock starts
        await asyncio.gather(*(warm() for _ in range(concurrency)))
        t0 = time.perf_counter() + 0.05
        await asyncio.gather(*(one(i, t0, t0 + seconds) for i in range(concurrency)))
        wall = max(time.perf_counter() - t0, 1e-9)
    arr = np.array(lat or [float("nan")]) * 1000
    return {"requests": len(lat), "requests_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(arr, 50)), 3),
            "p99_ms": round(float(np.percentile(arr, 99)), 3), "errors": errors,
            "concurrency": concurrency, "target_rate": rate, "encoding": encoding,
            "seconds": round(wall, 2)}


def main() -> None:
    """Entry point (see module docstring)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("ids_file")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s in all (0: closed loop)")
    ap.add_argument("--encoding", choices=["binary", "base64"], default="binary")
    a = ap.parse_args()
    ids = [line.strip() for line in open(a.ids_file) if line.strip()]
    run = asyncio.run
    try:  # uvloop's timers wake closer to the schedule than asyncio's
        import uvloop

        run = uvloop.run
    except ImportError:
        pass
    print(json.dumps(run(_run(a.url, ids, a.concurrency, a.seconds, a.batch, a.rate,
                              a.encoding))))


if __name__ == "__main__":
    main()
