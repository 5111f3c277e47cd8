"""``pinfresh``: one console script, one subcommand per process or task.

Every setting comes from the settings object (`streams.settings.Settings`):
environment variables ``PINFRESH_<SECTION>__<NAME>`` or a ``.env`` file; the
options below override the few that are handy on the command line and name
their variable in ``--help``. This module is the only place that configures
logging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from encoder.errors import PinfreshError
from streams.runtime import load_settings
from streams.settings import Settings

console = Console(stderr=False)
err_console = Console(stderr=True)
logger = logging.getLogger("pinfresh")


def _configure_logging(settings: Settings) -> None:
    from streams.logconf import configure_logging

    configure_logging(settings.log_level, settings.log_json)


class _Ctx:
    def __init__(self) -> None:
        from streams.runtime import settings_warnings
        from streams.settings import SettingsError

        try:
            self.settings = load_settings()
        except SettingsError as exc:
            err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)
        _configure_logging(self.settings)
        for line in settings_warnings():
            logger.warning("%s", line)


pass_ctx = click.make_pass_decorator(_Ctx, ensure=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Keep image embeddings fresh: Kafka -> Faust -> open_clip -> Milvus + Redis."""


# ------------------------------------------------------------------ stack
@cli.command()
@pass_ctx
def up(ctx: _Ctx) -> None:
    """Start the embedded Kafka broker, Valkey and Milvus Lite on loopback.

    Ports: PINFRESH_STACK__KAFKA_PORT / __REDIS_PORT / __MILVUS_PORT (0 = free port);
    data: PINFRESH_STACK__DATA_DIR.
    """
    from streams.stack import EmbeddedStack

    info = EmbeddedStack(ctx.settings.stack).start()
    console.print(f"kafka  {info.kafka_bootstrap}\nredis  {info.redis_url}\n"
                  f"milvus {info.milvus_uri}\n"
                  "Note: the embedded broker keeps its log in memory; it is lost on `down`.")


@cli.command()
@pass_ctx
def down(ctx: _Ctx) -> None:
    """Stop every worker of this data dir (drained, SIGKILL after 45 s) and the embedded stack."""
    from streams.runtime import stop_workers
    from streams.stack import EmbeddedStack

    n = stop_workers(ctx.settings)
    stopped = EmbeddedStack(ctx.settings.stack).stop()
    console.print(f"stopped {n} worker(s); stack {'stopped' if stopped else 'was not running'}")


@cli.command()
@click.option("--json", "as_json", is_flag=True,
              help="one JSON object (lag_total, freshness_p99_s, live_version, dlq_total, ...)")
@click.option("--watch", is_flag=True, help="refresh until Ctrl-C")
@click.option("--interval", default=2.0, show_default=True, help="seconds between samples")
@pass_ctx
def status(ctx: _Ctx, as_json: bool, watch: bool, interval: float) -> None:
    """Lag, rates, freshness, dead letters, versions and store health on one screen."""
    from rich.live import Live

    from streams.status import collect_status, render

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
def show_config(ctx: _Ctx) -> None:
    """Print the effective settings (secrets masked)."""
    click.echo(json.dumps(ctx.settings.masked(), indent=2, default=str))


# ---------------------------------------------------------------- catalog
@cli.group()
def catalog() -> None:
    """Sample catalogs."""


@catalog.command("prepare")
@click.option("--emoji/--no-emoji", default=True, show_default=True,
              help="also the generic emoji corpus (npm emoji-datasource-google)")
@pass_ctx
def catalog_prepare(ctx: _Ctx, emoji: bool) -> None:
    """Install the Tux Paint stamps (and emoji) if needed and write catalog JSONL files."""
    from streams.catalog import (
        CatalogError,
        load_catalog,
        prepare_emoji_catalog,
        prepare_sample_catalog,
    )

    data = ctx.settings.stack.data_dir.resolve()
    path = prepare_sample_catalog(data)
    console.print(f"{sum(1 for _ in load_catalog(path))} pins -> {path}")
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
def topics_create(ctx: _Ctx) -> None:
    """Create the events and DLQ topics (PINFRESH_KAFKA__PARTITIONS partitions)."""
    from streams.producer import ensure_topics

    created = asyncio.run(ensure_topics(ctx.settings.kafka))
    console.print(f"created: {', '.join(created) or 'nothing (all exist)'}")


@topics.command("scale")
@click.option("--partitions", type=int, required=True, help="new total partition count")
@pass_ctx
def topics_scale(ctx: _Ctx, partitions: int) -> None:
    """Add partitions to the events topic (more workers can then share the load).

    Adding partitions remaps pin ids to partitions for new events: a pin's next
    event may land on another partition than its previous one, so two workers
    may briefly hold events of the same pin. The per-pin version check keeps
    this safe: an older version never overwrites a newer one, whichever worker
    writes last.
    """
    from streams.producer import scale_partitions

    before = asyncio.run(scale_partitions(ctx.settings.kafka, partitions))
    console.print(f"{ctx.settings.kafka.topic}: {before} -> {partitions} partitions")


