"""GPU check: correctness of the GPU encode path, then ViT-B-32 and ViT-L-14 benchmarks.

Runs on a lent GPU machine in one call, under 5 minutes, with the image's own
torch/torchvision and the wheels carried in ``.whl`` (see README.md here):

1. makes a corpus of 736x920 JPEGs from scikit-image's sample photos;
2. correctness: for the domain encoder (packaged EfficientNet-Lite0, real
   ImageNet weights) and ViT-B-32 (seeded random weights), the GPU path
   (nvjpeg + device resize + bf16) against the float32 CPU path on the same
   images -- the tensor prepare path run on the CPU (libjpeg-turbo, same
   resize code), cosine per image, minimum reported; also against the CPU
   worker's default PIL path, reported separately;
3. ``pytest -m gpu`` (tests/unit/test_gpu.py);
4. `streams.bench_encode.measure_encoder` for ViT-B-32 and ViT-L-14 (random
   weights, 224 px, auto batch): pipeline, bare forward, decode+resize and
   naive rates, each the median of 3 runs.

Writes ``$OUT/gpu_<card>.json`` (copy it to ``bench/results/``) and prints a
table last. Exit status 1 when a correctness check fails.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from encoder.config import EncoderSettings  # noqa: E402
from encoder.engine import ImageEncoder  # noqa: E402
from streams.bench_encode import load_jpegs, make_jpeg_corpus, measure_encoder  # noqa: E402
from streams.report import emit, machine  # noqa: E402

COSINE_MIN = 0.999


def log(msg: str) -> None:
    """Timestamped progress line (the device reply keeps the tail of the output)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosines(model: str, images: list[bytes], cpu_prepare: str, device: str) -> list[float]:
    """Per-image cosine between the device (CUDA: bf16, nvjpeg) path and a float32 CPU path."""
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
    ap.add_argument("--bench-models", default="ViT-B-32,ViT-L-14")
    args = ap.parse_args()
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
    source = make_jpeg_corpus(corpus, args.images, width=736, height=920,
                              catalog=catalog if catalog.exists() else None)
    images = load_jpegs(corpus)
    report["images"] = f"{len(images)} x 736x920 JPEG q90 from {source}"
    log(report["images"])  # type: ignore[arg-type]

    # 2. correctness ----------------------------------------------------------
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

    # 3. gpu tests --------------------------------------------------------------
    if not args.skip_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                            "no:cacheprovider", "tests/unit/test_gpu.py"], cwd=ROOT,
                           capture_output=True, text=True, timeout=240)
        report["gpu_tests"] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr
        log(f"pytest -m gpu: {report['gpu_tests']}")
        if r.returncode != 0:
            errors.append("gpu tests failed:\n" + r.stdout[-3000:] + r.stderr[-2000:])

    # 4. benchmarks ---------------------------------------------------------------
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
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    rows: list[tuple[str, object]] = [
        ("card", card),
        ("min cosine GPU bf16 vs CPU fp32 (same prepare code)", report["min_cosine_vs_cpu"]),
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
        ("errors", len(errors)),
    ]
    out = args.out / f"gpu_{slug}.json"
    emit(f"pinfresh GPU check on {card}", rows, report, out, console)
    ok = (report["min_cosine_vs_cpu"] is not None
          and float(report["min_cosine_vs_cpu"]) >= COSINE_MIN  # type: ignore[arg-type]
          and not errors)
    print(json.dumps({"ok": ok, "errors": len(errors)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
