"""``demo`` and the benchmarks (``bench``)."""

from __future__ import annotations

from pathlib import Path

import click

from streams.cli.base import Ctx, cli, console, pass_ctx


@cli.command()
@click.option("--catalog", "catalog_path", type=click.Path(path_type=Path, exists=True),
              help="catalog to publish (default: the Tux Paint sample)")
@click.option("--limit", type=int, help="publish at most N pins")
@pass_ctx
def demo(ctx: Ctx, catalog_path: Path | None, limit: int | None) -> None:
    """Stack up, sample catalog published and encoded, summary printed."""
    from streams.bench.demo import run_demo

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
@click.option("--baseline", default=None, metavar="GIT_REF",
              help="with --encoder null: also run one feeder from this commit's code, "
              "interleaved (before and after in one run)")
@click.option("--profile/--no-profile", default=True, show_default=True,
              help="with --encoder null: one more feeder run per source under py-spy, for "
              "the CPU per pin by stage")
@click.option("--cpu-batch-sizes", default="256", show_default=True,
              help="with --encoder null: also measure one feeder's CPU per pin with "
              "micro-batches of these sizes (256: the GPU pods' setting, deploy/k8s); "
              "empty for none")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="[default: bench/results/pipeline.json, or pipeline_null.json]")
@pass_ctx
def bench_pipeline(ctx: Ctx, encoder_kind: str, pins: int | None, fresh_pins: int,
                   feeders: str, sources: str, repeat: int, baseline: str | None,
                   profile: bool, cpu_batch_sizes: str, out: Path | None) -> None:
    """Bare encoder vs whole pipeline on this machine, and freshness at half capacity.

    With --encoder null: the stream machinery alone (feeders with a stub
    encoder) against a bare Faust consumer measured in the same run.
    """
    if encoder_kind == "null":
        from streams.bench.null import run_null_bench

        run_null_bench(ctx.settings, pins or 6000, [int(x) for x in feeders.split(",")],
                       [x.strip() for x in sources.split(",")],
                       out or Path("bench/results/pipeline_null.json"), console, repeat=repeat,
                       baseline=baseline, profile=profile,
                       cpu_batches=[int(x) for x in cpu_batch_sizes.split(",") if x.strip()])
        return
    from streams.bench.runs import run_pipeline_bench

    run_pipeline_bench(ctx.settings, pins or 400, fresh_pins,
                       out or Path("bench/results/pipeline.json"), console)


@bench.command("refresh")
@click.option("--pins", type=int, default=600, show_default=True, help="catalog to backfill")
@click.option("--rate", type=float, default=5.0, show_default=True, help="live pins/s")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/refresh.json"),
              show_default=True)
@pass_ctx
def bench_refresh(ctx: Ctx, pins: int, rate: float, out: Path) -> None:
    """Backfill throughput and live freshness with/without a backfill running."""
    from streams.bench.runs import run_refresh_bench

    run_refresh_bench(ctx.settings, pins, rate, out, console)


@bench.command("read")
@click.option("--pins", type=int, default=300, show_default=True)
@click.option("--requests", type=int, default=500, show_default=True)
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/read_vs_encode.json"), show_default=True)
@pass_ctx
def bench_read(ctx: Ctx, pins: int, requests: int, out: Path) -> None:
    """Why precompute: read 25 embeddings via the API vs encode 25 images per request."""
    from streams.bench.runs import run_read_bench

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
def bench_encode(ctx: Ctx, images_dir: Path | None, make_n: int, size: str,
                 limit: int | None, model: str | None, checkpoint: Path | None,
                 device: str | None, batch_size: int | None, prepare: str | None,
                 prepare_pool: str | None, seconds: float, out: Path) -> None:
    """JPEG bytes -> vectors: pipeline vs bare-forward and decode-only ceilings."""
    from streams.bench.encode import make_jpeg_corpus, run_encode_bench
    from streams.runtime.catalog import prepare_sample_catalog

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


@bench.command("similar")
@click.option("--rows", type=int, default=200_000, show_default=True,
              help="rows in the collection under test")
@click.option("--stream-rows", type=int, default=20_000, show_default=True,
              help="rows written per policy while searching")
@click.option("--cost-rows", type=int, default=20_000, show_default=True,
              help="rows written per policy for the write cost")
