"""Model commands: ``encoder`` (serve, precision, train, eval, compare) and ``graft``."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from streams.cli.base import Ctx, cli, console, err_console, pass_ctx

if TYPE_CHECKING:
    from encoder.server import EncoderServer


@cli.group()
def encoder() -> None:
    """Serve, train, evaluate and compare encoders."""


@encoder.command("serve")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), required=True,
              help="Unix socket the feeders connect to")
@pass_ctx
def encoder_serve(ctx: Ctx, socket_path: Path) -> None:
    """Run the encoder process that feeder workers share (one per GPU).

    Model and device: PINFRESH_ENCODER__MODEL, __CHECKPOINT, __DEVICE, __DTYPE;
    `pinfresh worker --devices 0 --feeders N` starts it with its feeders.
    It also serves any registered version a feeder selects (a refresh's
    versions), loaded once on this device and unloaded when no feeder writes
    it any more. Metrics (pinfresh_encoder_*) and /healthz on PINFRESH_WORKER__METRICS_PORT
    (the pool gives it the port after its stream processes'); it reports to
    Redis every PINFRESH_WORKER__PROGRESS_INTERVAL_S for `pinfresh status`.
    """
    import os
    import signal as _signal
    import socket as _socket

    from encoder.loading import load_encoder
    from encoder.server import EncoderServer
    from streams.metrics import serve_metrics

    enc = load_encoder(ctx.settings.encoder)
    device = str(getattr(enc, "device", "cpu"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if device.startswith("cuda") and visible:
        device = f"cuda (GPU {visible})"  # the host's index, not the process's cuda:0
    ws = ctx.settings.worker
    def load_version(request: dict[str, object]) -> object:
        # a version a feeder selected: rebuilt from its registry entry on this device
        from store.registry import VersionInfo
        from streams.refresh import load_version_encoder

        return load_version_encoder(VersionInfo(**request), ctx.settings.encoder)  # type: ignore[arg-type]

    server = EncoderServer(enc, socket_path,
                           max_failed_batches=ctx.settings.encoder.max_failed_batches,
                           device=device, stall_s=ws.liveness_stall_s,
                           loader=load_version)  # type: ignore[arg-type]
    serve_metrics(ws.metrics_host, ws.metrics_port, server)
    name = f"{_socket.gethostname()}:{socket_path.name.removesuffix('.sock')}"
    done = threading.Event()
    reporter = threading.Thread(target=_report_encoder, daemon=True, name="report",
                                args=(ctx, server, name, done))
    reporter.start()
    _signal.signal(_signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve_forever()
    finally:
        done.set()
        reporter.join(timeout=10)
        enc.close()
    if server.unhealthy:  # the pool restarts an encoder process that exits
        err_console.print(f"[red]error:[/] encoder stopped: {server.unhealthy}",
                          highlight=False)
        raise SystemExit(3)


def _report_encoder(ctx: Ctx, server: EncoderServer, name: str,
                    done: threading.Event) -> None:
    """Report `EncoderServer.snapshot` to Redis until ``done``; forget it on a clean stop.

    Redis being down is logged and retried at the next interval: the encoder
    keeps serving its feeders either way.
    """
    import asyncio
    import contextlib
    import logging
    import time

    from store.redis import RedisCache

    log = logging.getLogger("encoder.server")
    interval = ctx.settings.worker.progress_interval_s

    async def run() -> None:
        cache = RedisCache(ctx.settings.redis)
        prev: tuple[float, int] | None = None  # (time, images) of the last report
        try:
            while True:
                snap = server.snapshot()
                now = time.monotonic()
                if prev is not None and now > prev[0]:
                    snap["images_per_s"] = round((snap["images_total"] - prev[1])
                                                 / (now - prev[0]), 1)
                prev = (now, snap["images_total"])
                try:
                    await asyncio.wait_for(cache.report_encoder(name, snap), timeout=interval)
                except Exception as exc:  # noqa: BLE001 - a view; serving goes on
                    log.warning("encoder report to Redis failed (retried in %.0f s): %s",
                                interval, exc)
                if await asyncio.to_thread(done.wait, interval):
                    break
            with contextlib.suppress(Exception):
                if server.unhealthy is None:  # stopped on purpose: no row left to read "down"
                    await asyncio.wait_for(cache.forget_encoder(name), timeout=5)
                else:  # say why it stopped; the pool's next process reports over it
                    await asyncio.wait_for(cache.report_encoder(name, server.snapshot()),
                                           timeout=5)
        finally:
            await cache.close()

    asyncio.run(run())


@encoder.command("precision")
@click.option("--model", help="open_clip model name [PINFRESH_ENCODER__MODEL]")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True),
              help="[PINFRESH_ENCODER__CHECKPOINT]")
@click.option("--device", help="cpu, cuda, cuda:N [PINFRESH_ENCODER__DEVICE]")
@click.option("--images", "images_dir", type=click.Path(path_type=Path, file_okay=False),
              help="directory of JPEGs (default: the sample catalog's images)")
@click.option("--limit", default=64, show_default=True, help="images to compare")
@pass_ctx
def encoder_precision(ctx: Ctx, model: str | None, checkpoint: Path | None,
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
        from streams.runtime.catalog import load_catalog

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
def encoder_train(ctx: Ctx, catalogs: tuple[Path, ...], out: Path, hold_out: bool,
                  epochs: int, unfreeze_last: int, seed: int) -> None:
    """Train the domain encoder (LiT: frozen towers, trained projections) on catalogs.

    Default catalogs: the sample Tux Paint catalog plus the emoji corpus.
    """
    from streams.runtime.models import train_domain_encoder

    r = train_domain_encoder(ctx.settings, list(catalogs), out, hold_out, epochs,
                             unfreeze_last, seed)
    console.print(f"version {r['version']} -> {out} (loss {r['first_loss']:.3f} -> "
                  f"{r['last_loss']:.3f})")
    if r["metrics"]:
        console.print(json.dumps(r["metrics"]))


@encoder.command("eval")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True),
              help="pinfresh checkpoint dir (default: the untrained default model)")
@_catalog_opt
@pass_ctx
def encoder_eval(ctx: Ctx, checkpoint: Path | None, catalogs: tuple[Path, ...]) -> None:
    """Recall@1/5/10 (text->image, image->text) on the held-out split of catalogs."""
    from streams.runtime.models import eval_encoder

    click.echo(json.dumps(eval_encoder(ctx.settings, checkpoint, list(catalogs)), indent=2))


@encoder.command("compare")
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/encoder_recall.json"), show_default=True)
@_epochs_opt
@_unfreeze_opt
@_seed_opt
@pass_ctx
def encoder_compare(ctx: Ctx, out: Path, epochs: int, unfreeze_last: int, seed: int) -> None:
    """Untrained vs generic (emoji) vs domain (emoji + Tux Paint train) on held-out Tux Paint."""
    from streams.runtime.models import compare_encoders

    res = compare_encoders(ctx.settings, epochs, unfreeze_last, seed)
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


@cli.group()
def graft() -> None:
    """The grafted LM: SmolLM2 reading precomputed pin embeddings through a projector."""


@graft.command("train")
@click.option("--epochs", default=4, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="default: data/models/graft-<version>")
@pass_ctx
def graft_train(ctx: Ctx, epochs: int, out: Path | None) -> None:
    """Train a projector on (pin embedding, caption) pairs of the live version, LM frozen.

    Pins whose caption is in the held-out split are left out (they are the eval set).
    """
    from streams.runtime.models import train_graft

    r = train_graft(ctx.settings, epochs, out)
    console.print(f"projector for {r['version']} ({r['pairs']} pins, loss "
                  f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}) -> {r['out']}")


@graft.command("ask")
@click.argument("pin_id")
@click.argument("question")
@click.option("--projector", type=click.Path(path_type=Path),
              help="default: data/models/graft-<live version>")
@pass_ctx
def graft_ask(ctx: Ctx, pin_id: str, question: str, projector: Path | None) -> None:
    """Answer QUESTION about PIN_ID from its precomputed embedding (never encodes the image)."""
    from streams.runtime.models import ask_graft

    click.echo(ask_graft(ctx.settings, pin_id, question, projector))


@graft.command("eval")
@click.option("--epochs", default=4, show_default=True)
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/graft_eval.json"), show_default=True)
@pass_ctx
def graft_eval(ctx: Ctx, epochs: int, out: Path) -> None:
    """Multiple-choice caption accuracy on held-out pins: shuffled vs generic vs domain.

    Needs the generic and domain checkpoints of `pinfresh encoder compare`.
    """
    from streams.runtime.models import eval_graft

    res = eval_graft(ctx.settings, epochs)
    t = Table(title=f"graft eval: {res['held_out_pins']} held-out pins, true caption among 5")
    t.add_column("embeddings")
    t.add_column("accuracy", justify="right")
    for k in ("shuffled", "generic", "domain"):
        t.add_row(k, f"{res[k + '_acc']:.3f}")
    console.print(t)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    console.print(f"wrote {out} ({res['wall_time_s']} s)")
