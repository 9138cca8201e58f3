"""Devices and dtypes: where a stage runs and in which precision.
"""
from __future__ import annotations

import contextlib
import os

import torch

from perpcs.errors import fail

# ---------------------------------------------------------------- devices and dtypes

def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; asking for CUDA on a machine without it is an error.

    Under torchrun (LOCAL_RANK set), 'auto' and a bare 'cuda' mean this process's own GPU, cuda:LOCAL_RANK,
    so that N processes on one machine use N GPUs instead of all sharing cuda:0.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            fail(f"LOCAL_RANK {local_rank}: this machine has only {torch.cuda.device_count()} GPU(s); start at "
                 f"most that many processes per machine (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r}: not a device name (use auto, cpu, cuda or cuda:N)")


def autocast_context(device, cpu_bf16: bool = False):
    """bf16 autocast on the CPU when asked (weights stay fp32); on CUDA the weights are already bf16."""
    device = torch.device(device)
    if device.type == "cpu" and cpu_bf16 and torch.amp.autocast_mode.is_autocast_available("cpu"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