@click.option("--rate", type=float, default=1000.0, show_default=True,
              help="rows/s the stream writes while searching")
@click.option("--queries", type=int, default=1000, show_default=True,
              help="searches at rest (latency and recall@10)")
@click.option("--writers", type=int, default=2, show_default=True)
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--clusters", type=int, default=2000, show_default=True)
@click.option("--seal-rows", type=int, default=256, show_default=True,
              help="the sealing policy measured against none")
@click.option("--engines", default="server,lite", show_default=True,
              help="Milvus engines to measure one after the other: server, lite")
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/similar.json"), show_default=True)
@pass_ctx
def bench_similar(ctx: Ctx, rows: int, stream_rows: int, cost_rows: int, rate: float,
                  queries: int, writers: int, batch: int, clusters: int, seal_rows: int,
                  engines: str, out: Path) -> None:
    """`similar` on each embedded Milvus engine while the stream writes, and at rest."""
    from streams.bench.similar import run_similar_bench

    names = tuple(e.strip() for e in engines.split(",") if e.strip())
    if not names or set(names) - {"server", "lite"}:
        raise click.BadParameter("a comma-separated list of server, lite",
                                 param_hint="--engines")
    run_similar_bench(ctx.settings, rows, stream_rows, cost_rows, rate, queries, writers,
                      batch, clusters, seal_rows, out, console, engines=names)


@bench.command("volume")
@click.option("--pins", type=int, default=200_000, show_default=True,
              help="distinct pins through the pipeline")
@click.option("--feeders", type=int, default=2, show_default=True)
@click.option("--queries", type=int, default=1000, show_default=True,
              help="similar queries (latency and recall@10 against exact)")
@click.option("--live-rate", type=float, default=20.0, show_default=True,
              help="live pins/s published during the backfill")
@click.option("--stream-rate", type=click.FloatRange(min=0, min_open=True), default=200.0,
              show_default=True,
              help="updates/s streamed into the searched version during the second round "
              "of similar queries")
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/volume.json"), show_default=True)
@pass_ctx
def bench_volume(ctx: Ctx, pins: int, feeders: int, queries: int, live_rate: float,
                 stream_rate: float, out: Path) -> None:
    """Many distinct pins through the real pipeline (null encoder).

    Rate, sizes, similar at rest and while streaming, verify, backfill.
    """
    from streams.bench.volume import run_volume_bench

    run_volume_bench(ctx.settings, pins, feeders, queries, live_rate, out, console,
                     stream_rate=stream_rate)


@bench.command("partitions")
@click.option("--counts", default="8,32,64,128", show_default=True,
              help="partition counts to measure, comma-separated")
@click.option("--pins", type=int, default=20_000, show_default=True)
@click.option("--feeders", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/partitions.json"), show_default=True)
@pass_ctx
def bench_partitions(ctx: Ctx, counts: str, pins: int, feeders: int, out: Path) -> None:
    """What a topic's partition count costs on the embedded broker (publish, lag, drain)."""
    from streams.bench.partitions import run_partitions_bench

    run_partitions_bench(ctx.settings, [int(x) for x in counts.split(",")], pins, feeders,
                         out, console)


@bench.command("soak")
@click.option("--events", type=int, default=1_000_000, show_default=True)
@click.option("--retention-s", type=float, default=60.0, show_default=True,
              help="the disk log's retention by age for this run (its own stack)")
@click.option("--fsync/--no-fsync", default=True, show_default=True)
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/soak.json"), show_default=True)
@pass_ctx
def bench_soak(ctx: Ctx, events: int, retention_s: float, fsync: bool, out: Path) -> None:
    """The broker's disk log under a long stream: rates, memory and disk, slice by slice."""
    from streams.bench.soak import run_soak

    run_soak(ctx.settings, events, retention_s, fsync, out, console)


@bench.command("broker")
@click.option("--pins", type=int, default=10_000, show_default=True)
@click.option("--feeders", type=int, default=2, show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("bench/results/broker.json"), show_default=True)
@pass_ctx
def bench_broker(ctx: Ctx, pins: int, feeders: int, rounds: int, out: Path) -> None:
    """The embedded broker's log in memory vs on disk: publish, consume, worker drain."""
    from streams.bench.broker import run_broker_bench

    run_broker_bench(ctx.settings, pins, feeders, rounds, out, console)
