"""What the code assumes about a model architecture, in one table: the LoRA's default target modules, how a module
path names its layer, and the linear layer the pieces wrap.

Only the Llama family is supported (SmolLM2, Llama-2 and Meta downloads converted to it): its attention
projections are ``nn.Linear`` modules named ``model.layers.<i>.self_attn.{q,k,v,o}_proj``. Another family needs a
row here and a test that runs stages 3-5 on a tiny random model of it (tests/test_families.py); until then a model
of another type is refused when it loads, before any training, with the supported types named. GPT-2's attention
is a transformers ``Conv1D`` (weight stored in x out, not out x in) under one fused ``c_attn``: the pieces, the
gates and the composer assume ``nn.Linear``, so it is refused rather than silently mis-assembled.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from perpcs.errors import fail


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple          # transformers' config.model_type values of the family
    target_modules: tuple       # the LoRA's default modules (docs/method.md section 5: q/k/v/o)
    oppu_modules: tuple         # the OPPU release's default: query and value only
    layer_pattern: str          # a regex on a module path; group 1 is the layer index
    linear: str                 # the class the targeted modules are ("torch.nn.Linear": weight out x in)

    def layer_index(self, module_path: str) -> int | None:
        m = re.search(self.layer_pattern, module_path)
        return int(m.group(1)) if m else None


LLAMA = Family(name="llama", model_types=("llama",), target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
               oppu_modules=("q_proj", "v_proj"), layer_pattern=r"(?:^|\.)layers\.(\d+)\.", linear="torch.nn.Linear")

FAMILIES = (LLAMA,)
DEFAULT_FAMILY = LLAMA


def supported_types() -> str:
    return ", ".join(f"{t} ({f.name} family)" for f in FAMILIES for t in f.model_types)


def family_of(model_type: str | None, where: str = "the model") -> Family:
    """The family of a transformers model type, else a clear refusal naming the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    fail(f"{where} is of model type {model_type!r}, which Per-Pcs does not support: the supported model types are "
         f"{supported_types()} (perpcs/models/families.py says what another family would need)")


def family_of_dir(model_dir) -> Family:
    """The family of a Hugging Face model directory, read from its config.json before any weight loads."""
    config_file = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    return family_of(model_type, where=f"model {model_dir}")


def layer_index(module_path: str) -> int | None:
    """The layer of a piece such as ``model.layers.3.self_attn.q_proj`` (3), None if no family's pattern names it."""
    for family in FAMILIES:
        index = family.layer_index(module_path)
        if index is not None:
            return index
    return None
