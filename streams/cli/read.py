"""Commands that read embeddings: ``serve``, ``get``, ``similar``."""

from __future__ import annotations

import asyncio
import json

import click
from rich.table import Table

from streams.cli.base import Ctx, cli, console, err_console, pass_ctx


@cli.command()
@click.option("--host", help="bind address [PINFRESH_API__HOST] (default loopback)")
@click.option("--port", type=int, help="port [PINFRESH_API__PORT]")
@pass_ctx
def serve(ctx: Ctx, host: str | None, port: int | None) -> None:
    """Run the read API (batch get, similar, healthz, readyz, metrics)."""
    import uvicorn

    from store.api import create_app

    s = ctx.settings
    app = create_app(s.api, s.redis, s.milvus)
    where_host, where_port = host or s.api.host, port or s.api.port
    err_console.print(f"read API on http://{where_host}:{where_port} (POST "
                      "/v1/embeddings:batchGet, /v1/similar; GET /healthz /readyz /metrics); "
                      "Ctrl-C or `pinfresh down` stops it", highlight=False)
    from streams.runtime.processes import register_worker

    try:  # `pinfresh down` stops this data dir's read APIs with its workers
        register_worker(s)
    except OSError as exc:  # a read-only image without a data dir: serve anyway
        err_console.print(f"not recorded for `pinfresh down` ({exc})", highlight=False)
    uvicorn.run(app, host=where_host, port=where_port, log_level="warning", access_log=False)


@cli.command()
@click.argument("pin_ids", nargs=-1, required=True)
@click.option("--model-version", "model_version", help="model version id (default: live)")
@pass_ctx
def get(ctx: Ctx, pin_ids: tuple[str, ...], model_version: str | None) -> None:
    """Read embeddings (Redis first, Milvus fallback) and print a summary."""
    from store.lifecycle import open_stores

    async def go() -> None:
        async with open_stores(ctx.settings) as stores:
            res = await stores.reader.get_many(list(pin_ids), model_version)
            click.echo(json.dumps({
                "version": res.version,
                "pins": [{"pin_id": p, "found": bool(f), "head": [round(float(x), 4)
                                                                  for x in v[:4]]}
                         for p, f, v in zip(res.pin_ids, res.found, res.vectors, strict=True)],
            }, indent=2))

    asyncio.run(go())


@cli.command()
@click.argument("pin_id")
@click.option("-k", default=10, show_default=True, help="how many")
@pass_ctx
def similar(ctx: Ctx, pin_id: str, k: int) -> None:
    """Print the pins most similar to PIN_ID in the live version."""
    from store.lifecycle import open_stores

    async def go() -> None:
        async with open_stores(ctx.settings) as stores:
            ver, hits = await stores.reader.similar(pin_id=pin_id, k=k)
            t = Table(title=f"similar to {pin_id} (version {ver})")
            for col in ("score", "pin", "caption"):
                t.add_column(col)
            for h in hits:
                t.add_row(f"{h.score:.3f}", h.pin_id, h.caption)
            console.print(t)

    asyncio.run(go())
