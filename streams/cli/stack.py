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
    """Start the embedded Kafka broker, Valkey and Milvus on loopback (what is down only).

    Ports: PINFRESH_STACK__KAFKA_PORT / __REDIS_PORT / __MILVUS_PORT (0 = free port);
    data: PINFRESH_STACK__DATA_DIR. With --redis-cluster N the Valkey nodes use
    REDIS_PORT, REDIS_PORT+1, ... and every command of this data dir reaches
    them as redis+cluster://.
    """
    from streams.runtime.stack import EmbeddedStack

    st = ctx.settings.stack
    if redis_cluster is not None:
        st = st.model_copy(update={"redis_cluster": redis_cluster})
    stack = EmbeddedStack(st)
    info = stack.start()
    console.print(f"kafka  {info.kafka_bootstrap}\nredis  {info.redis_url}\n"
                  f"milvus {info.milvus_uri}")
    console.print("started: " + (", ".join(stack.started) if stack.started
                                 else "nothing (all running)"))
    if st.kafka_log == "memory":
        console.print("Note: PINFRESH_STACK__KAFKA_LOG=memory: the broker keeps its log in "
                      "memory; it is lost when the broker stops (`down`, `restart kafka`).")


@cli.command()
@click.argument("service")
@click.option("--force", is_flag=True,
              help="restart a broker whose log is in memory (PINFRESH_STACK__KAFKA_LOG=memory) "
              "although it loses it")
@pass_ctx
def restart(ctx: Ctx, service: str, force: bool) -> None:
    """Stop one embedded service and start it again on its port and data.

    SERVICE: milvus, redis (redis-N for node N of a cluster) or kafka. The
    others keep running. Valkey reloads its AOF, Milvus its data and the
    broker its log (records, dead letters, consumer groups' offsets) from
    data/kafka; clients reconnect. With PINFRESH_STACK__KAFKA_LOG=memory a
    broker restart loses that log: refused without --force.
    """
    from encoder.errors import StackError
    from streams.runtime.stack import EmbeddedStack, _service_of

    name, node = _service_of(service)
    if name not in ("kafka", "redis", "milvus"):
        raise click.BadParameter("milvus, redis, redis-N or kafka", param_hint="SERVICE")
    stack = EmbeddedStack(ctx.settings.stack)
    running = stack.read()  # the running broker's engine, not this shell's setting
    log = running.kafka_log if running is not None else ctx.settings.stack.kafka_log
    if name == "kafka" and log == "memory" and not force:
        raise StackError("PINFRESH_STACK__KAFKA_LOG=memory: restarting the embedded broker "
                         "loses its log (events not yet consumed, dead letters, committed "
                         "offsets): add --force to do it anyway")
    stack.restart_service(name, node)
    console.print(f"{service} restarted")


@cli.command()
@pass_ctx
def down(ctx: Ctx) -> None:
    """Stop every worker and read API (`serve`) of this data dir, then the embedded stack.

    Workers drain (SIGKILL after 45 s); processes of other data dirs are left alone.
    """
    from streams.runtime.processes import stop_workers
    from streams.runtime.stack import EmbeddedStack

    n = stop_workers(ctx.settings)
    stopped = EmbeddedStack(ctx.settings.stack).stop()
    console.print(f"stopped {n} worker(s) and read API(s); "
                  f"stack {'stopped' if stopped else 'was not running'}")


@cli.command()
@click.option("--json", "as_json", is_flag=True,
              help="one JSON object (lag_total, freshness_p99_s, live_version, dlq_total, ...)")
@click.option("--watch", is_flag=True, help="refresh until Ctrl-C")
@click.option("--interval", default=2.0, show_default=True, help="seconds between samples")
@click.option("--window", default=300.0, show_default=True,
              help="freshness percentiles over the samples written in the last N seconds")
@click.option("--stalled-after", default=120.0, show_default=True,
              help="a partition with lag whose committed offset has not moved for N seconds "
              "marks the pipeline stalled")
@pass_ctx
def status(ctx: Ctx, as_json: bool, watch: bool, interval: float, window: float,
           stalled_after: float) -> None:
    """Lag, rates, freshness, dead letters, versions and store health on one screen.

    Exit code (not with --watch): 0 the pipeline runs or is idle; 1 it is
    stalled, or a worker or encoder process is down or stuck; 3 Kafka, Redis
    or Milvus does not answer.
    """
    from functools import partial

    from rich.live import Live

    from streams.runtime import status as st

    collect_status = partial(st.collect_status, window_s=window,
                             stalled_after_s=stalled_after)
    render = st.render

    if not watch:
        snap = asyncio.run(collect_status(ctx.settings, interval))
        if as_json:
            click.echo(json.dumps(snap, indent=2))
        else:
            console.print(render(snap))
        # 0 ok or idle, 1 stalled or a process down, 3 a service unreachable
        raise SystemExit(st.exit_code(snap))
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
