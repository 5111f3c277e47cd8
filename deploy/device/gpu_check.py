"""GPU check: precision, correctness, encoder benchmarks and the whole pipeline, one call.

Runs on a lent GPU machine in one call, under 6 minutes, with the image's own
torch/torchvision and the packages carried in ``.whl/site.tar.xz`` (see
README.md here):

1. makes a corpus of 736x920 JPEGs from scikit-image's sample photos (forked
   workers): ``--images`` for the encoder benchmarks, ``--e2e-images``
   distinct files for the end-to-end run;
2. precision (`encoder.precision`): every shipped model (the domain encoder,
   ViT-B-32, ViT-L-14) in float16 and bfloat16 against float32 on the GPU,
   same pixels; each model's own dtype must reach a minimum cosine of 0.999;
3. correctness: the domain encoder and ViT-B-32 through the GPU path (nvjpeg,
   device resize, the model's own dtype) against the float32 CPU path with
   the same prepare code, cosine per image (gated); against the CPU worker's
   PIL path (reported);
4. ``pytest -m gpu`` (tests/unit/test_gpu.py);
5. `streams.bench.encode.measure_encoder` for ViT-B-32 and ViT-L-14 (random
   weights, 224 px, auto batch): pipeline, bare forward, the decode+resize
   ceiling (the product's own prepare lanes, a stream of batches) and naive
   rates, each the median of 3 runs;
6. end to end (`streams.bench.e2e`) on an embedded stack started here: the
   store write ceiling from as many writers as feeders, then for the domain
   encoder and ViT-B-32 ``pinfresh worker --devices 0 --feeders N`` over a
   backlog of ``--e2e-pins`` JPEG pins: pins/s, GPU utilisation, freshness
   p99 at half that rate.

Writes ``$OUT/gpu_<card>.json`` (copy it to ``bench/results/``) and prints a
table last. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from encoder.config import EncoderSettings  # noqa: E402
from encoder.engine import ImageEncoder  # noqa: E402
from encoder.model import build_image_tower, model_spec, version_id  # noqa: E402
from encoder.precision import COSINE_GATE, measure_agreement  # noqa: E402
from streams.bench.encode import load_jpegs, make_jpeg_corpus, measure_encoder  # noqa: E402
from streams.bench.report import emit, machine  # noqa: E402

COSINE_MIN = 0.999


def log(msg: str) -> None:
    """Timestamped progress line (the device reply keeps the tail of the output)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosines(model: str, images: list[bytes], cpu_prepare: str, device: str) -> list[float]:
    """Per-image cosine between the device path (nvjpeg, the model's dtype) and float32 CPU."""
    cpu = ImageEncoder.load(EncoderSettings(model=model, device="cpu", prepare=cpu_prepare,
                                            batch_size=32, prepare_workers=8))
    gpu = ImageEncoder.load(EncoderSettings(model=model, device=device, prepare="tensor"))
    try:
        a, b = cpu.encode_images(images), gpu.encode_images(images)
    finally:
        cpu.close()
        gpu.close()
    out = []
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
            out.append(float(x @ y))
        elif isinstance(x, np.ndarray) != isinstance(y, np.ndarray):
            out.append(-1.0)  # one path failed an image the other encoded
    return out


#: What the end-to-end part stores into, and why (see `end_to_end`).
MILVUS_ENGINE = ("milvus-lite 3.2.2 (not the default server: its wheel does not fit the "
                 "64 MiB carry beside the rest)")


