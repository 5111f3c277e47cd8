"""Operator commands: ``dlq`` and ``store``."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click
from rich.table import Table

from streams.cli.base import Ctx, cli, console, pass_ctx


@cli.group()
def dlq() -> None:
    """Dead letters."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@pass_ctx
def dlq_list(ctx: Ctx, as_json: bool) -> None:
    """List the dead letters on the DLQ topic."""
    from streams.producer import read_dead_letters

    letters = asyncio.run(read_dead_letters(ctx.settings.kafka))
    if as_json:
        for dl in letters:
            click.echo(dl.model_dump_json())
        return
    t = Table(title=f"{len(letters)} dead letters on {ctx.settings.kafka.dlq_topic}")
    t.add_column("pin", overflow="fold")  # ids are never cut with an ellipsis
    for col in ("reason", "attempts"):
        t.add_column(col)
    t.add_column("error", overflow="fold")
    for dl in letters:
        t.add_row(dl.pin_id or "?", dl.reason.value, str(dl.attempts), dl.error[:80])
    console.print(t)


@dlq.command("show")
@click.argument("pin_id")
@pass_ctx
def dlq_show(ctx: Ctx, pin_id: str) -> None:
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
@click.option("--force", is_flag=True,
              help="also replay letters older than the tombstone TTL (PINFRESH_REDIS__"
              "TOMBSTONE_TTL_S): a delete of their pin may be forgotten by now")
@pass_ctx
def dlq_replay(ctx: Ctx, reason: str | None, pin_ids: tuple[str, ...], dry_run: bool,
               force: bool) -> None:
    """Re-publish dead letters' original events to the events topic (e.g. after a fix).

    Replays are safe to repeat within the tombstone TTL: the workers' writes
    are idempotent, and a replayed upsert of a pin deleted since is refused by
    its tombstone. A letter older than the TTL is skipped unless --force: its
    pin's tombstone may have expired, and the old upsert would bring a deleted
    pin back.
    """
    import time

    from streams.producer import publish_raw, read_dead_letters

    letters = asyncio.run(read_dead_letters(ctx.settings.kafka))
    chosen = [d for d in letters if (not reason or d.reason.value == reason)
              and (not pin_ids or d.pin_id in pin_ids)]
    ttl = ctx.settings.redis.tombstone_ttl_s
    old = [d for d in chosen if time.time() - d.failed_at > ttl]
    if old and not force:
        chosen = [d for d in chosen if d not in old]
        console.print(f"skipped {len(old)} letter(s) older than the tombstone TTL ({ttl}s): a "
                      "delete of their pin may be forgotten and the replay would bring it "
                      "back; check those pins, then replay them with --force")
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
@click.option("--model-version", "model_version", help="model version id (default: live)")
@click.option("--repair/--no-repair", default=False, show_default=True,
              help="copy Milvus records over missing/wrong cache entries, drop extras")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def store_verify(ctx: Ctx, model_version: str | None, repair: bool, as_json: bool) -> None:
    """Compare the Redis cache with Milvus (existence, version, hash, vector)."""
    from dataclasses import asdict

    from store.lifecycle import open_stores
    from store.verify import verify_cache

    async def go() -> Any:
        async with open_stores(ctx.settings) as stores:
            ver = await stores.reader.resolve_version(model_version)
            return await verify_cache(stores.milvus, stores.cache, ver, repair=repair)

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


@store.command("migrate-keys")
@pass_ctx
def store_migrate_keys(ctx: Ctx) -> None:
    """Rename a single node's keys from pinfresh 0.1's layout to the cluster-ready one.

    Run once, with the workers stopped, before starting this version. Safe to
    run again; keys already moved are skipped.
    """
    from store.lifecycle import open_stores
    from store.migrate import migrate_keys

    async def go() -> Any:
        async with open_stores(ctx.settings) as stores:
            return await migrate_keys(stores.cache)

    done = asyncio.run(go())
    console.print("moved " + (", ".join(f"{n} {k}" for k, n in sorted(done.items()))
                              or "nothing: the keys already use this layout"))
