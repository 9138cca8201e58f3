"""LoRA adapters in the peft format: the config every stage uses, finding and checking adapter
files, saving them atomically, loading them strictly, and merging the task LoRA.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from perpcs.atomic import write_dir_atomic
from perpcs.errors import fail
from perpcs.models.families import DEFAULT_FAMILY

# ---------------------------------------------------------------- LoRA adapters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(r: int = 8, alpha: int = 8, dropout: float = 0.05, target_modules=DEFAULT_FAMILY.target_modules):
    """The LoRA of every stage (docs/method.md section 5): A Kaiming-uniform, B zeros, no bias."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      task_type="CAUSAL_LM", bias="none", init_lora_weights=True)


def resolve_lora_ckpt(path) -> Path:
    """A PEFT adapter directory, given as the directory or as the seed's ``.../lora_ckpt.pt`` inside it."""
    path = Path(path).expanduser()
    if path.is_dir():
        adapter_dir = path
    elif path.suffix == ".pt":
        adapter_dir = path.parent
    else:
        # Only the .pt spelling falls back to the parent: a typo (adapter/tpyo) must not load the parent.
        fail(f"LoRA checkpoint {path}: {'not a directory' if path.exists() else 'not found'}; expected a PEFT "
             f"adapter directory holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (or a path .../lora_ckpt.pt "
             f"whose directory holds them)")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        fail(f"LoRA checkpoint {path}: expected a PEFT adapter directory holding {ADAPTER_CONFIG} and "
             f"{ADAPTER_WEIGHTS} (or a path .../lora_ckpt.pt whose directory holds them)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        fail(f"LoRA checkpoint {adapter_dir}: {ADAPTER_CONFIG} found but {ADAPTER_WEIGHTS} is missing")
    return adapter_dir


def read_safetensors(path, what: str = "safetensors file") -> dict:
    """{name: tensor} of a safetensors file; a missing, truncated or otherwise unreadable file is a user error
    naming the file (safetensors raises its own error types, which would end in a traceback)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        fail(f"{path}: {what} not found")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: a damaged file is the user's to fix
        fail(f"{path}: not a readable safetensors file, truncated or damaged ({err}); delete it to make it again")


def adapter_tensor_names(adapter_dir) -> list:
    """The tensor names of an adapter's weights; reading the header also catches a truncated file (safetensors
    checks the header's offsets against the file's size)."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file() or weights.stat().st_size == 0:
        fail(f"{weights}: missing or empty")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return sorted(f.keys())
    except Exception as err:  # noqa: BLE001 - a corrupt file is the user's problem
        fail(f"{weights}: not a readable safetensors file, truncated or damaged ({err})")


def check_adapter_files(adapter_dir) -> None:
    """Fail naming the file unless the adapter's config parses as a JSON object and its weights' header reads:
    stages check every adapter they will load (with peft, whose errors are tracebacks) before writing anything."""
    config = _adapter_config(adapter_dir)
    if not isinstance(config, dict):
        fail(f"{Path(adapter_dir) / ADAPTER_CONFIG}: expected a JSON object")
    adapter_tensor_names(adapter_dir)


def _adapter_config(adapter_dir) -> dict:
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:   # ValueError: malformed JSON or not UTF-8
        fail(f"{config_file}: missing or malformed ({err})")


def targeted_module_names(model, target_modules) -> list:
    """Names (as in the plain transformers model) of the Linear modules a LoRA config targets.

    As PEFT: a string is a regex on the full name; a list entry matches the full name or a dotted suffix
    of it ("q_proj" and "self_attn.q_proj" both match "model.layers.0.self_attn.q_proj").
    """
    import re

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = []
    for name, module in base.named_modules():
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit and hasattr(module, "in_features"):
            names.append(name)
    return names


def _lora_key(module_name: str, which: str) -> str:
    return f"base_model.model.{module_name}.{which}.weight"


def verify_adapter(adapter_dir, model_or_peft_model) -> None:
    """Fail unless the saved adapter holds lora_A and lora_B for every targeted module of every layer."""
    names = set(adapter_tensor_names(adapter_dir))
    targets = _adapter_config(adapter_dir).get("target_modules")
    modules = targeted_module_names(model_or_peft_model, targets or ())
    if not modules:
        fail(f"{adapter_dir}: target_modules {targets!r} match no module of the model")
    missing = [_lora_key(m, w) for m in modules for w in ("lora_A", "lora_B") if _lora_key(m, w) not in names]
    if missing:
        fail(f"{Path(adapter_dir) / ADAPTER_WEIGHTS}: {len(missing)} LoRA tensors missing, "
             f"e.g. {', '.join(missing[:3])}")


