"""Model versions and refresh: ``versions``, ``backfill``, ``stale``."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from streams.cli.base import Ctx, cli, console, err_console, pass_ctx
from streams.settings import Settings


def _registry_call(settings: Settings, fn: Any) -> Any:
    """Run ``await fn(registry)`` with clients that are closed afterwards."""
    from store.lifecycle import open_stores

    async def go() -> Any:
        async with open_stores(settings) as stores:
            return await fn(stores.registry)

    return asyncio.run(go())


@cli.group()
def versions() -> None:
    """Model versions: list, create, promote (cutover), rollback, retire."""


@versions.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def versions_list(ctx: Ctx, as_json: bool) -> None:
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
    # ids are never cut: at 80 columns a cut id made two versions look the same
    t.add_column("version", no_wrap=True, overflow="fold", min_width=20)
    t.add_column("state", min_width=8)
    for col in ("dim", "pins"):
        t.add_column(col)
    t.add_column("model", overflow="fold")
    t.add_column("checkpoint", overflow="fold")
    for r in rows:
        t.add_row(r["version"], r["state"], str(r["dim"]), str(r["redis_pins"]), r["model"],
                  r["checkpoint"] or "-")
    console.print(t)


@versions.command("show")
@click.argument("version")
@pass_ctx
def versions_show(ctx: Ctx, version: str) -> None:
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
def versions_create(ctx: Ctx, checkpoint: Path | None, model: str | None,
                    seed: int | None) -> None:
    """Register a new encoder as a building version (workers start dual-writing it)."""
    from encoder.loading import load_encoder

    upd: dict[str, Any] = {}
    if checkpoint:
        upd["checkpoint"] = checkpoint.resolve()
    if model:
        upd["model"] = model
    if seed is not None:
        upd["seed"] = seed
    es = ctx.settings.encoder.model_copy(update=upd)
    enc = load_encoder(es)
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
def versions_promote(ctx: Ctx, version: str, force: bool) -> None:
    """Cut every reader over to VERSION at once, after checking it covers every live pin."""
    cov = _registry_call(ctx.settings, lambda reg: reg.promote(version, force=force))
    if cov is None:
        console.print(f"{version} is already live")
    else:
        console.print(f"{version} is live (was {cov.live}); covered {cov.version_pins}/"
                      f"{cov.live_pins} pins, sampled {cov.sampled} equal")


@versions.command("rollback")
@pass_ctx
def versions_rollback(ctx: Ctx) -> None:
    """Make the previous version live again (while it is retained)."""
    prev = _registry_call(ctx.settings, lambda reg: reg.rollback())
    console.print(f"{prev} is live again")


@versions.command("retire")
@click.argument("version")
@click.option("--wait", "wait_s", type=float, default=300.0, show_default=True,
              help="longest wait for the workers to stop writing VERSION before the drop")
@pass_ctx
def versions_retire(ctx: Ctx, version: str, wait_s: float) -> None:
    """Stop writing VERSION, wait until no worker's batch writes it, then drop it.

    Two phases: the version is marked retired (workers drop it from their write
    set at their next registry read, every 3 s), then its Milvus collection and
    Redis keys are dropped once every running worker's reported batches have
    let go of it (at most --wait seconds; after that it is dropped anyway, and a
    batch still writing it leaves it out when it finds the collection gone).
    """
    clean = _registry_call(ctx.settings, lambda reg: reg.retire(version, wait_s=wait_s))
    console.print(f"{version} retired and dropped"
                  + ("" if clean else f" (workers still reported it after {wait_s:.0f}s)"))


@cli.command()
@click.option("--to", "target", required=True, help="the building version to fill")
@click.option("--batch", default=256, show_default=True,
              help="pins per round; each round's lookups wait for the previous round's "
              "writes to be visible (Session consistency: about one Milvus time tick, "
              "200-400 ms on the 2.3.5 server), so small batches cap the rate")
@click.option("--max-rate", type=float, help="pins/s cap")
@click.option("--yield-lag", default=100, show_default=True,
              help="pause while the workers' consumer lag is above this (live traffic first)")
@click.option("--shard", default="0/1", show_default=True,
              help="I/N: only the pins whose id hashes to shard I of N (CRC-32), so N hosts "
              "can share one backfill, each with its own --shard")
@click.option("--catalog-root", type=click.Path(path_type=Path),
              help="allow file paths under this dir, as `worker --catalog-root` "
              "[PINFRESH_FETCH__CATALOG_ROOT]")
@click.option("--encoder-socket", type=click.Path(path_type=Path, dir_okay=False),
              help="encode through this encoder process (a `--feeders` pool's: "
              "data/run/encoder-<GPU>.sock, e.g. encoder-0.sock; a CPU pool's is "
              "encoder-cpu.sock): it loads VERSION on its device and this command loads "
              "no model [PINFRESH_ENCODER__REMOTE]")
@pass_ctx
def backfill(ctx: Ctx, target: str, batch: int, max_rate: float | None, yield_lag: int,
             shard: str, catalog_root: Path | None, encoder_socket: Path | None) -> None:
    """Re-encode every live pin into VERSION; resumable, skips what is done.

    Reads the catalog from the live version in Milvus, a page at a time. Refuses
    to start when the catalog has file paths and no catalog root is set; exits 1
    when pins were dead-lettered (`pinfresh dlq list` shows them).
    """
    from streams.refresh import run_backfill

    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise click.BadParameter("I/N, e.g. 0/4", param_hint="--shard") from None
    s = ctx.settings
    if catalog_root:
        s = s.model_copy(update={"fetch": s.fetch.model_copy(
            update={"catalog_root": catalog_root})})
    if encoder_socket:
        if not encoder_socket.exists():
            raise click.BadParameter(f"{encoder_socket} does not exist: start the pool "
                                     "(`pinfresh worker --feeders N`) first",
                                     param_hint="--encoder-socket")
        s = s.model_copy(update={"encoder": s.encoder.model_copy(
            update={"remote": encoder_socket.resolve()})})
    rep = asyncio.run(run_backfill(s, target, batch=batch, max_rate=max_rate,
                                   yield_lag=yield_lag, shard=(i, n)))
    console.print(f"backfill {rep.source} -> {rep.target}: {rep.pins} pins, {rep.encoded} "
                  f"encoded, {rep.skipped} already done, {rep.dead_letters} dead letters, "
                  f"{rep.pins_per_s:.1f} pins/s, yielded {rep.yielded_s:.1f}s to live traffic")
    if rep.dead_letters:
        err_console.print(f"[red]{rep.dead_letters} pins were dead-lettered[/] and are not in "
                          f"{rep.target}: `pinfresh dlq list` shows why; fix and run the "
                          "backfill again (it skips what is done)", highlight=False)
        sys.exit(1)


@cli.command()
@click.option("--older-than", type=float, default=30 * 24 * 3600.0, show_default=True,
              help="seconds since the pin was encoded (default: 30 days)")
@click.option("--check-content", is_flag=True,
              help="fetch every image and compare its hash with the stored one")
@click.option("--requeue", is_flag=True, help="publish re-encode events for the stale pins")
@pass_ctx
def stale(ctx: Ctx, older_than: float, check_content: bool, requeue: bool) -> None:
    """Report (and optionally requeue) pins whose embedding is old or whose image changed."""
    from streams.refresh import find_stale, requeue_stale

    found = asyncio.run(find_stale(ctx.settings, older_than, check_content))
    for row in found[:50]:
        console.print(f"{row['pin_id']}: {row['why']}")
    console.print(f"{len(found)} stale pins")
    if requeue and found:
        n = asyncio.run(requeue_stale(ctx.settings, found))
        console.print(f"requeued {n}")
