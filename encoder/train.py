"""Train, evaluate and save the domain encoder (LiT-style CLIP on the catalog's pairs).

The pretrained towers stay frozen; what trains is the image projection, the
text projection and the temperature (symmetric InfoNCE). Optionally the last
``unfreeze_last`` stages of the image trunk train too. Because the frozen part
of each tower sees every image/caption once per run, its outputs are computed
once and cached on disk (keyed by image content hash and tower fingerprint),
so a run on a 2-core CPU takes minutes.

Captions that occur several times (several stamps called "A frog.") are
treated as one class: every image with the caption is a positive for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from encoder.data import HELD_OUT_FRACTION, Pair, normalize_caption
from encoder.errors import ConfigError, ImageError
from encoder.model import MANIFEST, WEIGHTS, ModelSpec, get_tokenizer, version_id
from encoder.preprocess import prepare_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (recorded in the checkpoint)."""

    epochs: int = 60
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    unfreeze_last: int = 0
    max_image_pixels: int = 40_000_000


# ----------------------------------------------------------------- features
def _fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _split_trunk(trunk: Any, k: int) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                    nn.Module]:
    """``(frozen front, trainable tail)`` of a timm EfficientNet trunk at ``k`` stages."""
    blocks = getattr(trunk, "blocks", None)
    if k == 0:
        return trunk, nn.Identity()
    if blocks is None or k > len(blocks):
        raise ConfigError(
            f"cannot unfreeze {k} stages of {type(trunk).__name__}: only timm EfficientNet-style "
            "trunks with .blocks are supported"
        )
    n = len(blocks)

    def front(x: torch.Tensor) -> torch.Tensor:
        x = trunk.bn1(trunk.conv_stem(x))
        for b in blocks[: n - k]:
            x = b(x)
        return x

    tail = nn.Sequential(*blocks[n - k:], trunk.conv_head, trunk.bn2, trunk.global_pool)
    return front, tail


