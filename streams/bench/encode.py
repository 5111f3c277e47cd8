"""``pinfresh bench encode``: JPEG bytes to normalised vectors, against its own ceilings.

One process, one model, one device, measured in this order:

1. warm-up (model load, cuDNN/cuBLAS autotuning, nvjpeg handle);
2. **bare forward** (ceiling): random uint8 batches already on the device
   through normalise + tower + L2 norm, synchronised;
3. **decode only** (ceiling): the product's own prepare stage alone, run the
   way the pipeline runs it (`ImageEncoder.decode_only`: the same batcher,
   decode lanes and queues, a stream of at least 16 batches), so the ratio
   against it compares like with like (nvjpeg + resize on CUDA, PIL on CPU);
4. **naive**: prepare then forward, one batch at a time, nothing overlapped
   (the baseline the overlapped pipeline must beat);
5. **pipeline**: `ImageEncoder.encode_images` over the corpus repeated to at
   least 16 batches per call (a busy worker's steady stream), stages
   overlapped; GPU utilisation sampled meanwhile through NVML when present.

Each rate is the median of three timed runs, each at least ``min_seconds``
long. JPEGs are read from a directory into memory first; `make_jpeg_corpus`
writes such a directory from photos (scikit-image's sample photos when
installed, else the sample catalog's stamps) at a given size.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from tqdm import tqdm

from encoder.config import EncoderSettings
from encoder.engine import ImageEncoder
from streams.bench.report import emit, machine

#: scikit-image sample photos used for the corpus when scikit-image is installed.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left",
                   "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def _photo_sources(catalog: Path | None) -> tuple[list[Image.Image], str]:
    try:
        from skimage import data as skdata  # type: ignore[import-not-found,import-untyped]
    except ImportError:
        skdata = None
    if skdata is not None:
        found = []
        for name in _SKIMAGE_PHOTOS:
            try:
                arr = getattr(skdata, name)()
            except Exception:  # noqa: BLE001 - some need a download; skip those
                continue
            if isinstance(arr, tuple):
                arr = arr[0]
            if arr.ndim == 3 and arr.shape[2] >= 3:
                found.append(Image.fromarray(np.asarray(arr)[..., :3].astype(np.uint8)))
        if found:
            return found, f"scikit-image sample photos ({len(found)})"
    if catalog is None or not catalog.exists():
        raise FileNotFoundError(
            "no source photos: install scikit-image or run `pinfresh catalog prepare`")
    from streams.runtime.catalog import load_catalog

    imgs = []
    for it in load_catalog(catalog, 200):
        im = Image.open(it.image).convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        canvas.alpha_composite(im)
        imgs.append(canvas.convert("RGB"))
    return imgs, f"sample catalog stamps ({len(imgs)}), flattened on white"


_SOURCES: list[Image.Image] = []


def _make_one(args: tuple[int, Path, int, int, int, int]) -> None:
    i, out_dir, width, height, quality, seed = args
    rng = np.random.default_rng([seed, i])  # per image: the same files whatever the workers
    src = _SOURCES[i % len(_SOURCES)]
    aspect = width / height
    w, h = src.size
    ch = int(min(h, w / aspect) * rng.uniform(0.5, 1.0))
    cw = int(ch * aspect)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((width, height), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(im, dtype=np.float32) * rng.uniform(0.85, 1.15, 3)
    im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    (out_dir / f"img-{i:05d}.jpg").write_bytes(buf.getvalue())


def make_jpeg_corpus(out_dir: Path, n: int, *, width: int = 736, height: int = 920,
                     quality: int = 90, catalog: Path | None = None,
                     seed: int = 0, workers: int = 1) -> str:
    """Write ``n`` distinct ``width x height`` JPEGs to ``out_dir``; returns the source.

    Each image is a random crop (50-100 % of the short side), maybe mirrored,
    of a source photo, resized to the target size with a small colour jitter,
    so no two files share a bitstream. Files already there are kept.
    ``workers`` > 1 forks that many processes (call it before CUDA is touched).
    """
    global _SOURCES
    sources, what = _photo_sources(catalog)
    _SOURCES = sources
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(i, out_dir, width, height, quality, seed) for i in range(n)
            if not (out_dir / f"img-{i:05d}.jpg").exists()]
    if workers > 1 and len(todo) > 64:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(_make_one, todo, chunksize=32), total=len(todo),
                          desc="jpeg corpus", unit="img"):
                pass
    else:
        for args in tqdm(todo, desc="jpeg corpus", unit="img"):
            _make_one(args)
    return what


def load_jpegs(directory: Path, limit: int | None = None) -> list[bytes]:
    """Read ``*.jpg``/``*.jpeg`` files of a directory into memory (sorted by name)."""
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not paths:
        raise FileNotFoundError(f"no .jpg files in {directory}")
    return [p.read_bytes() for p in paths[:limit]]


class _GpuSampler:
    """Mean GPU utilisation (%) from NVML, sampled every 50 ms while running."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._handle: Any = None
        if device.type != "cuda":
            return
        try:
            import pynvml  # type: ignore[import-not-found,import-untyped]

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # noqa: BLE001 - no NVML: no utilisation column
            self._handle = None

    def __enter__(self) -> _GpuSampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def _median_rate(fn: Callable[[], int], min_seconds: float, sync: Callable[[], None],
                 runs: int = 3) -> float:
    """Median over ``runs`` of items/s, each run repeating ``fn`` for >= min_seconds."""
    rates = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        n = 0
        while True:
            n += fn()
            sync()
            el = time.perf_counter() - t
            if el >= min_seconds:
                break
        rates.append(n / el)
    return statistics.median(rates)


