"""The graft splice with the real SmolLM2 (frozen) and an untrained projector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder.graft import (
    Projector,
    VersionMismatch,
    _splice,
    caption_scores,
    check_version,
    load_lm,
    make_prompt,
)

# one xdist process loads the LM once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("graft")]


@pytest.fixture(scope="module")
def lm_tok():
    return load_lm()


def test_placeholder_splice_changes_the_lm_output(lm_tok):
    lm, tok = lm_tok
    torch.manual_seed(0)
    proj = Projector(512, lm.config.hidden_size, k=4).eval()
    prompt = make_prompt(tok)
    assert prompt.before and prompt.after
    a, b = np.random.default_rng(1).standard_normal((2, 512)).astype(np.float32)
    outs = []
    with torch.inference_mode():
        for e in (a, b, a):
            embeds, mask, _ = _splice(lm, prompt, proj(torch.from_numpy(e)[None]), [[]])
            assert embeds.shape[1] == len(prompt.before) + 4 + len(prompt.after)
            outs.append(lm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1])
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)  # different embedding, new output
    assert torch.allclose(outs[0], outs[2])                 # same embedding, same output
    s = caption_scores(lm, tok, proj, a, ["A frog.", "A red car."])
    assert len(s) == 2 and all(np.isfinite(s))


def test_version_mismatch_is_refused():
    check_version({"encoder_version": "v_a"}, "v_a")
    with pytest.raises(VersionMismatch, match="graft train"):
        check_version({"encoder_version": "v_a"}, "v_b")