def end_to_end(args: argparse.Namespace, corpus: Path, models: list[str], cores: int,
               log: Any) -> dict[str, object]:
    """Store write ceiling, then one feeders + encoder process run per model (`bench_e2e`)."""
    import tempfile

    from streams.bench.e2e import run_e2e, store_write_ceiling
    from streams.runtime.pool import auto_feeders
    from streams.runtime.stack import EmbeddedStack, StackSettings
    from streams.settings import Settings

    feeders = args.feeders or auto_feeders(1, cores)
    files = sorted(corpus.glob("img-*.jpg"))[: args.e2e_images]
    # The embedded stack's default Milvus is the `milvus` 2.3.5 server, whose wheel
    # (57.7 MB of LZMA-packed binaries, which xz cannot shrink) does not fit the device
    # tool's 64 MiB carry beside the rest (about 47 MiB): this check keeps Milvus Lite.
    out: dict[str, object] = {"feeders": feeders, "files": len(files),
                              "milvus_engine": MILVUS_ENGINE}
    log(f"store: {MILVUS_ENGINE}")
    with tempfile.TemporaryDirectory(prefix="pinfresh-e2e-") as tmp:
        stack = EmbeddedStack(StackSettings(data_dir=Path(tmp), kafka_port=0, redis_port=0,
                                            milvus_port=0, milvus="lite"))
        info = stack.start()
        try:
            base = Settings().with_stack(info)
            s = base.model_copy(update={
                "fetch": base.fetch.model_copy(update={"catalog_root": corpus}),
                "stack": base.stack.model_copy(update={"data_dir": Path(tmp)}),
                "worker": base.worker.model_copy(update={"batch_size": 128}),
                "log_level": "WARNING"})
            out["ceiling"] = store_write_ceiling(s, feeders, seconds=args.ceiling_seconds)
            log(f"store write ceiling with {feeders} writers: {out['ceiling']}")
            for model in models:
                spec = model_spec(model)
                version = version_id(spec, build_image_tower(spec))
                sm = s.model_copy(update={"encoder": s.encoder.model_copy(
                    update={"model": model, "device": args.device})})
                res = run_e2e(sm, files, device=args.device, feeders=feeders,
                              pins=args.e2e_pins, fresh_seconds=args.fresh_seconds,
                              log=Path(tmp) / f"pool-{spec.name}.log", version=version)
                ceiling = float(out["ceiling"]["store_write_ceiling_per_s"])  # type: ignore[index]
                res["e2e_wall"] = ("store writes" if res["e2e_pins_per_s"] >= 0.8 * ceiling
                                   else "encoder or feeders")
                out[model] = res
                log(f"e2e {model}: {res}")
        finally:
            stack.stop()
    return out


