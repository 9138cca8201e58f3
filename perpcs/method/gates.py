"""The gate, whole (docs/method.md section 6 trains it, section 7 scores with it): every gate computation is
here, so changing the gate is changing this file.

Each LoRA module ("piece") owns a gate vector g (d_in, initialised 0). The gate has three faces:

1. Training form (stage 4): while gates train, the LoRA branch's input is rescaled token by token,
   x <- x * sigmoid(x . g); the frozen base branch sees x unchanged. peft computes the LoRA branch as
   ``lora_B(lora_A(lora_dropout(x)))``, so the gate sits in the dropout slot: it sees exactly the LoRA branch's
   input and nothing else (GatedInput, install_gates, remove_gates, save_gates).
2. Stacking for assembly (stage 5): every sharer's gate of a piece, read and checked (load_sharer_gates), stacked
   into one (S, d_in) matrix and LayerNorm-ed once per process (normalised_gates).
3. Score at assembly (stage 5): sharer s's score at a piece is LN(x_t) . LN(g_s) / sqrt(d), averaged over the
   answer-predicting positions t of each example, then over the batch's examples (answer_predicting_mask,
   answer_positions, gate_summary, summary_scores, gate_scores).
Gates are only used to score pieces in composition; they never enter a predicting model.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from perpcs.errors import fail
from perpcs.models.lora import read_safetensors

GATES_FILE = "gates.safetensors"
LN_EPS = 1e-5   # the LayerNorm epsilon of both sides of the score (torch's default)


# ---- 1. training form (stage 4) -------------------------------------------------------------------------

class GatedInput(nn.Module):
    """Replaces a LoRA module's dropout: dropout(x) * sigmoid(x . g), the gate computed from the clean x."""

    def __init__(self, d_in: int, dropout: nn.Module):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(d_in))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.sigmoid(x @ self.gate.to(x.dtype)).unsqueeze(-1)
        return self.dropout(x) * weight


