"""The sharer pool: every sharer's LoRA pieces and layer-normed gates (method/gates.py), stacked per piece
position, read once per process; adapters built from per-piece sharer weights.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from perpcs.atomic import write_dir_atomic
from perpcs.data.layout import read_json
from perpcs.errors import fail
from perpcs.method.gates import load_sharer_gates, normalised_gates
from perpcs.paths import user_file_name
from perpcs.models.lora import read_safetensors

ADAPTER_PREFIX = "base_model.model."


class PiecePool:
    """Every sharer's LoRA pieces and layer-normed gates, stacked per piece position: read once."""

    def __init__(self, sharer_ids: list, anchor_dir, gate_dir=None, device="cpu"):
        """gate_dir None: LoRAs only, enough to rebuild adapters from recipes."""
        self.sharer_ids = [str(s) for s in sharer_ids]
        if not self.sharer_ids:
            fail("the sharer pool is empty")
        self.anchor_dir = Path(anchor_dir)
        configs = [self._read_config(uid) for uid in self.sharer_ids]
        self.config = configs[0]
        for uid, cfg in zip(self.sharer_ids, configs):
            if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):   # one scaling serves every piece here
                fail(f"sharer {uid!r} ({self._adapter_dir(uid)}): adapters with rank_pattern / alpha_pattern "
                     f"are not supported (every piece must share r and lora_alpha)")
        for uid, cfg in zip(self.sharer_ids[1:], configs[1:]):
            for key in ("r", "lora_alpha", "target_modules", "base_model_name_or_path", "use_rslora"):
                a, b = _norm(self.config.get(key)), _norm(cfg.get(key))
                if a != b:
                    fail(f"sharer {uid!r} ({self._adapter_dir(uid)}) has {key} = {cfg.get(key)!r}, but sharer "
                         f"{self.sharer_ids[0]!r} has {self.config.get(key)!r}: all sharers must share one config")
        r, alpha = self.config["r"], self.config["lora_alpha"]
        self.scaling = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        tensors = [self._read_adapter(uid) for uid in self.sharer_ids]
        self.pieces = list(tensors[0])
        for uid, t in zip(self.sharer_ids[1:], tensors[1:]):
            if set(t) != set(self.pieces):
                fail(f"sharer {uid!r} has other LoRA modules than sharer {self.sharer_ids[0]!r}")
        self.dtype = next(iter(tensors[0].values()))[0].dtype
        for piece in self.pieces:
            for uid, t in zip(self.sharer_ids, tensors):
                if t[piece][0].shape != tensors[0][piece][0].shape or t[piece][1].shape != tensors[0][piece][1].shape:
                    fail(f"sharer {uid!r}: piece {piece} has another shape than sharer {self.sharer_ids[0]!r}")
        # every gates file read and checked against the LoRA pieces before any stacking (or model load)
        widths = {piece: tensors[0][piece][0].shape[-1] for piece in self.pieces}   # lora_A is (r, d_in)
        gates = load_sharer_gates(gate_dir, self.sharer_ids, widths) if gate_dir is not None else None
        self.A, self.B, self.G = {}, {}, {}
        for piece in self.pieces:
            self.A[piece] = torch.stack([t[piece][0].float() for t in tensors]).to(device)   # (S, r, d_in)
            self.B[piece] = torch.stack([t[piece][1].float() for t in tensors]).to(device)   # (S, d_out, r)
            if gates is None:
                continue
            self.G[piece] = normalised_gates(gates, piece).to(device)

    def __len__(self) -> int:
        return len(self.sharer_ids)

    def to(self, device) -> "PiecePool":
        for table in (self.A, self.B, self.G):
            for piece in table:
                table[piece] = table[piece].to(device)
        return self

    def _adapter_dir(self, uid: str) -> Path:
        return self.anchor_dir / user_file_name(uid)

    def _read_config(self, uid: str) -> dict:
        path = self._adapter_dir(uid) / "adapter_config.json"
        if not path.is_file():
            fail(f"no sharer LoRA for user {uid!r}: {path} is missing (run train_anchor_PEFT.py)")
        config = read_json(path, "adapter config")
        if not isinstance(config, dict):
            fail(f"{path}: expected a JSON object (a peft adapter config)")
        return config

    def _read_adapter(self, uid: str) -> dict:
        """{piece: (A, B)} of one sharer adapter file."""
        path = self._adapter_dir(uid) / "adapter_model.safetensors"
        if not path.is_file():
            fail(f"no sharer LoRA weights for user {uid!r}: {path} is missing")
        raw = read_safetensors(path, "sharer LoRA weights")
        pieces: dict = {}
        for key, tensor in raw.items():
            named = piece_of_key(key)
            if named is not None:
                pieces.setdefault(named[0], [None, None])[named[1]] = tensor
        broken = [p for p, ab in pieces.items() if ab[0] is None or ab[1] is None]
        if not pieces or broken:
            fail(f"{path}: not a complete LoRA adapter (pieces without A or B: {broken[:3]})")
        return {p: tuple(ab) for p, ab in pieces.items()}

    def build(self, weights: dict) -> dict:
        """{piece: (A, B)} in fp32 from {piece: sharer weight vector (S,)}: sum_s w_s A_s, sum_s w_s B_s."""
        out = {}
        for piece in self.pieces:
            w = weights[piece].to(self.A[piece].device, torch.float32)
            out[piece] = (torch.einsum("s,srd->rd", w, self.A[piece]), torch.einsum("s,sdr->dr", w, self.B[piece]))
        return out

    def adapter_state_dict(self, weights: dict) -> dict:
        """The assembled LoRA as a peft adapter state dict ({base_model.model.<piece>.lora_A.weight: A, ...}) in the
        sharers' dtype, on the pool's device: what save_adapter writes and load_composed loads."""
        tensors = {}
        for piece, (a, b) in self.build(weights).items():
            tensors[f"{ADAPTER_PREFIX}{piece}.lora_A.weight"] = a.to(self.dtype)
            tensors[f"{ADAPTER_PREFIX}{piece}.lora_B.weight"] = b.to(self.dtype)
        return tensors

    def save_adapter(self, weights: dict, target) -> Path:
        """Write the assembled LoRA as a standard peft adapter (the sharers' config, the sharers' dtype)."""
        config_src = self._adapter_dir(self.sharer_ids[0]) / "adapter_config.json"
        tensors = {k: t.cpu().contiguous() for k, t in self.adapter_state_dict(weights).items()}

        def write(staging: Path) -> None:
            save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
            shutil.copyfile(config_src, staging / "adapter_config.json")

        return write_dir_atomic(target, write)