# ---------------------------------------------------------------- workers
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
def worker(ctx: _Ctx, catalog_root: Path | None, devices: str | None,
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
    if feeders is not None and not devices:
        raise click.UsageError("--feeders needs --devices (e.g. --devices 0 --feeders 8)")
    if devices:
        from streams.pool import WorkerPool, parse_devices

        try:
            devs = parse_devices(devices)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--devices") from exc
        n_feeders = 0
        if feeders is not None:
            from streams.pool import auto_feeders

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
        from streams.runtime import register_worker

        register_worker(s)
        sys.exit(pool.run())
    from streams.app import run_worker
    from streams.runtime import register_worker

    run_worker(s, on_exit=register_worker(s))


@cli.command()
@click.argument("catalog_path", type=click.Path(path_type=Path, exists=True))
@click.option("--limit", type=int, help="publish at most N pins")
@click.option("--version", "pin_version", type=int, default=1, show_default=True,
              help="per-pin version to stamp on every event")
@click.option("--rate", type=float, help="events per second (default: as fast as possible)")
@pass_ctx
def publish(ctx: _Ctx, catalog_path: Path, limit: int | None, pin_version: int,
            rate: float | None) -> None:
    """Publish a catalog (JSONL or image directory) as upsert events."""
    from streams.catalog import load_catalog
    from streams.producer import ensure_topics, publish_events

    items = list(load_catalog(catalog_path, limit))

    async def go() -> int:
        await ensure_topics(ctx.settings.kafka)
        return await publish_events(ctx.settings.kafka, (i.event(pin_version) for i in items),
                                    total=len(items), rate=rate)

    n = asyncio.run(go())
    console.print(f"published {n} events to {ctx.settings.kafka.topic}")


@cli.command()
@click.argument("pin_ids", nargs=-1, required=True)
@click.option("--version", "pin_version", type=int, required=True, help="per-pin version")
@pass_ctx
def delete(ctx: _Ctx, pin_ids: tuple[str, ...], pin_version: int) -> None:
    """Publish delete events for pins."""
    from streams.events import PinEvent
    from streams.producer import publish_events

    n = asyncio.run(publish_events(
        ctx.settings.kafka, [PinEvent.delete(p, pin_version) for p in pin_ids], progress=False))
    console.print(f"published {n} deletes")


# ------------------------------------------------------------------ reads
@cli.command()
@click.option("--host", help="bind address [PINFRESH_API__HOST] (default loopback)")
@click.option("--port", type=int, help="port [PINFRESH_API__PORT]")
@pass_ctx
def serve(ctx: _Ctx, host: str | None, port: int | None) -> None:
    """Run the read API (batch get, similar, healthz, readyz, metrics)."""
    import uvicorn

    from store.api import create_app

    s = ctx.settings
    app = create_app(s.api, s.redis, s.milvus)
    uvicorn.run(app, host=host or s.api.host, port=port or s.api.port, log_level="warning",
                access_log=False)


@cli.command()
@click.argument("pin_ids", nargs=-1, required=True)
@click.option("--version", "model_version", help="model version (default: live)")
@pass_ctx
def get(ctx: _Ctx, pin_ids: tuple[str, ...], model_version: str | None) -> None:
    """Read embeddings (Redis first, Milvus fallback) and print a summary."""
    from store.milvus import MilvusStore
    from store.reader import EmbeddingReader
    from store.redis import RedisCache

    async def go() -> None:
        cache, milvus = RedisCache(ctx.settings.redis), MilvusStore(ctx.settings.milvus)
        try:
            res = await EmbeddingReader(milvus, cache).get_many(list(pin_ids), model_version)
            click.echo(json.dumps({
                "version": res.version,
                "pins": [{"pin_id": p, "found": bool(f), "head": [round(float(x), 4)
                                                                  for x in v[:4]]}
                         for p, f, v in zip(res.pin_ids, res.found, res.vectors, strict=True)],
            }, indent=2))
        finally:
            await cache.close()
            await milvus.close()

    asyncio.run(go())


@cli.command()
@click.argument("pin_id")
@click.option("-k", default=10, show_default=True, help="how many")
@pass_ctx
def similar(ctx: _Ctx, pin_id: str, k: int) -> None:
    """Print the pins most similar to PIN_ID in the live version."""
    from store.milvus import MilvusStore
    from store.reader import EmbeddingReader
    from store.redis import RedisCache

    async def go() -> None:
        cache, milvus = RedisCache(ctx.settings.redis), MilvusStore(ctx.settings.milvus)
        try:
            ver, hits = await EmbeddingReader(milvus, cache).similar(pin_id=pin_id, k=k)
            t = Table(title=f"similar to {pin_id} (version {ver})")
            for col in ("score", "pin", "caption"):
                t.add_column(col)
            for h in hits:
                t.add_row(f"{h.score:.3f}", h.pin_id, h.caption)
            console.print(t)
        finally:
            await cache.close()
            await milvus.close()

    asyncio.run(go())


@cli.group()
def dlq() -> None:
    """Dead letters."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@pass_ctx
def dlq_list(ctx: _Ctx, as_json: bool) -> None:
    """List the dead letters on the DLQ topic."""
    from streams.producer import read_dead_letters

    letters = asyncio.run(read_dead_letters(ctx.settings.kafka))
    if as_json:
        for dl in letters:
            click.echo(dl.model_dump_json())
        return
    t = Table(title=f"{len(letters)} dead letters on {ctx.settings.kafka.dlq_topic}")
    for col in ("pin", "reason", "attempts", "error"):
        t.add_column(col)
    for dl in letters:
        t.add_row(dl.pin_id or "?", dl.reason.value, str(dl.attempts), dl.error[:80])
    console.print(t)


@dlq.command("show")
@click.argument("pin_id")
@pass_ctx
def dlq_show(ctx: _Ctx, pin_id: str) -> None:
    """Print every dead letter of one pin, with its original event."""
    from streams.producer import read_dead_letters

    letters = [d for d in asyncio.run(read_dead_letters(ctx.settings.kafka))
               if d.pin_id == pin_id]
    if not letters:
        console.print(f"no dead letters for {pin_id}")
    for dl in letters:
        click.echo(dl.model_dump_json(indent=2))


@dlq.command("replay")
@click.option("--reason", help="only letters with this reason code")
@click.option("--pin", "pin_ids", multiple=True, help="only these pins (repeatable)")
@click.option("--dry-run", is_flag=True, help="list what would be replayed")
@pass_ctx
def dlq_replay(ctx: _Ctx, reason: str | None, pin_ids: tuple[str, ...], dry_run: bool) -> None:
    """Re-publish dead letters' original events to the events topic (e.g. after a fix).

    Replays are safe to repeat: the workers' writes are idempotent.
    """
    from streams.producer import publish_raw, read_dead_letters

    letters = asyncio.run(read_dead_letters(ctx.settings.kafka))
    chosen = [d for d in letters if (not reason or d.reason.value == reason)
              and (not pin_ids or d.pin_id in pin_ids)]
    for d in chosen:
        console.print(f"{'would replay' if dry_run else 'replay'} {d.pin_id}: {d.reason.value}")
    if not dry_run and chosen:
        asyncio.run(publish_raw(ctx.settings.kafka, [
            ((d.pin_id or "").encode() or None, d.original_bytes()) for d in chosen]))
    verb = "selected" if dry_run else "replayed"
    console.print(f"{len(chosen)} of {len(letters)} dead letters {verb}")


@cli.group()
def store() -> None:
    """Store maintenance."""


@store.command("verify")
@click.option("--version", "model_version", help="model version (default: live)")
@click.option("--repair/--no-repair", default=False, show_default=True,
              help="copy Milvus records over missing/wrong cache entries, drop extras")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def store_verify(ctx: _Ctx, model_version: str | None, repair: bool, as_json: bool) -> None:
    """Compare the Redis cache with Milvus (existence, version, hash, vector)."""
    from dataclasses import asdict

    from store.milvus import MilvusStore
    from store.reader import EmbeddingReader
    from store.redis import RedisCache
    from store.verify import verify_cache

    async def go() -> Any:
        cache, milvus = RedisCache(ctx.settings.redis), MilvusStore(ctx.settings.milvus)
        try:
            ver = await EmbeddingReader(milvus, cache).resolve_version(model_version)
            return await verify_cache(milvus, cache, ver, repair=repair)
        finally:
            await cache.close()
            await milvus.close()

    rep = asyncio.run(go())
    if as_json:
        click.echo(json.dumps({**asdict(rep), "ok": rep.ok}, indent=2))
    else:
        console.print(f"version {rep.version}: {rep.milvus_pins} pins in Milvus, {rep.cache_pins} "
                      f"cached; missing {len(rep.missing_in_cache)}, stale "
                      f"{len(rep.stale_in_cache)}, wrong vector {len(rep.vector_mismatch)}, extra "
                      f"{len(rep.extra_in_cache)}; repaired {rep.repaired}")
    if not rep.ok and not repair:
        sys.exit(1)


# --------------------------------------------------------------- versions
def _registry_call(settings: Settings, fn: Any) -> Any:
    """Run ``await fn(registry)`` with clients that are closed afterwards."""
    from store.milvus import MilvusStore
    from store.redis import RedisCache
    from store.registry import VersionRegistry

    async def go() -> Any:
        cache, milvus = RedisCache(settings.redis), MilvusStore(settings.milvus)
        try:
            return await fn(VersionRegistry(milvus, cache))
        finally:
            await cache.close()
            await milvus.close()

    return asyncio.run(go())


@cli.group()
def versions() -> None:
    """Model versions: list, create, promote (cutover), rollback, retire."""


@versions.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def versions_list(ctx: _Ctx, as_json: bool) -> None:
    """Every registered version with its state and pin counts."""
    from dataclasses import asdict

    async def go(reg: Any) -> list[dict[str, Any]]:
        out = []
        for v in await reg.all():
            row = asdict(v)
            row["redis_pins"] = await reg.cache.count(v.version)
            out.append(row)
        return out

    rows = _registry_call(ctx.settings, go)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="model versions")
    for col in ("version", "state", "dim", "pins", "model", "checkpoint"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["version"], r["state"], str(r["dim"]), str(r["redis_pins"]), r["model"],
                  r["checkpoint"] or "-")
    console.print(t)


@versions.command("show")
@click.argument("version")
@pass_ctx
def versions_show(ctx: _Ctx, version: str) -> None:
    """One version, with its coverage of the live version."""
    from dataclasses import asdict

    async def go(reg: Any) -> dict[str, Any]:
        info = asdict(await reg.get(version))
        cov = asdict(await reg.coverage(version))
        cov["missing"] = len(cov["missing"])
        return {**info, "coverage": cov}

    click.echo(json.dumps(_registry_call(ctx.settings, go), indent=2))


@versions.command("create")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True),
              help="checkpoint of the new encoder [PINFRESH_ENCODER__CHECKPOINT]")
@click.option("--model", help="open_clip model name [PINFRESH_ENCODER__MODEL]")
@click.option("--seed", type=int, help="seed of untrained projections [PINFRESH_ENCODER__SEED]")
@pass_ctx
def versions_create(ctx: _Ctx, checkpoint: Path | None, model: str | None,
                    seed: int | None) -> None:
    """Register a new encoder as a building version (workers start dual-writing it)."""
    from encoder.engine import ImageEncoder

    upd: dict[str, Any] = {}
    if checkpoint:
        upd["checkpoint"] = checkpoint.resolve()
    if model:
        upd["model"] = model
    if seed is not None:
        upd["seed"] = seed
    es = ctx.settings.encoder.model_copy(update=upd)
    enc = ImageEncoder.load(es)
    info = enc.info
    enc.close()
    live = _registry_call(ctx.settings, lambda reg: reg.register(
        info.version, info.dim, info.model, info.checkpoint, es.seed))
    console.print(f"registered {info.version} (dim {info.dim}) as "
                  f"{'live (first version)' if live else 'building'}; next: "
                  f"`pinfresh backfill --to {info.version}`")


@versions.command("promote")
@click.argument("version")
@click.option("--force", is_flag=True, help="skip the coverage check")
@pass_ctx
def versions_promote(ctx: _Ctx, version: str, force: bool) -> None:
    """Cut every reader over to VERSION at once, after checking it covers every live pin."""
    cov = _registry_call(ctx.settings, lambda reg: reg.promote(version, force=force))
    if cov is None:
        console.print(f"{version} is already live")
    else:
        console.print(f"{version} is live (was {cov.live}); covered {cov.version_pins}/"
                      f"{cov.live_pins} pins, sampled {cov.sampled} equal")


@versions.command("rollback")
@pass_ctx
def versions_rollback(ctx: _Ctx) -> None:
    """Make the previous version live again (while it is retained)."""
    prev = _registry_call(ctx.settings, lambda reg: reg.rollback())
    console.print(f"{prev} is live again")


@versions.command("retire")
@click.argument("version")
@pass_ctx
def versions_retire(ctx: _Ctx, version: str) -> None:
    """Stop writing VERSION and drop its collection and Redis keys."""
    _registry_call(ctx.settings, lambda reg: reg.retire(version))
    console.print(f"{version} retired and dropped")


@cli.command()
@click.option("--to", "target", required=True, help="the building version to fill")
@click.option("--batch", default=32, show_default=True)
@click.option("--max-rate", type=float, help="pins/s cap")
@click.option("--yield-lag", default=100, show_default=True,
              help="pause while the workers' consumer lag is above this (live traffic first)")
@pass_ctx
def backfill(ctx: _Ctx, target: str, batch: int, max_rate: float | None, yield_lag: int) -> None:
    """Re-encode every live pin into VERSION; resumable, skips what is done."""
    from streams.refresh import run_backfill

    rep = asyncio.run(run_backfill(ctx.settings, target, batch=batch, max_rate=max_rate,
                                   yield_lag=yield_lag))
    console.print(f"backfill {rep.source} -> {rep.target}: {rep.pins} pins, {rep.encoded} "
                  f"encoded, {rep.skipped} already done, {rep.dead_letters} dead letters, "
                  f"{rep.pins_per_s:.1f} pins/s, yielded {rep.yielded_s:.1f}s to live traffic")


@cli.command()
@click.option("--older-than", type=float, default=0.0, show_default=True,
              help="seconds since the pin was encoded")
@click.option("--check-content", is_flag=True,
              help="fetch every image and compare its hash with the stored one")
@click.option("--requeue", is_flag=True, help="publish re-encode events for the stale pins")
@pass_ctx
def stale(ctx: _Ctx, older_than: float, check_content: bool, requeue: bool) -> None:
    """Report (and optionally requeue) pins whose embedding is old or whose image changed."""
    from streams.refresh import find_stale, requeue_stale

    found = asyncio.run(find_stale(ctx.settings, older_than, check_content))
    for row in found[:50]:
        console.print(f"{row['pin_id']}: {row['why']}")
    console.print(f"{len(found)} stale pins")
    if requeue and found:
        n = asyncio.run(requeue_stale(ctx.settings, found))
        console.print(f"requeued {n}")


# ---------------------------------------------------------------- encoder
@cli.group()
def encoder() -> None:
    """Serve, train, evaluate and compare encoders."""


@encoder.command("serve")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), required=True,
              help="Unix socket the feeders connect to")
@pass_ctx
def encoder_serve(ctx: _Ctx, socket_path: Path) -> None:
    """Run the encoder process that feeder workers share (one per GPU).

    Model and device: PINFRESH_ENCODER__MODEL, __CHECKPOINT, __DEVICE, __DTYPE;
    `pinfresh worker --devices 0 --feeders N` starts it with its feeders.
    """
    import signal as _signal

    from encoder.loading import load_encoder
    from encoder.server import EncoderServer

    enc = load_encoder(ctx.settings.encoder)
    server = EncoderServer(enc, socket_path)
    _signal.signal(_signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve_forever()
    finally:
        enc.close()


@encoder.command("precision")
@click.option("--model", help="open_clip model name [PINFRESH_ENCODER__MODEL]")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True),
              help="[PINFRESH_ENCODER__CHECKPOINT]")
@click.option("--device", help="cpu, cuda, cuda:N [PINFRESH_ENCODER__DEVICE]")
@click.option("--images", "images_dir", type=click.Path(path_type=Path, file_okay=False),
              help="directory of JPEGs (default: the sample catalog's images)")
@click.option("--limit", default=64, show_default=True, help="images to compare")
@pass_ctx
def encoder_precision(ctx: _Ctx, model: str | None, checkpoint: Path | None,
                      device: str | None, images_dir: Path | None, limit: int) -> None:
    """Min/mean cosine of float16 and bfloat16 embeddings against float32 (same pixels)."""
    from encoder.model import model_spec
    from encoder.precision import COSINE_GATE, measure_agreement

    es = ctx.settings.encoder
    es = es.model_copy(update={k: v for k, v in {"model": model, "checkpoint": checkpoint,
                                                  "device": device}.items() if v is not None})
    if images_dir is not None:
        paths = sorted(p for p in images_dir.iterdir() if p.is_file())[:limit]
    else:
        from streams.catalog import load_catalog

        cat = ctx.settings.stack.data_dir / "catalog" / "tuxpaint.jsonl"
        paths = [Path(it.image) for it in load_catalog(cat, limit)]
    rows = measure_agreement(es, [p.read_bytes() for p in paths])
    own = model_spec(es.model, es.checkpoint).cuda_dtype
    t = Table(title=f"{es.model} on {es.device}: agreement with float32 ({rows[0].images} "
                    f"images; gate {COSINE_GATE}; the model's CUDA dtype is {own})")
    for col in ("dtype", "min cosine", "mean cosine", "forward img/s (rough)", "gate"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.dtype, f"{r.min_cosine:.6f}", f"{r.mean_cosine:.6f}",
                  f"{r.forward_img_per_s:.0f}", "pass" if r.passes else "FAIL")
    console.print(t)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _train_config(epochs: int, unfreeze_last: int, seed: int) -> Any:
    from encoder.train import TrainConfig

    return TrainConfig(epochs=epochs, unfreeze_last=unfreeze_last, seed=seed)


_catalog_opt = click.option(
    "--catalog", "catalogs", multiple=True, type=click.Path(path_type=Path),
    help="JSONL catalog(s) of (image, caption); repeatable")
_epochs_opt = click.option("--epochs", default=60, show_default=True)
_unfreeze_opt = click.option("--unfreeze-last", default=0, show_default=True,
                             help="also train the last N stages of the image trunk")
_seed_opt = click.option("--seed", default=0, show_default=True)


@encoder.command("train")
@_catalog_opt
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="checkpoint directory to write")
@click.option("--hold-out/--no-hold-out", default=True, show_default=True,
              help="keep the held-out captions of the catalogs out of training")
@_epochs_opt
@_unfreeze_opt
@_seed_opt
@pass_ctx
def encoder_train(ctx: _Ctx, catalogs: tuple[Path, ...], out: Path, hold_out: bool,
                  epochs: int, unfreeze_last: int, seed: int) -> None:
    """Train the domain encoder (LiT: frozen towers, trained projections) on catalogs.

    Default catalogs: the sample Tux Paint catalog plus the emoji corpus.
    """
    from encoder.data import read_pairs, split_by_caption
    from encoder.model import DEFAULT_MODEL, model_spec
    from encoder.train import train_checkpoint

    _quiet_transformers()
    data = ctx.settings.stack.data_dir.resolve()
    paths = list(catalogs) or [data / "catalog" / "tuxpaint.jsonl",
                               data / "catalog" / "emoji.jsonl"]
    pairs = read_pairs(paths)
    train_pairs, test_pairs = split_by_caption(pairs) if hold_out else (pairs, [])
    version, metrics, losses = train_checkpoint(
        model_spec(DEFAULT_MODEL), train_pairs, out, data / "cache" / "features",
        _train_config(epochs, unfreeze_last, seed), test_pairs,
        {"catalogs": [str(p) for p in paths], "held_out_pairs": len(test_pairs)})
    console.print(f"version {version} -> {out} (loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    if metrics:
        console.print(json.dumps(metrics))


@encoder.command("eval")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True),
              help="pinfresh checkpoint dir (default: the untrained default model)")
@_catalog_opt
@pass_ctx
def encoder_eval(ctx: _Ctx, checkpoint: Path | None, catalogs: tuple[Path, ...]) -> None:
    """Recall@1/5/10 (text->image, image->text) on the held-out split of catalogs."""
    from encoder.data import read_pairs, split_by_caption
    from encoder.model import build_clip, model_spec
    from encoder.train import compute_features, evaluate

    _quiet_transformers()
    data = ctx.settings.stack.data_dir.resolve()
    paths = list(catalogs) or [data / "catalog" / "tuxpaint.jsonl"]
    _, test = split_by_caption(read_pairs(paths))
    spec = model_spec(ctx.settings.encoder.model, checkpoint)
    model = build_clip(spec, checkpoint)
    feats = compute_features(model, spec, test, data / "cache" / "features")
    click.echo(json.dumps({"checkpoint": str(checkpoint), "held_out_pairs": len(feats.pairs),
                           **evaluate(model, feats)}, indent=2))


@encoder.command("compare")
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/encoder_recall.json"), show_default=True)
@_epochs_opt
@_unfreeze_opt
@_seed_opt
@pass_ctx
def encoder_compare(ctx: _Ctx, out: Path, epochs: int, unfreeze_last: int, seed: int) -> None:
    """Untrained vs generic (emoji) vs domain (emoji + Tux Paint train) on held-out Tux Paint."""
    from encoder.data import read_pairs
    from encoder.train import compare_encoders
    from streams.catalog import prepare_emoji_catalog, prepare_sample_catalog

    _quiet_transformers()
    data = ctx.settings.stack.data_dir.resolve()
    t0 = time.perf_counter()
    res = compare_encoders(
        read_pairs([prepare_sample_catalog(data)]), read_pairs([prepare_emoji_catalog(data)]),
        data / "models", data / "cache" / "features", _train_config(epochs, unfreeze_last, seed))
    res["_meta"]["command_wall_time_s"] = round(time.perf_counter() - t0, 1)
    t = Table(title=f"held-out Tux Paint: {res['_meta']['held_out_pairs']} images, "
                    f"{res['_meta']['held_out_captions']} captions never seen in training")
    keys = ["t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"]
    t.add_column("model")
    for k in keys:
        t.add_column(k, justify="right")
    for name in ("untrained", "generic", "domain"):
        t.add_row(name, *[f"{res[name][k]:.3f}" for k in keys])
    console.print(t)
    console.print(f"checkpoints: {res['_meta']['checkpoints']}; "
                  f"wall time {res['_meta']['command_wall_time_s']} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    console.print(f"wrote {out}")


# ------------------------------------------------------------------ graft
@cli.group()
def graft() -> None:
    """The grafted LM: SmolLM2 reading precomputed pin embeddings through a projector."""


def _graft_dir(settings: Settings, version: str) -> Path:
    return settings.stack.data_dir.resolve() / "models" / f"graft-{version}"


@graft.command("train")
@click.option("--epochs", default=4, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="default: data/models/graft-<version>")
@pass_ctx
def graft_train(ctx: _Ctx, epochs: int, out: Path | None) -> None:
    """Train a projector on (pin embedding, caption) pairs of the live version, LM frozen.

    Pins whose caption is in the held-out split are left out (they are the eval set).
    """
    import numpy as np

    from encoder.data import is_test_caption
    from encoder.graft import load_lm, save_projector, train_projector
    from store.milvus import MilvusStore
    from store.redis import RedisCache

    async def read() -> tuple[str, list[str], Any]:
        cache, milvus = RedisCache(ctx.settings.redis), MilvusStore(ctx.settings.milvus)
        try:
            live = await cache.get_live()
            if live is None:
                raise PinfreshError("no live version: run the pipeline first")
            rows = [r for r in await milvus.iter_pins(live)
                    if r["caption"] and not is_test_caption(r["caption"], 0.25)]
            vecs, found = await cache.get_vectors(live, [r["pin_id"] for r in rows])
            return live, [r["caption"] for r, f in zip(rows, found, strict=True) if f], \
                vecs[found]
        finally:
            await cache.close()
            await milvus.close()

    version, captions, vecs = asyncio.run(read())
    lm, tok = load_lm()
    proj, losses = train_projector(lm, tok, np.asarray(vecs), captions, epochs=epochs)
    out = out or _graft_dir(ctx.settings, version)
    save_projector(proj, out, version, {"pairs": len(captions), "losses": losses})
    console.print(f"projector for {version} ({len(captions)} pins, loss {losses[0]:.3f} -> "
                  f"{losses[-1]:.3f}) -> {out}")


@graft.command("ask")
@click.argument("pin_id")
@click.argument("question")
@click.option("--projector", type=click.Path(path_type=Path),
              help="default: data/models/graft-<live version>")
@pass_ctx
def graft_ask(ctx: _Ctx, pin_id: str, question: str, projector: Path | None) -> None:
    """Answer QUESTION about PIN_ID from its precomputed embedding (never encodes the image)."""
    from encoder.graft import answer, check_version, load_lm, load_projector
    from store.milvus import MilvusStore
    from store.reader import EmbeddingReader
    from store.redis import RedisCache

    async def read() -> Any:
        cache, milvus = RedisCache(ctx.settings.redis), MilvusStore(ctx.settings.milvus)
        try:
            return await EmbeddingReader(milvus, cache).get_many([pin_id])
        finally:
            await cache.close()
            await milvus.close()

    res = asyncio.run(read())
    if not res.found[0]:
        raise PinfreshError(f"pin {pin_id} has no embedding in version {res.version}")
    proj, manifest = load_projector(projector or _graft_dir(ctx.settings, res.version))
    check_version(manifest, res.version)
    lm, tok = load_lm()
    click.echo(answer(lm, tok, proj, res.vectors[0], question))


@graft.command("eval")
@click.option("--epochs", default=4, show_default=True)
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/graft_eval.json"), show_default=True)
@pass_ctx
def graft_eval(ctx: _Ctx, epochs: int, out: Path) -> None:
    """Multiple-choice caption accuracy on held-out pins: shuffled vs generic vs domain.

    Needs the generic and domain checkpoints of `pinfresh encoder compare`.
    """
    import numpy as np

    from encoder.config import EncoderSettings
    from encoder.data import read_pairs, split_by_caption
    from encoder.engine import ImageEncoder
    from encoder.graft import load_lm, multiple_choice_accuracy, save_projector, train_projector

    data = ctx.settings.stack.data_dir.resolve()
    train, test = split_by_caption(read_pairs([data / "catalog" / "tuxpaint.jsonl"]))
    lm, tok = load_lm()
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    embs: dict[str, tuple[Any, list[str], Any, list[str]]] = {}
    for name in ("generic", "domain"):
        ckpt = data / "models" / name
        if not (ckpt / "pinfresh.json").is_file():
            raise PinfreshError(f"{ckpt} missing: run `pinfresh encoder compare` first")
        enc = ImageEncoder.load(EncoderSettings(checkpoint=ckpt))
        sets = []
        for pairs in (train, test):
            vecs = enc.encode_images([p.image.read_bytes() for p in pairs])
            keep = [(v, p.caption) for v, p in zip(vecs, pairs, strict=True)
                    if isinstance(v, np.ndarray)]
            sets.append((np.stack([v for v, _ in keep]), [c for _, c in keep]))
        embs[name] = (*sets[0], *sets[1])
        proj, losses = train_projector(lm, tok, sets[0][0], sets[0][1], epochs=epochs)
        save_projector(proj, data / "models" / f"graft-eval-{name}", enc.version,
                       {"pairs": len(sets[0][1]), "losses": losses})
        res[f"{name}_acc"] = round(multiple_choice_accuracy(lm, tok, proj, *sets[1]), 4)
        res[f"{name}_final_loss"] = round(losses[-1], 4)
        if name == "domain":
            perm = np.random.default_rng(0).permutation(len(sets[1][1]))
            res["shuffled_acc"] = round(multiple_choice_accuracy(
                lm, tok, proj, sets[1][0][perm], sets[1][1]), 4)
        enc.close()
    res.update({"held_out_pins": len(embs["domain"][3]), "choices": 5, "chance": 0.2,
                "train_pins": len(embs["domain"][1]), "epochs": epochs,
                "wall_time_s": round(time.perf_counter() - t0, 1)})
    t = Table(title=f"graft eval: {res['held_out_pins']} held-out pins, true caption among 5")
    t.add_column("embeddings")
    t.add_column("accuracy", justify="right")
    for k in ("shuffled", "generic", "domain"):
        t.add_row(k, f"{res[k + '_acc']:.3f}")
    console.print(t)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    console.print(f"wrote {out} ({res['wall_time_s']} s)")


# ------------------------------------------------------------ demo, bench
@cli.command()
@click.option("--catalog", "catalog_path", type=click.Path(path_type=Path, exists=True),
              help="catalog to publish (default: the Tux Paint sample)")
@click.option("--limit", type=int, help="publish at most N pins")
@pass_ctx
def demo(ctx: _Ctx, catalog_path: Path | None, limit: int | None) -> None:
    """Stack up, sample catalog published and encoded, summary printed."""
    from streams.demo import run_demo

    run_demo(ctx.settings, catalog_path, limit, console)


@cli.group()
def bench() -> None:
    """Benchmarks (print a table, write JSON under bench/results/)."""


@bench.command("pipeline")
@click.option("--encoder", "encoder_kind", type=click.Choice(["model", "null"]),
              default="model", show_default=True,
              help="null: measure feeders with a stub encoder (bare consumer, 1/2/4 feeders, "
              "files and HTTP) and write bench/results/pipeline_null.json")
@click.option("--pins", type=int, default=None,
              help="pins for capacity [default: 400; with --encoder null, 6000 per round]")
@click.option("--fresh-pins", type=int, default=200, show_default=True,
              help="pins published at half capacity for freshness")
@click.option("--feeders", default="1,2,4", show_default=True,
              help="with --encoder null: feeder counts to measure")
@click.option("--sources", default="file,http", show_default=True,
              help="with --encoder null: image sources to measure")
@click.option("--repeat", default=3, show_default=True,
              help="with --encoder null: runs per configuration (the median is reported)")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="[default: bench/results/pipeline.json, or pipeline_null.json]")
@pass_ctx
def bench_pipeline(ctx: _Ctx, encoder_kind: str, pins: int | None, fresh_pins: int,
                   feeders: str, sources: str, repeat: int, out: Path | None) -> None:
    """Bare encoder vs whole pipeline on this machine, and freshness at half capacity.

    With --encoder null: the stream machinery alone (feeders with a stub
    encoder) against a bare Faust consumer measured in the same run.
    """
    if encoder_kind == "null":
        from streams.bench_null import run_null_bench

        run_null_bench(ctx.settings, pins or 6000, [int(x) for x in feeders.split(",")],
                       [x.strip() for x in sources.split(",")],
                       out or Path("bench/results/pipeline_null.json"), console, repeat=repeat)
        return
    from streams.bench import run_pipeline_bench

    run_pipeline_bench(ctx.settings, pins or 400, fresh_pins,
                       out or Path("bench/results/pipeline.json"), console)


@bench.command("refresh")
@click.option("--pins", type=int, default=600, show_default=True, help="catalog to backfill")
@click.option("--rate", type=float, default=5.0, show_default=True, help="live pins/s")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/refresh.json"),
              show_default=True)
@pass_ctx
def bench_refresh(ctx: _Ctx, pins: int, rate: float, out: Path) -> None:
    """Backfill throughput and live freshness with/without a backfill running."""
    from streams.bench import run_refresh_bench

    run_refresh_bench(ctx.settings, pins, rate, out, console)


@bench.command("read")
@click.option("--pins", type=int, default=300, show_default=True)
@click.option("--requests", type=int, default=500, show_default=True)
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/read_vs_encode.json"), show_default=True)
@pass_ctx
def bench_read(ctx: _Ctx, pins: int, requests: int, out: Path) -> None:
    """Why precompute: read 25 embeddings via the API vs encode 25 images per request."""
    from streams.bench import run_read_bench

    run_read_bench(ctx.settings, pins, requests, out, console)


@bench.command("encode")
@click.option("--images", "images_dir", type=click.Path(path_type=Path, file_okay=False),
              help="directory of JPEGs (default: a corpus made under the data dir)")
@click.option("--make", "make_n", type=int, default=256, show_default=True,
              help="JPEGs to make when --images is not given")
@click.option("--size", default="736x920", show_default=True, help="WxH of made JPEGs")
@click.option("--limit", type=int, help="use at most N images")
@click.option("--model", help="open_clip model name [PINFRESH_ENCODER__MODEL]")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True),
              help="local checkpoint (default: packaged or random weights)")
@click.option("--device", help="cpu, cuda, cuda:N [PINFRESH_ENCODER__DEVICE]")
@click.option("--batch-size", type=int, help="0 = auto [PINFRESH_ENCODER__BATCH_SIZE]")
@click.option("--prepare", type=click.Choice(["auto", "pil", "tensor"]),
              help="decode path [PINFRESH_ENCODER__PREPARE]")
@click.option("--prepare-pool", type=click.Choice(["thread", "process"]),
              help="CPU decode pool [PINFRESH_ENCODER__PREPARE_POOL]")
@click.option("--seconds", type=float, default=3.0, show_default=True,
              help="minimum length of each timed run (median of 3)")
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/encode.json"), show_default=True)
@pass_ctx
def bench_encode(ctx: _Ctx, images_dir: Path | None, make_n: int, size: str,
                 limit: int | None, model: str | None, checkpoint: Path | None,
                 device: str | None, batch_size: int | None, prepare: str | None,
                 prepare_pool: str | None, seconds: float, out: Path) -> None:
    """JPEG bytes -> vectors: pipeline vs bare-forward and decode-only ceilings."""
    from streams.bench_encode import make_jpeg_corpus, run_encode_bench
    from streams.catalog import prepare_sample_catalog

    s = ctx.settings
    updates = {k: v for k, v in dict(model=model, checkpoint=checkpoint, device=device,
                                     batch_size=batch_size, prepare=prepare,
                                     prepare_pool=prepare_pool).items() if v is not None}
    enc_settings = s.encoder.model_copy(update=updates)
    enc_settings = type(enc_settings).model_validate(enc_settings.model_dump())
    source = None
    if images_dir is None:
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError as exc:
            raise click.BadParameter(f"--size wants WxH, got {size!r}") from exc
        images_dir = s.stack.data_dir / "bench" / f"jpeg-{w}x{h}-{make_n}"
        marker = images_dir / "SOURCE"
        if not marker.exists():
            catalog = prepare_sample_catalog(s.stack.data_dir.resolve())
            what = make_jpeg_corpus(images_dir, make_n, width=w, height=h, catalog=catalog)
            marker.write_text(what + "\n")
        source = marker.read_text().strip() + f", {w}x{h} JPEG q90"
    run_encode_bench(enc_settings, images_dir, limit, seconds, out, console, source)


def main() -> None:
    """Console-script entry point; turns PinfreshError into a one-line message on stderr."""
    try:
        cli(standalone_mode=True)
    except PinfreshError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