def piece_name(module_path: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj'."""
    prefix = "base_model.model."
    return module_path[len(prefix):] if module_path.startswith(prefix) else module_path


def lora_modules(peft_model, adapter_name: str = "default") -> dict:
    """{piece name: peft LoRA Linear} in model order."""
    from peft.tuners.lora import LoraLayer
    return {piece_name(name): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A}


def install_gates(peft_model, adapter_name: str = "default") -> dict:
    """Freeze everything, put a trainable zero gate into every LoRA module; returns {piece: GatedInput}."""
    for p in peft_model.parameters():
        p.requires_grad_(False)
    gates = {}
    for name, module in lora_modules(peft_model, adapter_name).items():
        slot = module.lora_dropout[adapter_name]
        if isinstance(slot, GatedInput):
            slot = slot.dropout
        gated = GatedInput(module.lora_A[adapter_name].in_features, slot).to(
            module.lora_A[adapter_name].weight.device)
        module.lora_dropout[adapter_name] = gated
        gates[name] = gated
    if not gates:
        fail("the model has no LoRA modules to gate")
    return gates


def remove_gates(peft_model, adapter_name: str = "default") -> None:
    for module in lora_modules(peft_model, adapter_name).values():
        slot = module.lora_dropout[adapter_name]
        if isinstance(slot, GatedInput):
            module.lora_dropout[adapter_name] = slot.dropout


def gate_state(gates: dict) -> dict:
    return {name: g.gate.detach().float().cpu().contiguous() for name, g in gates.items()}


def save_gates(gates: dict, path) -> None:
    # one metadata entry: safetensors writes a dict's entries in no fixed order, and files must be reproducible
    save_file(gate_state(gates), str(path), metadata={"format": "perpcs-gates"})


# ---- 2. stacking for assembly (stage 5) --------------------------------------------------------------------

def load_gates(path, expected=None, who: str = "") -> dict:
    """{piece: gate vector} of a gates file. ``expected`` ({piece: input width of its LoRA module}): the gates must
    be exactly these pieces, each a vector as long as its module's input (d_in of lora_A), else the file is named."""
    path = Path(path)
    if not path.is_file():
        fail(f"gates not found for {who or 'sharer'}: {path} (run train_anchor_gate.py)")
    gates = read_safetensors(path, "gates")
    if expected is not None:
        missing = [p for p in expected if p not in gates]
        if missing:
            fail(f"{path}: gates of {who or 'sharer'} miss {len(missing)} pieces, e.g. {missing[:3]} (trained on "
                 f"another sharer LoRA? run train_anchor_gate.py again)")
        extra = sorted(p for p in gates if p not in expected)
        if extra:
            fail(f"{path}: gates of {who or 'sharer'} for {len(extra)} pieces its LoRA does not have, e.g. "
                 f"{extra[:3]} (trained on another sharer LoRA? run train_anchor_gate.py again)")
        for piece, d_in in expected.items():
            if tuple(gates[piece].shape) != (d_in,):
                fail(f"{path}: the gate of piece {piece} has shape {tuple(gates[piece].shape)}, its LoRA module's "
                     f"input is {d_in} wide (trained on another sharer LoRA? run train_anchor_gate.py again)")
    return gates


def load_sharer_gates(gate_dir, sharer_ids: list, widths: dict) -> list:
    """Every sharer's {piece: gate} from ``gate_dir``/user_<id>/gates.safetensors, in ``sharer_ids`` order, each
    checked against ``widths`` ({piece: d_in of its LoRA module}) before anything is stacked."""
    return [load_gates(Path(gate_dir) / f"user_{uid}" / GATES_FILE, widths, f"sharer {uid!r}") for uid in sharer_ids]


def normalised_gates(sharer_gates: list, piece: str) -> torch.Tensor:
    """(S, d_in) fp32: the sharers' gates of ``piece`` stacked in pool order, each LayerNorm-ed (no affine): the
    gate side of the score, computed once per process."""
    g = torch.stack([gs[piece].float() for gs in sharer_gates])   # (S, d_in): load_gates checked each width
    return F.layer_norm(g, (g.shape[1],), eps=LN_EPS)


# ---- 3. score at assembly (stage 5) ------------------------------------------------------------------------

def answer_predicting_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token (labels shifted by one) is an answer token: the positions that score."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def answer_positions(mask: torch.Tensor, batch_rows: int | None = None) -> tuple:
    """(rows, cols, weight of each position) of ``mask``, shared by every piece of one forward.

    The batch mean of per-example means is one weighted sum over the positions, weight 1 / (examples x
    the example's positions): a matrix product, deterministic on GPUs (index_add_ is not). ``batch_rows``: the
    examples of the whole batch when ``mask`` holds only some of them (a micro-batch, method/composition.py)."""
    rows, cols = mask.nonzero(as_tuple=True)
    counts = mask.sum(dim=1).clamp(min=1).float()
    return rows, cols, 1.0 / (counts[rows] * (batch_rows or mask.shape[0]))


def gate_summary(x: torch.Tensor, positions: tuple) -> torch.Tensor:
    """(d,) fp32: the weighted sum over answer-predicting positions of LayerNorm(x_t), the input side of the score
    (a sum: micro-batches of one batch add theirs). ``x`` is the piece's input (batch, T, d), ``positions`` from
    answer_positions."""
    rows, cols, weights = positions
    return weights @ F.layer_norm(x[rows, cols].float(), (x.shape[-1],), eps=LN_EPS)   # (N,) @ (N, d)


def summary_scores(summary: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(S,) every sharer's score from a batch's gate_summary: one product with the stacked normalised gates."""
    return (summary @ gates.T) / math.sqrt(summary.shape[-1])


def gate_scores(x: torch.Tensor, positions: tuple, gates: torch.Tensor) -> torch.Tensor:
    """(S,) score of every sharer at one piece: batch mean of the per-example mean over answer-predicting
    positions of LayerNorm(x_t) . LayerNorm(g_s) / sqrt(d), in fp32. ``x`` is the piece's input (batch, T, d),
    ``positions`` from answer_positions, ``gates`` from normalised_gates."""
    return summary_scores(gate_summary(x, positions), gates)
