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
offsets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from aiohttp import web

from streams.runtime.deathsig import die_with
from streams.runtime.objectstore import ObjectStore, make_app

__all__ = ["BUCKET", "main"]

#: The bucket (a folder under ``DIR/objects``) that holds the broker's log.
BUCKET = "tansu"



def _broker_env(port: int) -> dict[str, str]:
    """The broker's environment: its object store, and nothing that could redirect it.

    The S3 client reads every ``AWS_*`` variable and honours HTTP proxies: a
    stray one (virtual-hosted style, a proxy for 127.0.0.1) must not send the
    log elsewhere.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k.lower() not in (
               "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update({"AWS_ACCESS_KEY_ID": "pinfresh", "AWS_SECRET_ACCESS_KEY": "pinfresh",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": f"http://127.0.0.1:{port}",
                "AWS_ALLOW_HTTP": "true", "NO_PROXY": "*", "no_proxy": "*"})
    return env


async def _run(args: argparse.Namespace) -> int:
    objects = (args.data / "objects").resolve()
    (objects / BUCKET).mkdir(parents=True, exist_ok=True)
    runner = web.AppRunner(make_app(ObjectStore(objects)), access_log=None,
                           handle_signals=False)
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
    code = await asyncio.to_thread(proc.wait)
    await runner.cleanup()
    print(f"broker exited ({code})", flush=True)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the wrapper process (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m streams.runtime.broker")
    ap.add_argument("--data", type=Path, required=True, help="the broker's data dir")
    ap.add_argument("--listener-url", required=True, help="tcp://HOST:PORT to serve Kafka on")
    ap.add_argument("binary", help="the Tansu binary")
    args = ap.parse_args(argv)
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
