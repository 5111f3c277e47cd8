"""Encoder factory: packaged towers, version ids, checkpoint checks, staged encode."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from encoder.config import DEFAULT_MODEL, EncoderSettings
from encoder.engine import ImageEncoder
from encoder.errors import CheckpointError, ImageError
from encoder.model import build_image_tower, model_spec, version_id


@pytest.fixture(scope="module")
def enc():
    e = ImageEncoder.load(EncoderSettings(batch_size=4, prepare_workers=2))
    yield e
    e.close()


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return buf.getvalue()


def test_default_model_uses_packaged_imagenet_trunk():
    spec = model_spec(DEFAULT_MODEL)
    tower = build_image_tower(spec)
    # the packaged stem weights are not a fresh random init
    w = tower.trunk.conv_stem.weight
    again = build_image_tower(spec).trunk.conv_stem.weight
    assert torch.equal(w, again) and spec.embed_dim == 512


def test_version_id_stable_and_sensitive():
    spec = model_spec(DEFAULT_MODEL)
    t1, t2 = build_image_tower(spec), build_image_tower(spec)
    assert version_id(spec, t1) == version_id(spec, t2)
    with torch.no_grad():
        t2.head.proj.weight[0, 0] += 1e-3
    assert version_id(spec, t1) != version_id(spec, t2)
    t3 = build_image_tower(spec, seed=1)
    assert version_id(spec, t3) != version_id(spec, t1)


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    spec = model_spec(DEFAULT_MODEL)
    tower = build_image_tower(spec, seed=7)
    path = tmp_path / "ckpt.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}, str(path))
    loaded = build_image_tower(spec, checkpoint=path)
    assert version_id(spec, loaded) == version_id(spec, tower)

    bad = tmp_path / "bad.safetensors"
    state = {f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    state["visual.head.proj.weight"] = torch.zeros(768, 1280)
    save_file(state, str(bad))
    with pytest.raises(CheckpointError, match="does not match"):
        build_image_tower(spec, checkpoint=bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        build_image_tower(spec, checkpoint=tmp_path / "nope.pt")


def test_unknown_model_names_the_fix():
    with pytest.raises(CheckpointError, match="open_clip"):
        model_spec("no-such-model")


def test_named_open_clip_model_carries_its_dim():
    assert model_spec("ViT-L-14").embed_dim == 768
    assert model_spec("ViT-B-32").embed_dim == 512


def test_encode_images_order_errors_and_norm(enc):
    items = [png((255, 0, 0)), b"not an image", png((0, 0, 255)), png((255, 0, 0))] * 3
    out = enc.encode_images(items)
    assert len(out) == len(items)
    assert isinstance(out[1], ImageError) and out[1].reason == "not_an_image"
    vecs = [v for v in out if isinstance(v, np.ndarray)]
    assert all(v.shape == (512,) and v.dtype == np.float32 for v in vecs)
    assert np.allclose([np.linalg.norm(v) for v in vecs], 1.0, atol=1e-5)
    assert np.allclose(out[0], out[3], atol=1e-5)
    assert float(out[0] @ out[2]) < 0.999
    assert enc.images_forwarded >= 9


def test_nonfinite_rows_become_errors():
    enc = ImageEncoder.load(EncoderSettings())
    real = enc.tower

    def poisoned(x):
        y = real(x).clone()
        y[1, 2] = float("nan")
        return y

    enc.tower = poisoned  # type: ignore[assignment]
    try:
        out = enc.forward(np.zeros((3, 224, 224, 3), dtype=np.uint8))
    finally:
        enc.close()
    assert isinstance(out[1], ImageError) and out[1].reason == "nonfinite_embedding"
    assert isinstance(out[0], np.ndarray) and isinstance(out[2], np.ndarray)


def test_precision_is_measured_against_float32_on_the_same_pixels():
    from encoder.precision import COSINE_GATE, measure_agreement
    from tests.unit.test_prepare_paths import jpeg, photo

    rows = {a.dtype: a for a in measure_agreement(
        EncoderSettings(device="cpu"), [jpeg(photo(s)) for s in range(2)] + [b"junk"],
        dtypes=("float16",), batch=2)}
    assert rows["float32"].min_cosine == 1.0 and rows["float16"].images == 2
    # the domain tower's own GPU dtype agrees with float32 (also on the CPU's kernels)
    assert rows["float16"].passes and rows["float16"].min_cosine >= COSINE_GATE
    assert rows["float16"].min_cosine < 1.0  # it really ran in float16


def test_inference_dtype_belongs_to_the_model():
    from encoder.engine import resolve_dtype
    from encoder.model import model_spec

    dom, vit = model_spec("pinfresh-effl0-minilm"), model_spec("ViT-B-32")
    assert dom.cuda_dtype == "float16" and vit.cuda_dtype == "bfloat16"
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_dtype("auto", dom, cuda) == torch.float16
    assert resolve_dtype("auto", vit, cuda) == torch.bfloat16
    assert resolve_dtype("auto", vit, cpu) == torch.float32
    assert resolve_dtype("bfloat16", dom, cuda) == torch.bfloat16  # an explicit override


def test_null_vectors_span_the_whole_space():
    """A benchmark's recall means little over vectors of low rank (the old null
    encoder tiled a 64-byte digest: rank 64 at any dim)."""
    from encoder.null import null_vector

    vecs = np.stack([null_vector(f"img-{i}".encode(), 512) for i in range(600)])
    assert np.linalg.matrix_rank(vecs) == 512
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(null_vector(b"same", 512), null_vector(b"same", 512))
    assert not np.allclose(null_vector(b"same", 512), null_vector(b"same", 512, seed=1))
    assert not np.allclose(null_vector(b"same", 512, seed=-1), null_vector(b"same", 512))


def test_null_vectors_have_true_neighbours():
    """Isotropic random vectors (the null encoder before) have none to find: in 512-d a
    point's nearest of 2,000 is at a cosine of about 0.17, barely above the rest, and a
    search benchmark's recall on them measured that, not the index."""
    from encoder.null import null_vector

    vecs = np.stack([null_vector(f"img-{i}".encode(), 512) for i in range(2000)])
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -1.0)
    top = np.sort(sims, axis=1)[:, ::-1]
    assert np.median(top[:, 0]) > 0.5  # the nearest is near
    assert np.median(top[:, 9] - top[:, 100]) > 0.05  # the tenth stands out from the 101st
    # an unrelated pair is still near orthogonal: the space is used, not one cone
    assert abs(float(np.median(sims[np.triu_indices(2000, 1)]))) < 0.1


async def test_a_batch_the_in_process_encoder_fails_is_an_outage(monkeypatch):
    """A CUDA error (any exception of a whole batch) used to dead-letter every event of
    the batch as internal_error; it is an outage, as through the encoder process."""
    from encoder.errors import EncoderUnavailable

    enc = ImageEncoder.load(EncoderSettings())
    try:
        def boom(items):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(enc._pipeline, "map", boom)
        with pytest.raises(EncoderUnavailable, match="illegal memory access"):
            await enc.encode_images_async([b"x"])

        def bug(items):  # a bug is not an outage: it propagates, the stream isolates it
            raise KeyError("a bug")

        monkeypatch.setattr(enc._pipeline, "map", bug)
        with pytest.raises(KeyError):
            await enc.encode_images_async([b"x"])
    finally:
        enc.close()
