"""What an output was made from, recorded beside it, so that a resumed run never counts as done an output that
was made from another base model, task LoRA or sharer set (nothing reused that was made differently)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from perpcs.errors import fail

SOURCE_FILE = "source.json"   # beside a sharer LoRA (stage 3) or its gates (stage 4)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_model_fingerprint(model_path) -> str:
    """A digest of the resolved HF model directory's config.json and the names and sizes of its weight files.

    Reading 13 GB of weights at every resume would cost minutes, so a same-size weight swap under the same
    config goes unnoticed; any other model (another size, family, conversion or checkpoint) is caught. A model
    path that does not exist fails here, before anything is counted as done.
    """
    from perpcs.models.loading import resolve_model_dir
    model_dir = resolve_model_dir(model_path)
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for p in weights:
        digest.update(f"\n{p.name}:{p.stat().st_size}".encode())
    return digest.hexdigest()


def adapter_sha256(adapter_dir) -> str:
    return file_sha256(Path(adapter_dir) / "adapter_model.safetensors")


def training_sources(model_path, task_lora_dir) -> dict:
    """The inputs a per-user stage trains on besides the user's data: base model and the merged task LoRA. A model
    of a family these stages do not support is refused here, before any output is written."""
    from perpcs.models.families import family_of_dir
    from perpcs.models.loading import resolve_model_dir
    family_of_dir(resolve_model_dir(model_path))
    return {"base_model": base_model_fingerprint(model_path), "task_lora_sha256": adapter_sha256(task_lora_dir)}


def read_record(path, what: str, remedy: str) -> dict | None:
    """A JSON object recording what an output was made from (source.json, run_manifest.json), or None where there
    is none; one that does not parse or is no object is an error naming the file, ``what`` it is and the ``remedy``."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{path}: not valid JSON ({err}); {remedy}")
    if not isinstance(data, dict):
        fail(f"{path}: expected a JSON object of {what}; {remedy}")
    return data


def read_source(path) -> dict | None:
    """The recorded sources in ``path`` (a source.json), or None where there is none."""
    return read_record(path, "recorded sources", "delete it with its directory, or pass --overwrite")


REDO = "pass --overwrite to redo every user, or another --output_dir"


def refuse_other_sources(where, had: dict | None, wanted: dict, what: str, remedy: str = REDO) -> None:
    """An existing output whose recorded sources are missing or differ is not this run's: stop and say how to
    proceed (the output is kept: it may be the only copy of hours of training). ``remedy``: the way out, where it
    is not to redo this stage's users (stage 5 reading stage 4's gates)."""
    if had is None or any(k not in had for k in wanted):
        fail(f"{where} has no record of the {' and '.join(_name(k) for k in wanted)} it was {what} on (made by an "
             f"older version, or copied without its {SOURCE_FILE}): it cannot be counted as this run's; {remedy}")
    changed = sorted(k for k in wanted if had[k] != wanted[k])
    if changed:
        fail(f"{where} was {what} on another {' and '.join(_name(k) for k in changed)} than this run's "
             f"({', '.join(f'{k} {str(had[k])[:12]}... -> {str(wanted[k])[:12]}...' for k in changed)}); {remedy}")


def _name(key: str) -> str:
    return key.replace("_sha256", "").replace("_", " ")
