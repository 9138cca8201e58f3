"""Per-piece gates on top of a peft LoRA (SPEC section 6).

Each LoRA module ("piece") owns a gate vector g (d_in, initialised 0). While gates train, the LoRA branch's
input is rescaled token by token, x <- x * sigmoid(x . g); the frozen base branch sees x unchanged.
peft computes the LoRA branch as ``lora_B(lora_A(lora_dropout(x)))``, so the gate sits in the dropout slot:
it sees exactly the LoRA branch's input and nothing else. Gates are only used to score pieces in composition.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from perpcs.errors import fail
from perpcs.models.lora import read_safetensors

GATES_FILE = "gates.safetensors"


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
