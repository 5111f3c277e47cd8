"""The embedded broker with a durable log: Tansu over a local object store.

``python -m streams.runtime.broker --data DIR --listener-url tcp://H:P -- BINARY``
runs, in this one process, the object store of `streams.runtime.objectstore`
on a free loopback port (files under ``DIR/objects``), then Tansu as its child
with ``--storage-engine s3://tansu/`` pointed at it. The child gets
``PR_SET_PDEATHSIG``, so a SIGKILLed wrapper leaves no broker behind; SIGTERM
and SIGINT are passed on, and the store keeps answering until the broker has
exited. The exit status is the broker's.

With the log in files, a broker restart (``pinfresh restart kafka``, a crash,
``down`` then ``up``) keeps every topic, record and consumer group's committed
offsets. Writes are on disk before they are acknowledged (``--no-fsync``
turns that off). Before Tansu starts, every record batch is checked and torn
ones are quarantined (`ObjectStore.scan_batches`); while it runs, retention
bounds every partition (`streams.runtime.retention`). Tansu gets a clean
environment: only what pinfresh sets, and where its programs, locale and log
level are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from aiohttp import web

from streams.runtime.deathsig import die_with
from streams.runtime.objectstore import ObjectStore
from streams.runtime.retention import CHECK_S, Retention, RetentionPolicy
from streams.runtime.s3api import make_app

__all__ = ["BUCKET", "main"]

logger = logging.getLogger(__name__)

#: The bucket (a folder under ``DIR/objects``) that holds the broker's log.
BUCKET = "tansu"



#: The only variables of the wrapper's environment Tansu gets: where its programs and
#: locale are, and how much it logs. Its own settings (CLUSTER_ID, STORAGE_ENGINE,
#: ADVERTISED_LISTENER_URL, ...) come from pinfresh alone: a stray CLUSTER_ID=prod
#: showed a data dir with no topics.
_PASSED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "RUST_LOG", "RUST_BACKTRACE", "NO_COLOR")


def _broker_env(port: int) -> dict[str, str]:
    """The broker's environment: its object store, and nothing that could redirect it."""
    env = {k: os.environ[k] for k in _PASSED if k in os.environ}
    env.update({"AWS_ACCESS_KEY_ID": "pinfresh", "AWS_SECRET_ACCESS_KEY": "pinfresh",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": f"http://127.0.0.1:{port}",
                "AWS_ALLOW_HTTP": "true", "NO_PROXY": "*", "no_proxy": "*"})
    return env


async def _keep_retention(retention: Retention, every_s: float) -> None:
    while True:
        try:
            await asyncio.to_thread(retention.run_once)
        except Exception:  # noqa: BLE001 - the log keeps serving; the next check tries again
            logger.exception("retention check failed")
        await asyncio.sleep(every_s)


async def _run(args: argparse.Namespace) -> int:
    objects = (args.data / "objects").resolve()
    (objects / BUCKET).mkdir(parents=True, exist_ok=True)
    store = ObjectStore(objects, fsync=args.fsync)
    # before the broker reads its log: a torn batch would fail every fetch over it
    bad = await asyncio.to_thread(store.scan_batches)
    if bad:
        print(f"quarantined {bad} torn record batch(es): see "
              f"{args.data / 'quarantine.jsonl'}", flush=True)
    retention = Retention(store, BUCKET, RetentionPolicy(
        max_age_s=args.retention_hours * 3600.0, max_bytes=int(args.retention_mb * (1 << 20)),
        max_batches=args.retention_batches), args.data / "retention.json")
    runner = web.AppRunner(make_app(store), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, reuse_address=False)
    await site.start()
    port = int(runner.addresses[0][1])
    cmd = [args.binary, "broker", "--listener-url", args.listener_url,
           "--advertised-listener-url", args.listener_url,
           "--storage-engine", f"s3://{BUCKET}/"]
    proc = subprocess.Popen(cmd, env=_broker_env(port), stdin=subprocess.DEVNULL,
                            preexec_fn=die_with(os.getpid()))
    loop = asyncio.get_running_loop()

    def forward(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forward, sig)
    print(f"broker log in {objects / BUCKET} (object store on 127.0.0.1:{port}), "
          f"broker pid {proc.pid}", flush=True)
    keeper = asyncio.create_task(_keep_retention(retention, args.retention_check_s))
    code = await asyncio.to_thread(proc.wait)
    keeper.cancel()
    await runner.cleanup()
    print(f"broker exited ({code})", flush=True)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the wrapper process (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m streams.runtime.broker")
    ap.add_argument("--data", type=Path, required=True, help="the broker's data dir")
    ap.add_argument("--listener-url", required=True, help="tcp://HOST:PORT to serve Kafka on")
    ap.add_argument("--no-fsync", dest="fsync", action="store_false",
                    help="acknowledge writes before they reach the disk")
    ap.add_argument("--retention-hours", type=float, default=168.0)
    ap.add_argument("--retention-mb", type=float, default=1024.0, help="per partition")
    ap.add_argument("--retention-batches", type=int, default=200_000, help="per partition")
    ap.add_argument("--retention-check-s", type=float, default=CHECK_S)
    ap.add_argument("binary", help="the Tansu binary")
    args = ap.parse_args(argv)
    # the wrapper's own lines (retention, quarantine) go to the broker's log file
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
