"""Commands that feed the stream: ``catalog``, ``topics``, ``worker``, ``publish``, ``delete``."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import click

from streams.cli.base import Ctx, cli, console, err_console, pass_ctx


@cli.group()
def catalog() -> None:
    """Sample catalogs."""


@catalog.command("prepare")
@click.option("--emoji/--no-emoji", default=True, show_default=True,
              help="also the generic emoji corpus (npm emoji-datasource-google)")
@pass_ctx
def catalog_prepare(ctx: Ctx, emoji: bool) -> None:
    """Install the Tux Paint stamps (and emoji) if needed and write catalog JSONL files."""
    from streams.runtime.catalog import (
        CatalogError,
        load_catalog,
        prepare_emoji_catalog,
        prepare_sample_catalog,
    )

    data = ctx.settings.stack.data_dir.resolve()
    try:
        path = prepare_sample_catalog(data)
    except CatalogError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise SystemExit(1) from exc
    console.print(f"{sum(1 for _ in load_catalog(path))} pins -> {path}")
    from streams.runtime.catalog import catalog_root_of

    console.print(f"its images are under {catalog_root_of(path)}: start workers with "
                  f"--catalog-root {catalog_root_of(path)}", highlight=False, soft_wrap=True)
    if emoji:
        try:
            epath = prepare_emoji_catalog(data)
            console.print(f"{sum(1 for _ in load_catalog(epath))} pins -> {epath}")
        except CatalogError as exc:  # the pipeline works without it; training needs it
            console.print(f"[yellow]emoji corpus skipped:[/] {exc}")


@cli.group()
def topics() -> None:
    """Kafka topics."""


@topics.command("create")
@pass_ctx
def topics_create(ctx: Ctx) -> None:
    """Create the events and DLQ topics (PINFRESH_KAFKA__PARTITIONS partitions)."""
    from streams.producer import ensure_topics

    created = asyncio.run(ensure_topics(ctx.settings.kafka))
    console.print(f"created: {', '.join(created) or 'nothing (all exist)'}")


@topics.command("scale")
@click.option("--partitions", type=int, required=True, help="new total partition count")
@pass_ctx
def topics_scale(ctx: Ctx, partitions: int) -> None:
    """Add partitions to the events topic (more workers can then share the load).

    Adding partitions remaps pin ids to partitions for new events: a pin's next
    event may land on another partition than its previous one, so two workers
    may briefly hold events of the same pin, and apply them in either order.
    Every write claims its pin in Redis first and writes Redis only if newer
    (the processor's claim protocol): both stores end at the pin's highest
    version whichever worker writes last, and a writer whose Milvus write an
    older one may still overwrite writes again after it (docs/integration.md).
    """
    from streams.producer import scale_partitions

    before = asyncio.run(scale_partitions(ctx.settings.kafka, partitions))
    console.print(f"{ctx.settings.kafka.topic}: {before} -> {partitions} partitions")


@cli.command()
@click.option("--catalog-root", type=click.Path(path_type=Path),
              help="allow file paths under this dir [PINFRESH_FETCH__CATALOG_ROOT]")
@click.option("--devices",
              help="one worker process per device: GPU indexes ('0,1'), 'all' or 'cpu' "
              "entries; metrics ports count up from PINFRESH_WORKER__METRICS_PORT")
@click.option("--feeders", default=None,
              help="with --devices: per device one encoder process plus N feeder workers "
              "sharing it; 'auto' = from the cores")
@pass_ctx
def worker(ctx: Ctx, catalog_root: Path | None, devices: str | None,
           feeders: str | None) -> None:
    """Run one stream worker (Faust) until SIGTERM, or a pool of them with --devices.

    With --feeders, each device runs one encoder process that owns the model
    and N feeder workers (consume, fetch, write, commit) that send it their
    images over a Unix socket under the data dir.

    Batch: PINFRESH_WORKER__BATCH_SIZE, PINFRESH_WORKER__BATCH_WAIT_S; model:
    PINFRESH_ENCODER__MODEL, PINFRESH_ENCODER__CHECKPOINT, PINFRESH_ENCODER__DEVICE;
    metrics: PINFRESH_WORKER__METRICS_PORT.
    """
    s = ctx.settings
    if catalog_root:
        s = s.model_copy(update={"fetch": s.fetch.model_copy(
            update={"catalog_root": catalog_root})})
    from streams.fetch import check_catalog_root

    check_catalog_root(s.fetch)
    if feeders is not None and not devices:
        raise click.UsageError("--feeders needs --devices (e.g. --devices 0 --feeders 8)")
    if devices:
        from streams.runtime.pool import WorkerPool, parse_devices

        try:
            devs = parse_devices(devices)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--devices") from exc
        n_feeders = 0
        if feeders is not None:
            from streams.runtime.pool import auto_feeders

            if feeders == "auto":
                n_feeders = auto_feeders(len(devs))
            elif feeders.isdigit() and int(feeders) > 0:
                n_feeders = int(feeders)
            else:
                raise click.BadParameter("a positive number or 'auto'", param_hint="--feeders")
        env = s.child_environ(os.environ)
        pool = WorkerPool(devs, env=env, metrics_port=s.worker.metrics_port,
                          stop_timeout_s=s.worker.drain_timeout_s + 15, feeders=n_feeders,
                          run_dir=s.stack.data_dir / "run")
        from streams.runtime.processes import register_worker

        register_worker(s)
        sys.exit(pool.run())
    from streams.app import run_worker
    from streams.runtime.processes import register_worker

    run_worker(s, on_exit=register_worker(s))


@cli.command()
@click.argument("catalog_path", type=click.Path(path_type=Path, exists=True))
@click.option("--limit", type=int, help="publish at most N pins")
@click.option("--pin-version", "pin_version", type=int, default=None,
              help="per-pin version stamped on every event [default: now, in milliseconds]")
@click.option("--rate", type=float, help="events per second (default: as fast as possible)")
@pass_ctx
def publish(ctx: Ctx, catalog_path: Path, limit: int | None, pin_version: int | None,
            rate: float | None) -> None:
    """Publish a catalog (JSONL or image directory) as upsert events.

    The per-pin version defaults to the current time in milliseconds, so
    publishing a changed catalog again updates every pin (an older version
    never overwrites a newer one).
    """
    from streams.producer import ensure_topics, publish_events
    from streams.runtime.catalog import load_catalog

    items = list(load_catalog(catalog_path, limit))
    version = pin_version if pin_version is not None else time.time_ns() // 1_000_000

    async def go() -> int:
        await ensure_topics(ctx.settings.kafka)
        return await publish_events(ctx.settings.kafka, (i.event(version) for i in items),
                                    total=len(items), rate=rate)

    n = asyncio.run(go())
    console.print(f"published {n} events to {ctx.settings.kafka.topic}")


@cli.command()
@click.argument("pin_ids", nargs=-1, required=True)
@click.option("--pin-version", "pin_version", type=int, default=None,
              help="per-pin version of the delete [default: now, in milliseconds]")
@pass_ctx
def delete(ctx: Ctx, pin_ids: tuple[str, ...], pin_version: int | None) -> None:
    """Publish delete events for pins."""
    from streams.events import PinEvent
    from streams.producer import publish_events

    version = pin_version if pin_version is not None else time.time_ns() // 1_000_000
    n = asyncio.run(publish_events(
        ctx.settings.kafka, [PinEvent.delete(p, version) for p in pin_ids], progress=False))
    console.print(f"published {n} deletes")
