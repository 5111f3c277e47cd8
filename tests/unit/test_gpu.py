"""CUDA-only checks of the GPU prepare stage and each model's own dtype (skipped without CUDA).

`deploy/device/gpu_check.py` runs the same comparisons at benchmark scale.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from encoder.config import EncoderSettings
from encoder.engine import ImageEncoder
from encoder.errors import ImageError
from encoder.model import PreprocessSpec
from encoder.prepare_tensor import TensorPreparer
from tests.unit.test_prepare_paths import jpeg, photo, png

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_nvjpeg_pixels_match_the_cpu_tensor_path():
    pool = ThreadPoolExecutor(2)
    items = [jpeg(photo(s)) for s in range(8)] + [png(photo(9, 300, 200))]
    kw = dict(pool=pool, max_pixels=40_000_000, min_side=8)
    gpu = TensorPreparer(PreprocessSpec(), torch.device("cuda"), **kw)(items)
    cpu = TensorPreparer(PreprocessSpec(), torch.device("cpu"), **kw)(items)
    torch.cuda.synchronize()
    assert gpu.pixels.is_cuda and gpu.fallbacks == 1
    a = gpu.pixels.cpu()[[gpu.rows.index(i) for i in range(9)]].float()
    b = cpu.pixels[[cpu.rows.index(i) for i in range(9)]].float()
    assert (a - b).abs().mean() < 1.0


@pytest.mark.parametrize("model, dtype", [("pinfresh-effl0-minilm", torch.float16),
                                          ("ViT-B-32", torch.bfloat16)])
def test_cuda_vectors_in_the_models_own_dtype_match_float32_cpu(model, dtype):
    items = [jpeg(photo(s)) for s in range(16)] + [b"junk"]
    cpu = ImageEncoder.load(EncoderSettings(model=model, device="cpu", prepare="tensor",
                                            batch_size=8))
    gpu = ImageEncoder.load(EncoderSettings(model=model, device="cuda", batch_size=8))
    try:
        a, b = cpu.encode_images(items), gpu.encode_images(items)
    finally:
        cpu.close()
        gpu.close()
    assert gpu.dtype == dtype and cpu.dtype == torch.float32
    assert next(gpu.tower.parameters()).dtype == dtype  # cast once at load
    assert gpu.version == cpu.version  # the dtype is not part of the model version
    assert isinstance(b[16], ImageError) and b[16].reason == "not_an_image"
    cos = [float(x @ y) for x, y in zip(a[:16], b[:16], strict=True)]
    assert min(cos) >= 0.999, cos
    assert gpu.prepare_kind == "tensor"


def test_vit_l14_auto_batch_runs_without_oom():
    enc = ImageEncoder.load(EncoderSettings(model="ViT-L-14", device="cuda"))
    try:
        assert 1 <= enc.batch_size <= 256
        out = enc.encode_images([jpeg(photo(s % 4)) for s in range(enc.batch_size)])
        assert all(isinstance(v, np.ndarray) and v.shape == (768,) for v in out)
    finally:
        enc.close()
