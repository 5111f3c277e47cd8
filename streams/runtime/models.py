"""Library functions behind ``pinfresh encoder train|eval|compare`` and ``pinfresh graft``.

Glue between the stores and the model code (which may not import the
stores), kept out of the CLI so the commands only parse options and print.
Data-dir places come from `streams.settings.DataPaths`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from encoder.errors import PinfreshError
from store.lifecycle import open_stores
from streams.settings import Settings


def quiet_transformers() -> None:
    """No progress bars or info logs from transformers (model loading is chatty)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def default_catalogs(settings: Settings, names: tuple[str, ...]) -> list[Path]:
    """The sample catalogs of this data dir, prepared first where missing.

    A data dir other than the one `catalog prepare` ran in has none yet; the
    training commands make them (as `encoder compare` does) rather than stop.
    """
    from streams.runtime.catalog import prepare_emoji_catalog, prepare_sample_catalog

    make = {"tuxpaint": prepare_sample_catalog, "emoji": prepare_emoji_catalog}
    out = []
    for name in names:
        path = settings.paths.catalog(name)
        if not path.is_file():
            path = make[name](settings.paths.root)
        out.append(path)
    return out


def train_domain_encoder(settings: Settings, catalogs: list[Path], out: Path, hold_out: bool,
                         epochs: int, unfreeze_last: int, seed: int) -> dict[str, Any]:
    """Train the domain encoder on catalogs (default: Tux Paint + emoji); returns a summary."""
    from encoder.data import read_pairs, split_by_caption
    from encoder.model import DEFAULT_MODEL, model_spec
    from encoder.train import TrainConfig, train_checkpoint

    quiet_transformers()
    p = settings.paths
    paths = catalogs or default_catalogs(settings, ("tuxpaint", "emoji"))
    pairs = read_pairs(paths)
    train_pairs, test_pairs = split_by_caption(pairs) if hold_out else (pairs, [])
    version, metrics, losses = train_checkpoint(
        model_spec(DEFAULT_MODEL), train_pairs, out, p.features,
        TrainConfig(epochs=epochs, unfreeze_last=unfreeze_last, seed=seed), test_pairs,
        {"catalogs": [str(x) for x in paths], "held_out_pairs": len(test_pairs)})
    return {"version": version, "out": str(out), "first_loss": losses[0],
            "last_loss": losses[-1], "metrics": metrics}


def eval_encoder(settings: Settings, checkpoint: Path | None, catalogs: list[Path]
                 ) -> dict[str, Any]:
    """Held-out recall@1/5/10 of a checkpoint (or the untrained default model)."""
    from encoder.data import read_pairs, split_by_caption
    from encoder.model import build_clip, model_spec
    from encoder.train import compute_features, evaluate

    quiet_transformers()
    paths = catalogs or default_catalogs(settings, ("tuxpaint",))
    _, test = split_by_caption(read_pairs(paths))
    spec = model_spec(settings.encoder.model, checkpoint)
    model = build_clip(spec, checkpoint)
    feats = compute_features(model, spec, test, settings.paths.features)
    return {"checkpoint": str(checkpoint), "held_out_pairs": len(feats.pairs),
            **evaluate(model, feats)}


def compare_encoders(settings: Settings, epochs: int, unfreeze_last: int, seed: int
                     ) -> dict[str, Any]:
    """Untrained vs generic (emoji) vs domain (emoji + Tux Paint train) on held-out Tux Paint."""
    from encoder.data import read_pairs
    from encoder.train import TrainConfig
    from encoder.train import compare_encoders as compare
    from streams.runtime.catalog import prepare_emoji_catalog, prepare_sample_catalog

    quiet_transformers()
    data = settings.paths.root
    t0 = time.perf_counter()
    res = compare(read_pairs([prepare_sample_catalog(data)]),
                  read_pairs([prepare_emoji_catalog(data)]), settings.paths.models,
                  settings.paths.features,
                  TrainConfig(epochs=epochs, unfreeze_last=unfreeze_last, seed=seed))
    res["_meta"]["command_wall_time_s"] = round(time.perf_counter() - t0, 1)
    return res


