"""Saving adapters and other per-user outputs so that a killed run leaves a complete output or none.

Everything is first written into a hidden temporary directory beside the target and renamed into place,
so a target holds either the complete new files or the old ones.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import fail


def _staging_dir(target: Path) -> Path:
    from .data import _umask
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(staging, 0o777 & ~_umask())   # mkdtemp makes 0700; published dirs follow the umask
    return staging


def publish_dir(staging: Path, target: Path) -> None:
    """Publish a finished staging dir as ``target``.

    A new target is one rename. An existing target (e.g. the task LoRA dir, which also holds predictions and
    logs) keeps its other files; the staged files replace theirs one by one. A directory counts as a complete
    adapter only while both the weights and the config are there, so the old config goes first and the new
    one comes last: a failure in between leaves an incomplete adapter (redone by the next run), never new
    weights under the old config.
    """
    if not target.exists():
        staging.rename(target)
        return
    if (staging / "adapter_config.json").exists():
        (target / "adapter_config.json").unlink(missing_ok=True)
    for f in sorted(staging.iterdir(), key=lambda p: p.name == "adapter_config.json"):
        os.replace(f, target / f.name)
    staging.rmdir()


def write_dir_atomic(target, write) -> Path:
    """Call ``write(staging_dir)`` and publish the directory as ``target``; on any error nothing is published.

    Errors of the disk (full, read-only) become a clear message; outputs written earlier are left intact.
    """
    target = Path(target)
    try:
        staging = _staging_dir(target)
    except OSError as err:
        fail(f"cannot write into {target.parent}: {err.strerror or err}")
    existed = target.exists()
    try:
        write(staging)
        publish_dir(staging, target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        half_replaced = existed and (target / "adapter_model.safetensors").exists() and not is_complete_adapter(target)
        kept = (f"the adapter in {target} is incomplete now and will be redone by the next run" if half_replaced
                else "earlier outputs are intact")
        fail(f"could not save {target}: {err.strerror or err}; {kept}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_peft_adapter(peft_model, target, extra_json: dict | None = None) -> Path:
    """Save a peft adapter (adapter_config.json + adapter_model.safetensors), verified, atomically; ``extra_json``
    ({file name: object}) is published with it (e.g. source.json: what it was trained on)."""
    from .modeling import verify_adapter

    def write(staging: Path) -> None:
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        sort_target_modules(staging / "adapter_config.json")
        verify_adapter(staging, peft_model)
        for name, obj in (extra_json or {}).items():
            (staging / name).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    return write_dir_atomic(target, write)


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


def load_adapter_weights(peft_model, adapter_dir) -> None:
    """Load a saved adapter's tensors into a peft model built with the same config, strictly: peft's own load
    skips keys it does not know and keeps the fresh init of keys the file lacks, which would half-load an
    adapter saved with other target modules or rank."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    path = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        saved = load_file(str(path))
    except Exception as err:   # safetensors raises its own error types for a corrupt header
        fail(f"{path}: cannot read the adapter ({err}); delete {adapter_dir} to train it again")
    expected = get_peft_model_state_dict(peft_model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(saved) & set(expected) if tuple(saved[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                    (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", shapes))
                    if v]
        fail(f"{path} does not fit this run's LoRA (--lora_r, --target_modules): {'; '.join(problems)}; delete "
             f"{adapter_dir} or pass --overwrite to train it again")
    set_peft_model_state_dict(peft_model, saved)
