"""Domain-encoder training, checkpoints and recall on a synthetic set with a known answer."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from encoder.config import DEFAULT_MODEL, EncoderSettings
from encoder.data import Pair, is_test_caption, split_by_caption
from encoder.engine import ImageEncoder
from encoder.model import build_clip, model_spec
from encoder.train import (
    TrainConfig,
    compute_features,
    contrastive_loss,
    embed,
    evaluate,
    recall_at_k,
    save_checkpoint,
    train,
)

# one xdist process builds the module fixtures (a model, a catalog) once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (240, 220, 40)}


def _shape(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((30, 30, 130, 130), fill=fill)
    elif shape == "square":
        draw.rectangle((30, 30, 130, 130), fill=fill)
    else:
        draw.polygon([(80, 20), (140, 140), (20, 140)], fill=fill)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> list[Pair]:
    root = tmp_path_factory.mktemp("shapes")
    pairs = []
    for cname, rgb in COLOURS.items():
        for shape in ("circle", "square", "triangle"):
            img = Image.new("RGB", (160, 160), (255, 255, 255))
            _shape(ImageDraw.Draw(img), shape, rgb)
            path = root / f"{cname}_{shape}.png"
            img.save(path)
            pairs.append(Pair(path, f"a {cname} {shape}"))
    return pairs


@pytest.fixture(scope="module")
def setup(shapes, tmp_path_factory):
    spec = model_spec(DEFAULT_MODEL)
    model = build_clip(spec, seed=0)
    feats = compute_features(model, spec, shapes, tmp_path_factory.mktemp("cache"),
                             progress=False)
    return spec, model, feats


def test_split_is_by_caption_and_stable():
    pairs = [Pair(Path(f"/x/{i}.png"), f"caption {i % 40}") for i in range(200)]
    train_p, test_p = split_by_caption(pairs, 0.25)
    assert {p.caption for p in train_p}.isdisjoint({p.caption for p in test_p})
    assert 0 < len(test_p) < len(pairs)
    assert is_test_caption("A Frog.", 0.25) == is_test_caption("  a frog. ", 0.25)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(setup):
    spec, model, feats = setup
    m = copy.deepcopy(model)
    scale = m.logit_scale.exp().detach()
    before = float(contrastive_loss(*embed(m, feats), scale, feats.caption_ids))
    losses = train(m, feats, TrainConfig(epochs=5, batch_size=12, lr=1e-2), progress=False)
    scale = m.logit_scale.exp().detach()
    after = float(contrastive_loss(*embed(m, feats), scale, feats.caption_ids))
    assert after < before and losses[-1] < losses[0]


def test_trained_model_recalls_synthetic_set_perfectly(setup):
    spec, model, feats = setup
    m = copy.deepcopy(model)
    assert evaluate(m, feats)["t2i_r1"] < 1.0  # the untrained projection does not
    train(m, feats, TrainConfig(epochs=150, batch_size=12, lr=1e-2), progress=False)
    r = evaluate(m, feats)
    assert r["t2i_r1"] == 1.0 and r["i2t_r1"] == 1.0 and r["t2i_r5"] == 1.0


def test_recall_counts_any_image_with_the_caption():
    img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.3, 0.95], [0.0, 0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # images 0 and 1 share caption 0 (image 1 looks like caption 1); image 2 has caption 1
    r = recall_at_k(img, txt, torch.tensor([0, 0, 1]), ks=(1,))
    assert r["t2i_r1"] == 1.0
    assert r["i2t_r1"] == pytest.approx(2 / 3, abs=1e-3)


def test_checkpoint_reloads_identically_and_version_tracks_weights(setup, shapes, tmp_path):
    spec, model, feats = setup
    untrained_dir, trained_dir, again_dir = tmp_path / "u", tmp_path / "t", tmp_path / "t2"
    v0 = save_checkpoint(model, spec, untrained_dir, {})
    m = copy.deepcopy(model)
    train(m, feats, TrainConfig(epochs=3, batch_size=12), progress=False)
    v1 = save_checkpoint(m, spec, trained_dir, {})
    assert v1 != v0
    assert save_checkpoint(m, spec, again_dir, {}) == v1  # same weights, same id

    enc = ImageEncoder.load(EncoderSettings(checkpoint=trained_dir, batch_size=8))
    assert enc.version == v1
    got = np.stack(enc.encode_images([p.image.read_bytes() for p in shapes]))
    want, _ = embed(m, feats)
    assert np.allclose(got, want.numpy(), atol=1e-4)
    enc.close()

    reloaded = build_clip(model_spec(DEFAULT_MODEL, trained_dir), trained_dir)
    for (k, a), (_, b) in zip(m.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