def _batches(items: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def measure_encoder(enc: ImageEncoder, images: Sequence[bytes], min_seconds: float
                    ) -> dict[str, Any]:
    """The four rates of the module docstring for one loaded encoder."""
    cuda = enc.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(enc.device)

    bs = enc.batch_size
    enc.encode_images(images[: 2 * bs])  # warm-up: autotune, nvjpeg handle, pools
    size = enc.spec.preprocess.image_size
    pixels = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, device=enc.device)
    if not cuda:
        pixels = pixels.contiguous(memory_format=torch.channels_last)

    def forward_only() -> int:
        enc.forward_pixels(pixels)
        return bs

    # the decode ceiling is the product's own prepare stage run the way the pipeline
    # runs it: a steady stream of batches through the same lanes and queues
    stream = list(images) * max(1, -(-16 * bs // len(images)))

    def decode_only() -> int:
        enc.decode_only(stream)
        return len(stream)

    def naive() -> int:
        for chunk in _batches(images, bs):
            pb = enc.prepare_batch(chunk)
            if pb.pixels is not None:
                if cuda:
                    torch.cuda.current_stream(enc.device).wait_event(pb.event)
                y, _ok = enc.forward_pixels(pb.pixels)
                y.cpu()
        return len(images)

    forward = _median_rate(forward_only, min_seconds, sync)
    decode = _median_rate(decode_only, min_seconds, sync)
    seq = _median_rate(naive, min_seconds, sync)
    stats0 = enc.pipeline_stats.batches
    # the same steady stream of at least 16 batches per call, as a busy worker sees
    # it, so that filling and draining the stages is not what gets measured
    with _GpuSampler(enc.device) as gpu:
        pipe = _median_rate(lambda: len(enc.encode_images(stream)), min_seconds, sync)
    st = enc.pipeline_stats
    sizes = list(st.batch_sizes)[-(st.batches - stats0):] if st.batches > stats0 else []
    return {
        "pipeline_img_per_s": round(pipe, 1),
        "forward_only_img_per_s": round(forward, 1),
        "decode_resize_only_img_per_s": round(decode, 1),
        "naive_sequential_img_per_s": round(seq, 1),
        "pipeline_vs_decode_ceiling": round(pipe / decode, 3),
        "pipeline_vs_forward_ceiling": round(pipe / forward, 3),
        "pipeline_vs_naive": round(pipe / seq, 3),
        "gpu_util_mean_pct": gpu.mean,
        "batch_size": bs,
        "mean_dispatched_batch": round(float(np.mean(sizes)), 1) if sizes else None,
        "cpu_fallbacks": enc.fallbacks,
        "prepare": enc.prepare_kind,
        "prepare_pool": enc.settings.prepare_pool,
        "prepare_workers": enc.prepare_workers,
        "decode_lanes": enc.decode_lanes,
        "dtype": str(enc.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "device": str(enc.device),
        "model": enc.spec.name,
        "dim": enc.dim,
    }


def device_name(device: torch.device) -> str:
    """Marketing name of a CUDA device, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(machine().get("cpu"))


def run_encode_bench(settings: EncoderSettings, images_dir: Path, limit: int | None,
                     min_seconds: float, out: Path, console: Console,
                     source: str | None = None) -> dict[str, Any]:
    """Load the encoder, measure, print the table and write JSON to ``out``."""
    images = load_jpegs(images_dir, limit)
    sizes = {Image.open(io.BytesIO(b)).size for b in images[:50]}
    enc = ImageEncoder.load(settings)
    try:
        result = measure_encoder(enc, images, min_seconds)
    finally:
        enc.close()
    report: dict[str, Any] = {
        **result,
        "images": len(images),
        "image_sizes_sampled": sorted(f"{w}x{h}" for w, h in sizes),
        "images_source": source or str(images_dir),
        "weights": str(settings.checkpoint) if settings.checkpoint else
        ("packaged" if settings.model == "pinfresh-effl0-minilm" else "random (seeded)"),
        "device_name": device_name(enc.device),
        "median_of": 3,
        "min_seconds_per_run": min_seconds,
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    r = report
    rows: list[tuple[str, object]] = [
        ("model / device", f"{r['model']} / {r['device_name']}"),
        ("batch (mean dispatched)", f"{r['batch_size']} ({r['mean_dispatched_batch']})"),
        ("prepare path", f"{r['prepare']} ({r['prepare_pool']} pool x{r['prepare_workers']}, "
                         f"torch threads {r['torch_threads']})"),
        ("pipeline: JPEG bytes -> vectors, img/s", r["pipeline_img_per_s"]),
        ("  bare forward (ceiling), img/s", r["forward_only_img_per_s"]),
        ("  decode + resize only (ceiling), img/s", r["decode_resize_only_img_per_s"]),
        ("  naive decode-then-forward, img/s", r["naive_sequential_img_per_s"]),
        ("pipeline / min(ceilings)",
         round(r["pipeline_img_per_s"] / min(r["forward_only_img_per_s"],
                                              r["decode_resize_only_img_per_s"]), 3)),
        ("GPU utilisation, mean %", r["gpu_util_mean_pct"] if r["gpu_util_mean_pct"] is not None
         else "n/a"),
        ("CPU fallbacks", r["cpu_fallbacks"]),
    ]
    emit(f"pinfresh bench encode ({len(images)} JPEGs, median of 3)", rows, report, out,
         console)
    return report
