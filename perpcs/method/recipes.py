"""Recipes: a target user's LoRA as per-piece sharer weights (what Per-Pcs stores per
user), written byte-reproducibly and turned back into a peft adapter.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from perpcs.data.layout import read_json
from perpcs.errors import fail
from perpcs.method.composition import ComposeSettings
from perpcs.method.pieces import PiecePool
from perpcs.paths import resolve_sharer_lora_dir

RECIPE_FORMAT = "perpcs-recipe/1"
GATE_SCORES_FORMAT = "perpcs-gate-scores/1"
POOLED_FORMAT = "perpcs-pooled-vectors/1"
POOLED_METADATA = "perpcs"     # the one metadata entry of a pooled-vectors file (a JSON record)


def make_recipe(pool: PiecePool, weights: dict, settings: ComposeSettings, user: str, task: str,
                batches: list, extra: dict | None = None) -> dict:
    pieces = {}
    for piece in pool.pieces:
        w = weights[piece]
        nz = torch.nonzero(w).flatten().tolist()
        pieces[piece] = [[pool.sharer_ids[i], float(w[i])] for i in nz]
    return {"format": RECIPE_FORMAT, "user_id": user, "task": task, "settings": settings.recorded(),
            "lora": {k: pool.config.get(k) for k in ("r", "lora_alpha", "target_modules", "use_rslora",
                                                    "base_model_name_or_path")},
            "sharers": pool.sharer_ids, "batches": batches, "pieces": pieces, **(extra or {})}


def gate_scores_record(pool: PiecePool, scores: dict, user: str, task: str, extra: dict | None = None) -> dict:
    """A user's gate scores (lora_composition.py --save_scores): for every piece, every sharer's score (mean
    over the user's batches), in the pool's sharer order. Not needed to rebuild the LoRA; it shows why the
    recipe chose what it chose (python -m perpcs explain)."""
    return {"format": GATE_SCORES_FORMAT, "user_id": user, "task": task, "sharers": pool.sharer_ids,
            "scores": {piece: [float(v) for v in scores[piece]] for piece in pool.pieces}, **(extra or {})}


def pooled_vectors_bytes(pooled: dict, user: str, task: str, extra: dict | None = None) -> bytes:
    """A user's pooled vectors (lora_composition.py --save_scores) as a safetensors file: per piece, the mean over
    the user's batches of the gate summary (Composer.final_pooled). One JSON metadata entry with sorted keys:
    safetensors writes a dict's entries in no fixed order, and files must be reproducible."""
    from safetensors.torch import save
    meta = json.dumps({"format": POOLED_FORMAT, "user_id": user, "task": task, **(extra or {})}, sort_keys=True)
    return save({p: v.float().contiguous() for p, v in pooled.items()}, metadata={POOLED_METADATA: meta})


def recipe_weights(recipe: dict, pool: PiecePool, path="recipe") -> dict:
    """{piece: weight vector over the pool's sharers} from a recipe (which must fit the pool)."""
    if recipe.get("format") != RECIPE_FORMAT:
        fail(f"{path}: not a Per-Pcs recipe (format {recipe.get('format')!r})")
    index = {uid: i for i, uid in enumerate(pool.sharer_ids)}
    weights = {}
    for piece in pool.pieces:
        if piece not in recipe["pieces"]:
            fail(f"{path}: no entry for piece {piece}")
        w = torch.zeros(len(pool), dtype=torch.float64)
        for uid, weight in recipe["pieces"][piece]:
            if uid not in index:
                fail(f"{path}: piece {piece} uses sharer {uid!r}, which is not in the sharer pool")
            w[index[uid]] = weight
        weights[piece] = w
    return weights


def recipe_sharers(path) -> list:
    return [str(s) for s in read_json(path, "recipe")["sharers"]]


def write_recipe(recipe: dict, path) -> int:
    from perpcs.atomic import write_bytes_atomic
    data = (json.dumps(recipe, indent=None, separators=(",", ":")) + "\n").encode()
    write_bytes_atomic(path, data)
    return len(data)


def materialize(recipe_file, anchor_dir, output_dir) -> Path:
    """Rebuild a user's peft adapter from its recipe and the sharer LoRAs (gates are not needed)."""
    recipe = read_json(recipe_file, "recipe")
    if "sharers" not in recipe or "pieces" not in recipe:
        fail(f"{recipe_file}: not a Per-Pcs recipe (needs 'sharers' and 'pieces')")
    pool = PiecePool(recipe["sharers"], resolve_sharer_lora_dir(anchor_dir))
    return pool.save_adapter(recipe_weights(recipe, pool, recipe_file), Path(output_dir))