class FeatureCache:
    """Frozen-tower outputs on disk, one ``.npz`` per (tower, fingerprint)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, np.ndarray] = {}
        if path.is_file():
            with np.load(path) as z:
                self.rows = dict(zip(z["keys"].tolist(), z["feats"], strict=True))

    def save(self) -> None:
        """Write the cache atomically."""
        if not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.rows)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(keys), feats=np.stack([self.rows[k] for k in keys]))
        tmp.replace(self.path)


@dataclass
class Features:
    """Frozen-tower outputs for a list of pairs (rows whose image failed are dropped)."""

    pairs: list[Pair]
    image: torch.Tensor
    text: torch.Tensor
    caption_ids: torch.Tensor
    captions: list[str]


def compute_features(
    model: Any, spec: ModelSpec, pairs: Sequence[Pair], cache_dir: Path,
    unfreeze_last: int = 0, batch: int = 32, progress: bool = True,
    max_image_pixels: int = 40_000_000,
) -> Features:
    """Run the frozen parts of both towers over ``pairs`` (cached by content hash)."""
    trunk = model.visual.trunk
    front, _ = _split_trunk(trunk, unfreeze_last)
    pre = spec.preprocess
    img_cache = FeatureCache(cache_dir / f"img_{spec.name}_k{unfreeze_last}_{_fingerprint(trunk)}"
                                         f"_{pre.image_size}.npz")
    text_tower = model.text
    txt_cache = FeatureCache(cache_dir / f"txt_{spec.name}_{_fingerprint(text_tower)}.npz")
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255

    keys: list[str | None] = []
    todo: list[tuple[str, np.ndarray]] = []
    for p in tqdm(pairs, desc="decode", unit="img", disable=not progress):
        data = p.image.read_bytes()
        key = hashlib.sha256(data).hexdigest()
        if key in img_cache.rows:
            keys.append(key)
            continue
        try:
            arr = prepare_image(data, pre, max_pixels=max_image_pixels)
        except ImageError as exc:
            logger.warning("skipping %s: %s", p.image, exc)
            keys.append(None)
            continue
        keys.append(key)
        todo.append((key, arr))
    trunk.eval()
    with torch.inference_mode():
        for i in tqdm(range(0, len(todo), batch), desc="image features", unit="batch",
                      disable=not progress or not todo):
            chunk = todo[i:i + batch]
            x = torch.from_numpy(np.stack([a for _, a in chunk])).permute(0, 3, 1, 2).float()
            feats = front((x - mean) / std).float().numpy()
            for (key, _), f in zip(chunk, feats, strict=True):
                img_cache.rows[key] = f.astype(np.float16 if unfreeze_last else np.float32)
    img_cache.save()

    ok = [i for i, k in enumerate(keys) if k is not None]
    kept = [pairs[i] for i in ok]
    captions = [p.caption for p in kept]
    tokenizer = get_tokenizer(spec)
    missing = sorted({c for c in captions if c not in txt_cache.rows})
    text_tower.eval()
    with torch.inference_mode():
        for i in range(0, len(missing), 256):
            texts = missing[i:i + 256]
            ids = tokenizer(texts)
            mask = (ids != text_tower.config.pad_token_id).long()
            out = text_tower.transformer(input_ids=ids, attention_mask=mask)
            pooled = text_tower.pooler(out, mask).float().numpy()
            for c, f in zip(texts, pooled, strict=True):
                txt_cache.rows[c] = f
    txt_cache.save()

    norm = [normalize_caption(c) for c in captions]
    index = {c: i for i, c in enumerate(dict.fromkeys(norm))}
    return Features(
        pairs=kept,
        image=torch.from_numpy(np.stack([img_cache.rows[str(keys[i])] for i in ok])).float(),
        text=torch.from_numpy(np.stack([txt_cache.rows[c] for c in captions])).float(),
        caption_ids=torch.tensor([index[c] for c in norm]),
        captions=norm,
    )


# ----------------------------------------------------------- train and eval
def _heads(model: Any, unfreeze_last: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    _, tail = _split_trunk(model.visual.trunk, unfreeze_last)
    return tail, model.visual.head, model.text.proj


def embed(model: Any, feats: Features, unfreeze_last: int = 0,
          grad: bool = False, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``(image, text)`` embeddings from cached features."""
    tail, vhead, tproj = _heads(model, unfreeze_last)
    img, txt = feats.image, feats.text
    if idx is not None:
        img, txt = img[idx], txt[idx]
    with torch.set_grad_enabled(grad):
        i = vhead(tail(img))
        t = tproj(txt)
    return F.normalize(i, dim=-1), F.normalize(t, dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                     caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where pairs sharing a caption are all positives."""
    logits = scale * img @ txt.T
    pos = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train(model: Any, feats: Features, cfg: TrainConfig, progress: bool = True
          ) -> list[float]:
    """Train projections (and the unfrozen trunk tail) in place; returns loss per epoch."""
    torch.manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    tail, vhead, tproj = _heads(model, cfg.unfreeze_last)
    params = [*tail.parameters(), *vhead.parameters(), *tproj.parameters()]
    for p in params:
        p.requires_grad_(True)
    scale = model.logit_scale
    scale.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": params, "weight_decay": cfg.weight_decay},
                             {"params": [scale], "weight_decay": 0.0}], lr=cfg.lr)
    n = len(feats.pairs)
    steps = cfg.epochs * max(1, -(-n // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.eval()  # batch norm statistics stay frozen
    losses: list[float] = []
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not progress)
    for _ in bar:
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            img, txt = embed(model, feats, cfg.unfreeze_last, grad=True, idx=idx)
            loss = contrastive_loss(img, txt, scale.exp().clamp(max=100), feats.caption_ids[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def recall_at_k(img: torch.Tensor, txt_by_caption: torch.Tensor, image_caption_ids: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text-to-image and image-to-text recall@k.

    ``txt_by_caption`` has one row per unique caption; ``image_caption_ids[i]``
    is the caption row of image ``i``. A text query hits if any image with its
    caption is in the top k; an image query hits if its caption is.
    """
    sim = txt_by_caption @ img.T  # captions x images
    out: dict[str, float] = {}
    n_cap = sim.shape[0]
    t2i_rank = sim.argsort(dim=1, descending=True)
    i2t_rank = sim.T.argsort(dim=1, descending=True)
    for k in ks:
        hits = (image_caption_ids[t2i_rank[:, :k]] == torch.arange(n_cap)[:, None]).any(1)
        out[f"t2i_r{k}"] = round(float(hits.float().mean()), 4)
        hits = (i2t_rank[:, :k] == image_caption_ids[:, None]).any(1)
        out[f"i2t_r{k}"] = round(float(hits.float().mean()), 4)
    return out


def evaluate(model: Any, feats: Features, unfreeze_last: int = 0) -> dict[str, float]:
    """Recall@1/5/10 both ways on ``feats`` (use the held-out split)."""
    img, txt = embed(model, feats, unfreeze_last)
    first: dict[int, int] = {}
    for row, cid in enumerate(feats.caption_ids.tolist()):
        first.setdefault(cid, row)
    order = torch.tensor([first[c] for c in range(len(first))])
    return recall_at_k(img, txt[order], feats.caption_ids)


# -------------------------------------------------------------- checkpoints
def save_checkpoint(model: Any, spec: ModelSpec, out_dir: Path,
                    summary: dict[str, Any]) -> str:
    """Write a pinfresh checkpoint directory; returns the model version id.

    Layout: ``model.safetensors`` (the whole CLIP state dict),
    ``pinfresh.json`` (model name, open_clip config, preprocessing, version id,
    and ``summary``: training data, config, metrics).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS))
    version = version_id(spec, model.visual)
    manifest = {
        "model": spec.name, "config": spec.config, "preprocess": spec.preprocess.to_dict(),
        "inference_dtype": spec.cuda_dtype,
        "version": version, "embed_dim": spec.embed_dim,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **summary,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return version


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON-ready training config."""
    return asdict(cfg)


# --------------------------------------------------------------- workflows
def train_checkpoint(
    spec: ModelSpec, train_pairs: Sequence[Pair], out_dir: Path, cache_dir: Path,
    cfg: TrainConfig, eval_pairs: Sequence[Pair] = (), data_summary: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[str, dict[str, float], list[float]]:
    """Train from the packaged towers, evaluate, save; returns (version, metrics, losses)."""
    from encoder.model import build_clip

    model = build_clip(spec, seed=cfg.seed)
    feats = compute_features(model, spec, train_pairs, cache_dir, cfg.unfreeze_last,
                             progress=progress, max_image_pixels=cfg.max_image_pixels)
    losses = train(model, feats, cfg, progress=progress)
    metrics: dict[str, float] = {}
    if eval_pairs:
        test = compute_features(model, spec, eval_pairs, cache_dir, cfg.unfreeze_last,
                                progress=False, max_image_pixels=cfg.max_image_pixels)
        metrics = evaluate(model, test, cfg.unfreeze_last)
    version = save_checkpoint(model, spec, out_dir, {
        "training": {"config": config_dict(cfg), "pairs": len(feats.pairs),
                     "unique_captions": len(set(feats.captions)), "final_loss": losses[-1],
                     **(data_summary or {})},
        "metrics": {"held_out": metrics},
    })
    return version, metrics, losses


def compare_encoders(
    domain_pairs: Sequence[Pair], generic_pairs: Sequence[Pair], models_dir: Path,
    cache_dir: Path, cfg: TrainConfig, test_fraction: float = HELD_OUT_FRACTION,
    progress: bool = True,
) -> dict[str, Any]:
    """Untrained vs generic (emoji only) vs domain (emoji + domain train split).

    All three are evaluated on the domain's held-out captions, which no model
    saw in training (generic pairs with a held-out caption are dropped too).
    """
    from encoder.data import split_by_caption
    from encoder.model import DEFAULT_MODEL, build_clip, model_spec

    t0 = time.perf_counter()
    spec = model_spec(DEFAULT_MODEL)
    train_dom, test_dom = split_by_caption(domain_pairs, test_fraction)
    held = {normalize_caption(p.caption) for p in test_dom}
    generic = [p for p in generic_pairs if normalize_caption(p.caption) not in held]

    untrained = build_clip(spec, seed=cfg.seed)
    test = compute_features(untrained, spec, test_dom, cache_dir, cfg.unfreeze_last,
                            progress=progress, max_image_pixels=cfg.max_image_pixels)
    results: dict[str, Any] = {"untrained": evaluate(untrained, test, cfg.unfreeze_last)}
    del untrained
    versions = {}
    for name, pairs in (("generic", generic), ("domain", [*generic, *train_dom])):
        version, metrics, losses = train_checkpoint(
            spec, pairs, models_dir / name, cache_dir, cfg, test_dom,
            {"datasets": name, "held_out_pairs": len(test_dom)}, progress=progress)
        results[name] = metrics
        versions[name] = version
    results["_meta"] = {
        "held_out_pairs": len(test.pairs), "held_out_captions": len(set(test.captions)),
        "generic_train_pairs": len(generic), "domain_train_pairs": len(generic) + len(train_dom),
        "test_fraction": test_fraction, "config": config_dict(cfg), "versions": versions,
        "checkpoints": {k: str(models_dir / k) for k in versions},
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    return results
