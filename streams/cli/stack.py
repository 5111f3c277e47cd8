"""Commands for the embedded stack and the settings: ``up``, ``down``, ``status``, ``config``."""

from __future__ import annotations

import asyncio
import json

import click

from streams.cli.base import Ctx, cli, console, pass_ctx


@cli.command()
@click.option("--redis-cluster", type=click.IntRange(0, 16), default=None,
              help="run Valkey as a cluster of N masters (default: "
              "PINFRESH_STACK__REDIS_CLUSTER, 0 = one node)")
@pass_ctx
def up(ctx: Ctx, redis_cluster: int | None) -> None:
    """Start the embedded Kafka broker, Valkey and Milvus Lite on loopback.

    Ports: PINFRESH_STACK__KAFKA_PORT / __REDIS_PORT / __MILVUS_PORT (0 = free port);
    data: PINFRESH_STACK__DATA_DIR. With --redis-cluster N the Valkey nodes use
    REDIS_PORT, REDIS_PORT+1, ... and every command of this data dir reaches
    them as redis+cluster://.
    """
    from streams.tools.stack import EmbeddedStack

    st = ctx.settings.stack
    if redis_cluster is not None:
        st = st.model_copy(update={"redis_cluster": redis_cluster})
    info = EmbeddedStack(st).start()
    console.print(f"kafka  {info.kafka_bootstrap}\nredis  {info.redis_url}\n"
                  f"milvus {info.milvus_uri}\n"
                  "Note: the embedded broker keeps its log in memory; it is lost on `down`.")


@cli.command()
@pass_ctx
def down(ctx: Ctx) -> None:
    """Stop every worker of this data dir (drained, SIGKILL after 45 s) and the embedded stack."""
    from streams.tools.runtime import stop_workers
    from streams.tools.stack import EmbeddedStack

    n = stop_workers(ctx.settings)
    stopped = EmbeddedStack(ctx.settings.stack).stop()
    console.print(f"stopped {n} worker(s); stack {'stopped' if stopped else 'was not running'}")


@cli.command()
@click.option("--json", "as_json", is_flag=True,
              help="one JSON object (lag_total, freshness_p99_s, live_version, dlq_total, ...)")
@click.option("--watch", is_flag=True, help="refresh until Ctrl-C")
@click.option("--interval", default=2.0, show_default=True, help="seconds between samples")
@pass_ctx
def status(ctx: Ctx, as_json: bool, watch: bool, interval: float) -> None:
    """Lag, rates, freshness, dead letters, versions and store health on one screen."""
    from rich.live import Live

    from streams.tools.status import collect_status, render

    if as_json:
        click.echo(json.dumps(asyncio.run(collect_status(ctx.settings, interval)), indent=2))
        return
    if not watch:
        console.print(render(asyncio.run(collect_status(ctx.settings, interval))))
        return
    with Live(console=console, refresh_per_second=1) as live:
        try:
            while True:
                live.update(render(asyncio.run(collect_status(ctx.settings, interval))))
        except KeyboardInterrupt:
            pass


@cli.group("config")
def config_group() -> None:
    """Settings."""


@config_group.command("show")
@pass_ctx
def show_config(ctx: Ctx) -> None:
    """Print the effective settings (secrets masked)."""
    click.echo(json.dumps(ctx.settings.masked(), indent=2, default=str))
