"""Saving adapters and other per-user outputs so that a killed run leaves a complete output or none.

Everything is first written into a hidden temporary directory beside the target and renamed into place:
the existence of the target directory means it is complete.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .errors import fail


def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))


def publish_dir(staging: Path, target: Path) -> None:
    """Move a finished staging dir to ``target``, replacing an older one only once the new one is complete."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dir_atomic(target, write) -> Path:
    """Call ``write(staging_dir)`` and publish the directory as ``target``; on any error nothing is published.

    Errors of the disk (full, read-only) become a clear message; outputs written earlier are left intact.
    """
    target = Path(target)
    try:
        staging = _staging_dir(target)
    except OSError as err:
        fail(f"cannot write into {target.parent}: {err.strerror or err}")
    try:
        write(staging)
        publish_dir(staging, target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        fail(f"could not save {target}: {err.strerror or err}; earlier outputs are intact")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_peft_adapter(peft_model, target) -> Path:
    """Save a peft adapter (adapter_config.json + adapter_model.safetensors), verified, atomically."""
    from .modeling import verify_adapter

    def write(staging: Path) -> None:
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        verify_adapter(staging, peft_model)

    return write_dir_atomic(target, write)


def is_complete_adapter(path) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def load_adapter_weights(peft_model, adapter_dir) -> None:
    """Load a saved adapter's tensors into a peft model built with the same config."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    set_peft_model_state_dict(peft_model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
