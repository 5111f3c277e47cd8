"""Operator commands: ``dlq`` and ``store``."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click
from rich.table import Table

from encoder.errors import Reason
from streams.cli.base import Ctx, cli, console, err_console, pass_ctx


@cli.group()
def dlq() -> None:
    """Dead letters."""


def _read_letters(ctx: Ctx, tolerate_redis_down: bool = False,
                  ) -> tuple[list[Any], dict[str, tuple[str, float]]]:
    """Every letter on the DLQ topic, and the marks (resolved, purged, replayed) in Redis."""
    from encoder.errors import Unavailable
    from store.redis import RedisCache
    from streams.producer import read_dead_letters

    async def go() -> tuple[list[Any], dict[str, tuple[str, float]]]:
        letters = await read_dead_letters(ctx.settings.kafka)
        cache = RedisCache(ctx.settings.redis)
        try:
            return letters, await cache.dlq_marks()
        except Unavailable as exc:
            if not tolerate_redis_down:
                raise
            err_console.print(f"[yellow]Redis is unreachable ({exc}): closed letters cannot be "
                              "told apart; every letter is shown as open[/]", highlight=False)
            return letters, {}
        finally:
            await cache.close()

    return asyncio.run(go())


def _mark(ctx: Ctx, keys: list[str], state: str, at: float) -> None:
    from store.redis import RedisCache

    async def go() -> None:
        cache = RedisCache(ctx.settings.redis)
        try:
            await cache.dlq_mark(keys, state, at)
        finally:
            await cache.close()

    asyncio.run(go())


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.option("--all", "show_all", is_flag=True,
              help="every letter on the topic, copies and closed ones included")
@pass_ctx
def dlq_list(ctx: Ctx, as_json: bool, show_all: bool) -> None:
    """List the open dead letters: one per original event, its newest copy.

    A letter is closed by `dlq resolve`, `dlq purge` or `dlq replay`; if its
    event fails again, the new copy opens it again (one row, copies + 1).
    """
    from streams.dlq import OpenLetter, letter_key, open_letters

    letters, marks = _read_letters(ctx, tolerate_redis_down=True)
    rows = ([OpenLetter(d, 1, letter_key(d)) for d in letters] if show_all
            else open_letters(letters, marks))
    if as_json:
        for o in rows:
            click.echo(json.dumps({**json.loads(o.letter.model_dump_json()),
                                   "copies": o.copies, "key": o.key}))
        return
    what = "dead letters" if show_all else "open dead letters"
    t = Table(title=f"{len(rows)} {what} on {ctx.settings.kafka.dlq_topic} "
              f"({len(letters)} letters in all)")
    t.add_column("pin", overflow="fold")  # ids are never cut with an ellipsis
    for col in ("reason", "copies"):
        t.add_column(col)
    t.add_column("error", overflow="fold")
    for o in rows:
        t.add_row(o.letter.pin_id or "?", o.letter.reason.value, str(o.copies),
                  o.letter.error[:80])
    console.print(t)


def _close_letters(ctx: Ctx, state: str, reason: str | None, pin_ids: tuple[str, ...],
                   older_than: float | None, every: bool) -> None:
    import time

    from streams.dlq import open_letters

    if not (reason or pin_ids or older_than is not None or every):
        raise click.UsageError("name what to close: --reason, --pin, --older-than or --all")
    letters, marks = _read_letters(ctx)
    now = time.time()
    chosen = [o for o in open_letters(letters, marks)
              if (not reason or o.letter.reason.value == reason)
              and (not pin_ids or o.letter.pin_id in pin_ids)
              and (older_than is None or now - o.letter.failed_at > older_than)]
    _mark(ctx, [o.key for o in chosen], state, now)
    console.print(f"{state} {len(chosen)} open dead letter(s)")


def _close_options(fn: Any) -> Any:
    for opt in reversed([
            click.option("--reason", type=click.Choice([r.value for r in Reason]),
                         help="only letters with this reason code"),
            click.option("--pin", "pin_ids", multiple=True, help="only these pins (repeatable)"),
            click.option("--older-than", type=float,
                         help="only letters whose newest copy is older than N seconds"),
            click.option("--all", "every", is_flag=True, help="every open letter")]):
        fn = opt(fn)
    return fn


@dlq.command("resolve")
@_close_options
@pass_ctx
def dlq_resolve(ctx: Ctx, reason: str | None, pin_ids: tuple[str, ...],
                older_than: float | None, every: bool) -> None:
    """Mark open letters resolved (fixed another way); they leave `list` and `status`."""
    _close_letters(ctx, "resolved", reason, pin_ids, older_than, every)


@dlq.command("purge")
@_close_options
@pass_ctx
def dlq_purge(ctx: Ctx, reason: str | None, pin_ids: tuple[str, ...],
              older_than: float | None, every: bool) -> None:
    """Mark open letters purged (given up on). The topic's records go with its retention."""
    _close_letters(ctx, "purged", reason, pin_ids, older_than, every)


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
@click.option("--reason", type=click.Choice([r.value for r in Reason]),
              help="only letters with this reason code")
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

    from streams.dlq import open_letters
    from streams.producer import publish_raw

    letters, marks = _read_letters(ctx)
    opened = open_letters(letters, marks)
    chosen = [o for o in opened if (not reason or o.letter.reason.value == reason)
              and (not pin_ids or o.letter.pin_id in pin_ids)]
    ttl = ctx.settings.redis.tombstone_ttl_s
    old = [o for o in chosen if time.time() - o.letter.failed_at > ttl]
    if old and not force:
        chosen = [o for o in chosen if o not in old]
        console.print(f"skipped {len(old)} letter(s) older than the tombstone TTL ({ttl}s): a "
                      "delete of their pin may be forgotten and the replay would bring it "
                      "back; check those pins, then replay them with --force")
    for o in chosen:
        console.print(f"{'would replay' if dry_run else 'replay'} {o.letter.pin_id}: "
                      f"{o.letter.reason.value}")
    if not dry_run and chosen:
        # closed as of just before publishing: a replayed event that fails again writes
        # a newer copy, which opens the same letter again (one row, not two); if the
        # publish fails, nothing is marked and the letters stay open
        t0 = time.time()
        asyncio.run(publish_raw(ctx.settings.kafka, [
            ((o.letter.pin_id or "").encode() or None, o.letter.original_bytes())
            for o in chosen]))
        _mark(ctx, [o.key for o in chosen], "replayed", t0)
    verb = "selected" if dry_run else "replayed"
    console.print(f"{len(chosen)} of {len(opened)} open dead letters {verb}")


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