def piece_of_key(key: str) -> tuple | None:
    """(piece, 0 for A / 1 for B) of a peft adapter file's key ('base_model.model.<piece>.lora_A.weight'), None
    for any other key."""
    for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
        if key.endswith(part):
            return key[:-len(part)].removeprefix(ADAPTER_PREFIX), slot
    return None


def _norm(value):
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def composed_lora_model(model, pool: PiecePool):
    """A peft LoRA on ``model`` (base + task model) at the pool's pieces, with the sharers' r, lora_alpha and rslora:
    made once per process, it receives each target user's assembled LoRA (load_composed) and predicts the way
    OPPU's adapters do, adapter weights in fp32 (peft's default) whatever the model's dtype. The composer is
    installed after it (around peft's layers); assembly runs with the adapter disabled."""
    from peft import get_peft_model

    from perpcs.models.lora import lora_config
    config = lora_config(pool.config["r"], pool.config["lora_alpha"], 0.0, pool.pieces)
    config.use_rslora = bool(pool.config.get("use_rslora"))
    config.inference_mode = True
    try:
        return get_peft_model(model, config)
    except ValueError as err:   # none of the pieces is in the model (some missing: install_composer says which)
        fail(f"the sharer LoRAs target modules this model does not have ({err}): were they trained on another "
             f"base model?")


def load_composed(peft_model, pool: PiecePool, weights: dict, adapter_name: str = "default") -> None:
    """Load a user's assembled LoRA into composed_lora_model's adapter (or another adapter of the same config,
    ``adapter_name``: one per user of a batch) as peft loads a saved adapter: the tensors pool.save_adapter writes
    (the sharers' dtype), copied into the adapter's (fp32) weights. Call it with the composer's wrappers removed
    (their nesting would rename peft's keys)."""
    from peft import set_peft_model_state_dict
    result = set_peft_model_state_dict(peft_model, pool.adapter_state_dict(weights), adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise RuntimeError(f"the assembled LoRA does not fit the peft model: unexpected {result.unexpected_keys[:3]}, "
                           f"missing {missing[:3]}")