def main() -> int:
    """Run the checks and benchmarks; 0 when every check passed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--check-images", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--device", default="cuda",
                    help="cpu only for a dry run of this script's plumbing")
    ap.add_argument("--check-models", default="pinfresh-effl0-minilm,ViT-B-32")
    ap.add_argument("--precision-models", default="pinfresh-effl0-minilm,ViT-B-32,ViT-L-14")
    ap.add_argument("--precision-images", type=int, default=64)
    ap.add_argument("--bench-models", default="ViT-B-32,ViT-L-14")
    ap.add_argument("--e2e-models", default="pinfresh-effl0-minilm,ViT-B-32",
                    help="end-to-end runs ('' skips the end-to-end part)")
    ap.add_argument("--e2e-images", type=int, default=20480, help="distinct JPEG files")
    ap.add_argument("--e2e-pins", type=int, default=20480)
    ap.add_argument("--feeders", type=int, default=0, help="0 = auto from the cores")
    ap.add_argument("--fresh-seconds", type=float, default=8.0)
    ap.add_argument("--ceiling-seconds", type=float, default=6.0)
    args = ap.parse_args()
    t_start = time.monotonic()
    console = Console(width=110)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu dry run"
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    log(f"{card}, torch {torch.__version__}, cuda {torch.version.cuda}")
    report: dict[str, object] = {"card": card, "machine": machine(), "errors": []}
    errors: list[str] = report["errors"]  # type: ignore[assignment]

    corpus = Path("/tmp/pinfresh-jpegs")
    catalog = ROOT / "data" / "catalog" / "tuxpaint.jsonl"  # when scikit-image is absent
    cores = os.cpu_count() or 1
    e2e_models = [m for m in args.e2e_models.split(",") if m]
    n_files = max(args.images, args.e2e_images if e2e_models else 0)
    source = make_jpeg_corpus(corpus, n_files, width=736, height=920,
                              catalog=catalog if catalog.exists() else None, workers=cores)
    images = load_jpegs(corpus, args.images)
    report["images"] = f"{len(images)} x 736x920 JPEG q90 from {source}"
    log(report["images"])  # type: ignore[arg-type]

    # 2. precision ------------------------------------------------------------
    precision: dict[str, dict[str, object]] = {}
    for model in [m for m in args.precision_models.split(",") if m]:
        try:
            own = model_spec(model).cuda_dtype
            rows_p = measure_agreement(EncoderSettings(model=model, device=args.device),
                                       images[: args.precision_images])
            precision[model] = {"own_dtype": own, **{
                r.dtype: {"min_cosine": r.min_cosine, "mean_cosine": r.mean_cosine,
                          "forward_img_per_s": r.forward_img_per_s} for r in rows_p}}
            got = next(r for r in rows_p if r.dtype == own)
            log(f"precision {model}: {precision[model]}")
            if got.min_cosine < COSINE_GATE:
                errors.append(f"precision {model}: {own} min cosine {got.min_cosine} < "
                              f"{COSINE_GATE}")
        except Exception:  # noqa: BLE001 - report and go on
            errors.append(f"precision {model}: {traceback.format_exc(limit=3)}")
            log(errors[-1])
    report["precision"] = precision
    own_mins = [float(v[str(v["own_dtype"])]["min_cosine"])  # type: ignore[index]
                for v in precision.values()]
    report["min_cosine_own_dtype_vs_fp32"] = min(own_mins) if own_mins else None

    # 3. correctness ----------------------------------------------------------
    check = images[: args.check_images]
    checks: dict[str, dict[str, float]] = {}
    for model in args.check_models.split(","):
        for cpu_prepare in ("tensor", "pil"):
            key = f"{model} vs cpu/{cpu_prepare}"
            try:
                cs = cosines(model, check, cpu_prepare, args.device)
                checks[key] = {"min": round(min(cs), 5), "median": round(float(np.median(cs)), 5),
                               "n": len(cs)}
                log(f"cosine {key}: {checks[key]}")
            except Exception:  # noqa: BLE001 - report and go on to the benchmarks
                errors.append(f"{key}: {traceback.format_exc(limit=3)}")
                log(errors[-1])
    report["cosine"] = checks
    tensor_mins = [v["min"] for k, v in checks.items() if k.endswith("cpu/tensor")]
    report["min_cosine_vs_cpu"] = min(tensor_mins) if tensor_mins else None
    pil_mins = [v["min"] for k, v in checks.items() if k.endswith("cpu/pil")]
    report["min_cosine_vs_cpu_pil_path"] = min(pil_mins) if pil_mins else None

    # 4. gpu tests --------------------------------------------------------------
    if not args.skip_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                            "no:cacheprovider", "tests/unit/test_gpu.py"], cwd=ROOT,
                           capture_output=True, text=True, timeout=240)
        report["gpu_tests"] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr
        log(f"pytest -m gpu: {report['gpu_tests']}")
        if r.returncode != 0:
            errors.append("gpu tests failed:\n" + r.stdout[-3000:] + r.stderr[-2000:])

    # 5. benchmarks ---------------------------------------------------------------
    bench: dict[str, dict[str, object]] = {}
    for model in args.bench_models.split(","):
        try:
            enc = ImageEncoder.load(EncoderSettings(model=model, device=args.device,
                                                    prepare="tensor", prepare_workers=8))
            try:
                bench[model] = measure_encoder(enc, images, args.seconds)
            finally:
                enc.close()
            log(f"{model}: {bench[model]}")
        except Exception:  # noqa: BLE001
            errors.append(f"bench {model}: {traceback.format_exc(limit=3)}")
            log(errors[-1])
    report["bench"] = bench

    # 6. end to end ---------------------------------------------------------------
    if e2e_models:
        try:
            report["e2e"] = end_to_end(args, corpus, e2e_models, cores, log)
        except Exception:  # noqa: BLE001
            errors.append(f"e2e: {traceback.format_exc(limit=5)}")
            log(errors[-1])
    e2e: dict[str, dict[str, object]] = report.get("e2e", {})  # type: ignore[assignment]
    dom, vit = e2e.get("pinfresh-effl0-minilm", {}), e2e.get("ViT-B-32", {})
    b32, l14 = bench.get("ViT-B-32", {}), bench.get("ViT-L-14", {})
    report.update({
        "vitb32_img_per_s": b32.get("pipeline_img_per_s"),
        "vitb32_forward_img_per_s": b32.get("forward_only_img_per_s"),
        "vitb32_naive_img_per_s": b32.get("naive_sequential_img_per_s"),
        "decode_resize_ceiling_img_per_s": b32.get("decode_resize_only_img_per_s"),
        "vitb32_vs_decode_ceiling": b32.get("pipeline_vs_decode_ceiling"),
        "vitl14_img_per_s": l14.get("pipeline_img_per_s"),
        "vitl14_forward_img_per_s": l14.get("forward_only_img_per_s"),
        "vitl14_vs_forward_ceiling": l14.get("pipeline_vs_forward_ceiling"),
        "vitb32_vs_naive": b32.get("pipeline_vs_naive"),
        "e2e_pins_per_s": vit.get("e2e_pins_per_s"),
        "e2e_freshness_p99_s": vit.get("e2e_freshness_p99_s"),
        "e2e_domain_pins_per_s": dom.get("e2e_pins_per_s"),
        "e2e_domain_freshness_p99_s": dom.get("e2e_freshness_p99_s"),
        "store_write_ceiling_per_s": e2e.get("ceiling", {}).get("store_write_ceiling_per_s"),
        "milvus_engine": e2e.get("milvus_engine"),
        "e2e_vs_lower_ceiling": (
            round(float(vit["e2e_pins_per_s"]) / min(  # type: ignore[arg-type]
                float(b32["pipeline_img_per_s"]),  # type: ignore[arg-type]
                float(e2e["ceiling"]["store_write_ceiling_per_s"])), 3)  # type: ignore[index]
            if vit.get("e2e_pins_per_s") and b32.get("pipeline_img_per_s")
            and e2e.get("ceiling") else None),
        "check_seconds": round(time.monotonic() - t_start, 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    rows: list[tuple[str, object]] = [
        ("card", card),
        ("min cosine, each model's own dtype vs fp32 (GPU)",
         report["min_cosine_own_dtype_vs_fp32"]),
        ("min cosine GPU vs CPU fp32 (same prepare code)", report["min_cosine_vs_cpu"]),
        ("min cosine GPU vs CPU PIL worker path", report["min_cosine_vs_cpu_pil_path"]),
        ("ViT-B-32 pipeline, JPEG -> vectors, img/s", report["vitb32_img_per_s"]),
        ("  decode + resize ceiling, img/s", report["decode_resize_ceiling_img_per_s"]),
        ("  pipeline / decode ceiling", report["vitb32_vs_decode_ceiling"]),
        ("  bare forward, img/s", report["vitb32_forward_img_per_s"]),
        ("  naive decode-then-forward, img/s", report["vitb32_naive_img_per_s"]),
        ("ViT-L-14 pipeline, img/s", report["vitl14_img_per_s"]),
        ("  bare forward, img/s", report["vitl14_forward_img_per_s"]),
        ("  pipeline / forward ceiling", report["vitl14_vs_forward_ceiling"]),
        ("GPU util (B-32 / L-14), %", f"{b32.get('gpu_util_mean_pct')} / "
                                       f"{l14.get('gpu_util_mean_pct')}"),
        ("store write ceiling (min of Milvus, Redis), rows/s",
         report["store_write_ceiling_per_s"]),
        ("e2e ViT-B-32 / domain, pins/s", f"{report['e2e_pins_per_s']} / "
                                          f"{report['e2e_domain_pins_per_s']}"),
        ("e2e freshness p99 at half rate (B-32 / domain), s",
         f"{report['e2e_freshness_p99_s']} / {report['e2e_domain_freshness_p99_s']}"),
        ("e2e GPU util (B-32 / domain), %", f"{vit.get('e2e_gpu_util_mean_pct')} / "
                                             f"{dom.get('e2e_gpu_util_mean_pct')}"),
        ("e2e ViT-B-32 / min(encoder pipeline, store ceiling)", report["e2e_vs_lower_ceiling"]),
        ("check wall time, s", report["check_seconds"]),
        ("errors", len(errors)),
    ]
    out = args.out / f"gpu_{slug}.json"
    emit(f"pinfresh GPU check on {card}", rows, report, out, console)
    ok = (report["min_cosine_vs_cpu"] is not None
          and float(report["min_cosine_vs_cpu"]) >= COSINE_MIN  # type: ignore[arg-type]
          and (report["min_cosine_own_dtype_vs_fp32"] or 0) >= COSINE_MIN  # type: ignore[operator]
          and not errors)
    print(json.dumps({"ok": ok, "errors": len(errors)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