async def _graft_training_pairs(settings: Settings) -> tuple[str, list[str], np.ndarray]:
    from encoder.data import is_test_caption

    async with open_stores(settings) as stores:
        live = await stores.cache.get_live()
        if live is None:
            raise PinfreshError("no live version: run the pipeline first")
        rows = [r for r in await stores.milvus.iter_pins(live)
                if r["caption"] and not is_test_caption(r["caption"])]
        vecs, found = await stores.cache.get_vectors(live, [r["pin_id"] for r in rows])
        return live, [r["caption"] for r, f in zip(rows, found, strict=True) if f], vecs[found]


def train_graft(settings: Settings, epochs: int, out: Path | None) -> dict[str, Any]:
    """Train a projector on (pin embedding, caption) pairs of the live version, LM frozen.

    Pins whose caption is in the held-out split are left out (the eval set).
    """
    import asyncio

    from encoder.graft import load_lm, save_projector, train_projector

    version, captions, vecs = asyncio.run(_graft_training_pairs(settings))
    lm, tok = load_lm()
    proj, losses = train_projector(lm, tok, np.asarray(vecs), captions, epochs=epochs)
    out = out or settings.paths.graft(version)
    save_projector(proj, out, version, {"pairs": len(captions), "losses": losses})
    return {"version": version, "pairs": len(captions), "first_loss": losses[0],
            "last_loss": losses[-1], "out": str(out)}


def ask_graft(settings: Settings, pin_id: str, question: str, projector: Path | None) -> str:
    """Answer a question about a pin from its stored embedding (never encodes the image)."""
    import asyncio

    from encoder.graft import answer, check_version, load_lm, load_projector

    async def read() -> Any:
        async with open_stores(settings) as stores:
            return await stores.reader.get_many([pin_id])

    res = asyncio.run(read())
    if not res.found[0]:
        raise PinfreshError(f"pin {pin_id} has no embedding in version {res.version}")
    proj, manifest = load_projector(projector or settings.paths.graft(res.version))
    check_version(manifest, res.version)
    lm, tok = load_lm()
    return str(answer(lm, tok, proj, res.vectors[0], question))


def eval_graft(settings: Settings, epochs: int) -> dict[str, Any]:
    """Multiple-choice caption accuracy on held-out pins: shuffled vs generic vs domain.

    Needs the generic and domain checkpoints of `compare_encoders`.
    """
    from encoder.config import EncoderSettings
    from encoder.data import read_pairs, split_by_caption
    from encoder.engine import ImageEncoder
    from encoder.graft import load_lm, multiple_choice_accuracy, save_projector, train_projector

    p = settings.paths
    train, test = split_by_caption(read_pairs([p.catalog("tuxpaint")]))
    lm, tok = load_lm()
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    embs: dict[str, tuple[Any, list[str], Any, list[str]]] = {}
    for name in ("generic", "domain"):
        ckpt = p.models / name
        if not (ckpt / "pinfresh.json").is_file():
            raise PinfreshError(f"{ckpt} missing: run `pinfresh encoder compare` first")
        enc = ImageEncoder.load(EncoderSettings(checkpoint=ckpt))
        sets = []
        for pairs in (train, test):
            vecs = enc.encode_images([pair.image.read_bytes() for pair in pairs])
            keep = [(v, pair.caption) for v, pair in zip(vecs, pairs, strict=True)
                    if isinstance(v, np.ndarray)]
            sets.append((np.stack([v for v, _ in keep]), [c for _, c in keep]))
        embs[name] = (*sets[0], *sets[1])
        proj, losses = train_projector(lm, tok, sets[0][0], sets[0][1], epochs=epochs)
        save_projector(proj, p.models / f"graft-eval-{name}", enc.version,
                       {"pairs": len(sets[0][1]), "losses": losses})
        res[f"{name}_acc"] = round(multiple_choice_accuracy(lm, tok, proj, *sets[1]), 4)
        res[f"{name}_final_loss"] = round(losses[-1], 4)
        if name == "domain":
            perm = np.random.default_rng(0).permutation(len(sets[1][1]))
            res["shuffled_acc"] = round(multiple_choice_accuracy(
                lm, tok, proj, sets[1][0][perm], sets[1][1]), 4)
        enc.close()
    res.update({"held_out_pins": len(embs["domain"][3]), "choices": 5, "chance": 0.2,
                "train_pins": len(embs["domain"][1]), "epochs": epochs,
                "wall_time_s": round(time.perf_counter() - t0, 1)})
    return res