def _check_adapter_fits(adapter_dir, model) -> None:
    from safetensors import safe_open

    # adapter_tensor_names first: it turns an empty or corrupt file into an error naming the file.
    keys = adapter_tensor_names(adapter_dir)
    modules = dict(model.named_modules())
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    with safe_open(str(weights), framework="pt") as f:
        for key in keys:
            for which, dim, feature in (("lora_A", 1, "in_features"), ("lora_B", 0, "out_features")):
                suffix = f".{which}.weight"
                if not key.endswith(suffix):
                    continue
                module_name = key.removeprefix("base_model.model.").removesuffix(suffix)
                module = modules.get(module_name)
                if module is None or not hasattr(module, feature):
                    fail(f"{weights}: tensor {key} targets {module_name}, which this model does not have "
                         f"(an adapter for another base model?)")
                size = f.get_slice(key).get_shape()[dim]
                if size != getattr(module, feature):
                    fail(f"{weights}: tensor {key} has {feature} {size}, the model's {module_name} has "
                         f"{getattr(module, feature)} (an adapter for another base model?)")


# peft's PeftModel.__init__ (behind every get_peft_model / PeftModel.from_pretrained of ours) probes
# ``model.is_gradient_checkpointing``, a property transformers 5 deprecated (FutureWarning on every model stage).
# None of our arguments avoids the probe, and the property is read-only on the model; so this one message, from
# that one module, is ignored (every other warning still shows). Training sets checkpointing itself
# (engine/training.py), so what the probe returns changes nothing here.
PEFT_PROBE_WARNING = r"`is_gradient_checkpointing` is deprecated"


def ignore_peft_checkpointing_probe() -> None:
    """Install the filter above (idempotent: filterwarnings replaces an identical entry)."""
    warnings.filterwarnings("ignore", message=PEFT_PROBE_WARNING, category=FutureWarning,
                            module="transformers.modeling_utils")


def merge_lora_into_base(model, adapter_dir):
    """Load a PEFT adapter onto ``model``, merge it into the weights and return the plain model."""
    from peft import PeftModel
    ignore_peft_checkpointing_probe()

    adapter_dir = resolve_lora_ckpt(adapter_dir)
    _check_adapter_fits(adapter_dir, model)
    verify_adapter(adapter_dir, model)
    base_name = _adapter_config(adapter_dir).get("base_model_name_or_path")
    model_name = getattr(model.config, "_name_or_path", None)
    if base_name and model_name and Path(str(base_name)).name != Path(str(model_name)).name:
        warnings.warn(f"{adapter_dir} was trained on {base_name}, merging into {model_name} "
                      "(shapes fit; paths may just differ between machines)", stacklevel=2)
    # torch_device: by default PEFT puts the adapter on the current CUDA device, not necessarily the model's.
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False,
                                           torch_device=str(next(model.parameters()).device))
    return peft_model.merge_and_unload()


def save_peft_adapter(peft_model, target, extra_json: dict | None = None) -> Path:
    """Save a peft adapter (adapter_config.json + adapter_model.safetensors), verified, atomically; ``extra_json``
    ({file name: object}) is published with it (e.g. source.json: what it was trained on)."""

    def write(staging: Path) -> None:
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        sort_target_modules(staging / "adapter_config.json")
        verify_adapter(staging, peft_model)
        for name, obj in (extra_json or {}).items():
            (staging / name).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    return write_dir_atomic(target, write, half_done=lambda d: (d / ADAPTER_WEIGHTS).exists()
                            and not is_complete_adapter(d))


def sort_target_modules(config_file: Path) -> None:
    """peft writes target_modules from a set, in string-hash order, which differs from process to process;
    sorted, the same adapter gives the same bytes whichever process saved it (peft's own layout otherwise)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def is_complete_adapter(path) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def load_adapter_weights(peft_model, adapter_dir, adapter_name: str = "default") -> None:
    """Load a saved adapter's tensors into a peft model built with the same config (into its adapter
    ``adapter_name``), strictly: peft's own load skips keys it does not know and keeps the fresh init of keys the
    file lacks, which would half-load an adapter saved with other target modules or rank."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    saved = read_safetensors(path, "adapter weights")
    expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(saved) & set(expected) if tuple(saved[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                    (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", shapes))
                    if v]
        fail(f"{path} does not fit this run's LoRA (--lora_r, --target_modules): {'; '.join(problems)}; delete "
             f"{adapter_dir} or pass --overwrite to train it again")
    set_peft_model_state_dict(peft_model, saved, adapter_name=adapter_name)
