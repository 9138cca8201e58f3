"""``python -m perpcs export``: a task's outputs as a folder that serves on its own.

    D/base/                          the base model with the task LoRA merged (safetensors, the model's dtype,
                                     tokenizer included): AutoModelForCausalLM.from_pretrained("D/base")
    D/adapters/sharers/user_<id>/    stage 3's sharer LoRAs
    D/adapters/per-pcs/user_<id>/    every target user's assembled LoRA, materialized from its recipe
    D/adapters/oppu/user_<id>/       the OPPU baseline's adapters
    D/adapters/<kind>-leaderboard/   the same for LaMP's leaderboard questions (--test_split leaderboard)
    D/adapters/.../README.md         each adapter's model card
    D/export.json                    what the export was made from (digests), and its adapters
    D/serve.sh                       the vLLM command for these adapters and one request per user

Every adapter sits on base + task LoRA, so its ``base_model_name_or_path`` is D/base as an absolute path: peft's
AutoPeftModelForCausalLM passes that string to AutoModelForCausalLM.from_pretrained as is, and a relative one
(``./base``) resolves against the working directory, failing anywhere but in D ("Repo id must use alphanumeric
chars"). A moved export loads with PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("D/base"), adapter)
(docs/serving.md); servers that take the base on their command line (vLLM's --lora-modules) ignore the field.
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from perpcs.atomic import write_dir_atomic
from perpcs.data.layout import read_json
from perpcs.data.tasks import get_task
from perpcs.errors import fail
from perpcs.models.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_files, is_complete_adapter,
                                resolve_lora_ckpt)
from perpcs.models.provenance import SOURCE_FILE, base_model_fingerprint, read_source, training_sources
from perpcs.paths import (COMPOSITION, OPPU, OUTPUT_ROOT, SHARER_GATES, SHARER_LORAS, TASK_LORA, safe_id,
                          split_output_dir, user_file_name)
from perpcs.stages.manifest import MANIFEST_FILE
from perpcs.stages.serving import (make_base_portable, model_card, portable_adapter_config, serve_script,
                                   vllm_command)

BASE_DIR = "base"
KINDS = ("sharers", "per-pcs", "oppu", "per-pcs-leaderboard", "oppu-leaderboard")
MANIFEST = "export.json"
SERVE_SCRIPT = "serve.sh"


def _user_dirs(root: Path) -> list:
    return sorted(d for d in root.glob("user_*") if d.is_dir()) if root.is_dir() else []


def _named_user(path: Path, suffix: str = "") -> str:
    """The user id in a ``user_<id><suffix>`` name; the export names its own copies after it."""
    return safe_id(path.name.removeprefix("user_").removesuffix(suffix), f"{path}: user id")


def export_sources(output_root: Path) -> dict:
    """{kind: [(user id, what to export, the file recording what it was made from, recorded sources)]}; every
    adapter's files are checked readable here, before the export writes anything."""
    found = {kind: [] for kind in KINDS}
    for d in _user_dirs(output_root / SHARER_LORAS):
        if is_complete_adapter(d):
            check_adapter_files(d)
            found["sharers"].append((_named_user(d), d, d / SOURCE_FILE, read_source(d / SOURCE_FILE)))
    for suffix, split in (("", "test"), ("-leaderboard", "leaderboard")):   # leaderboard: outputs in leaderboard/
        recipes = split_output_dir(output_root / COMPOSITION, split) / "recipes"
        for path in sorted(recipes.glob("user_*.json")) if recipes.is_dir() else []:
            recipe = read_json(path, "recipe")
            if not isinstance(recipe, dict):
                fail(f"{path}: expected a JSON object (a Per-Pcs recipe)")
            found["per-pcs" + suffix].append((_named_user(path, ".json"), path, path, recipe.get("inputs")))
        for d in _user_dirs(split_output_dir(output_root / OPPU, split) / "adapters"):
            if is_complete_adapter(d):
                check_adapter_files(d)
                found["oppu" + suffix].append((_named_user(d), d, d / SOURCE_FILE, read_source(d / SOURCE_FILE)))
    return found


def find_base_model(model_path, task_lora: Path, found: dict):
    """The base model the outputs were made from: ``model_path`` if given, else the path the task LoRA's
    adapter_config.json names or the bundled SmolLM2, whichever has the fingerprint the outputs record."""
    if model_path is not None:
        return model_path
    recorded = next((src["base_model"] for rows in found.values() for *_, src in rows
                     if isinstance(src, dict) and "base_model" in src), None)
    named = _config(task_lora / ADAPTER_CONFIG).get("base_model_name_or_path")
    local = named if named and Path(str(named)).expanduser().is_dir() else None
    if recorded is None:   # nothing beyond stage 1: the task LoRA's own record of its base is all there is
        if local:
            return local
        fail(f"{task_lora / ADAPTER_CONFIG} names the base model {named!r}, which is not on this machine, and no "
             f"later stage recorded one: pass --llama_model_path")
    # the path the task LoRA names first (no conversion), then the bundled model
    for candidate in ([local] if local else []) + ["smollm2"]:
        if base_model_fingerprint(candidate) == recorded:
            return candidate
    fail(f"the outputs under {task_lora.parent} were made from a base model other than "
         f"{' and '.join(map(str, filter(None, [local, 'the bundled smollm2'])))} (fingerprint {recorded[:12]}...): "
         f"pass --llama_model_path")


def check_sources(found: dict, wanted: dict, gate_dir: Path) -> None:
    """Refuse an output made from another base model or task LoRA than the export's (or with no record of it)."""
    for kind, rows in found.items():
        for uid, _, record, had in rows:
            if not isinstance(had, dict) or any(k not in had for k in wanted):
                fail(f"{record} records no base model and task LoRA (made by an older version?): the {kind} "
                     f"adapter of user {uid} cannot be exported as sitting on this base; redo that stage")
            changed = [k for k in wanted if had[k] != wanted[k]]
            if changed:
                fail(f"{record}: the {kind} adapter of user {uid} was made from another "
                     f"{' and '.join(k.replace('_sha256', '').replace('_', ' ') for k in changed)} than the one "
                     f"exported ({', '.join(f'{k} {had[k][:12]}... != {wanted[k][:12]}...' for k in changed)}); "
                     f"pass the --llama_model_path it was made from, or redo that stage")
    if (found["per-pcs"] or found["per-pcs-leaderboard"]) and gate_dir.is_dir():
        _check_recipes_fit_sharers(found, gate_dir)


def _check_recipes_fit_sharers(found: dict, gate_dir: Path) -> None:
    """A recipe weighs the sharer LoRAs it was assembled from: refuse it if they were trained again since (the
    recipe records each sharer adapter's and gates' digest) or if their gates were trained on other LoRAs."""
    from perpcs.models.provenance import adapter_sha256, file_sha256
    sharer_dirs = {uid: d for uid, d, *_ in found["sharers"]}
    for uid, path, _, inputs in found["per-pcs"] + found["per-pcs-leaderboard"]:
        sharers = [safe_id(s, f"{path}: sharer") for s in read_json(path, "recipe").get("sharers", [])]
        mixed = inputs.get("sharer_adapters") if isinstance(inputs, dict) else None
        if not isinstance(mixed, dict) or not isinstance(inputs.get("gates"), dict):
            fail(f"{path} records no digests of the sharer LoRAs and gates it mixed (made by an older version?): "
                 f"redo stage 5")
        for sid in sharers:
            gate_file = gate_dir / user_file_name(sid) / "gates.safetensors"
            if not gate_file.is_file() or sid not in sharer_dirs:
                fail(f"{path} uses sharer {sid}, whose {'LoRA' if sid not in sharer_dirs else 'gates'} "
                     f"{'is' if sid not in sharer_dirs else 'are'} missing under {gate_dir.parent}")
            if mixed.get(sid) != adapter_sha256(sharer_dirs[sid]):
                fail(f"{path}: sharer {sid}'s LoRA was trained again after this recipe was assembled "
                     f"({sharer_dirs[sid]}); it no longer describes the adapter it was assembled as: redo stages 4 "
                     f"and 5")
            gate_source = read_source(gate_file.parent / SOURCE_FILE) or {}
            if gate_source.get("adapter_sha256") != adapter_sha256(sharer_dirs[sid]):
                fail(f"{path}: sharer {sid}'s LoRA was trained again after its gates ({gate_file.parent / SOURCE_FILE}"
                     f"); this recipe no longer describes the adapter it was assembled as: redo stages 4 and 5")
            if inputs["gates"].get(sid) != file_sha256(gate_file):
                fail(f"{path} was assembled with other gates than {gate_file}: redo stage 5")


def export_task(task_name: str, output_dir, output_root=None, model_path=None) -> Path:
    """Write the export folder (see the module docstring); returns it. The whole folder is published at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perpcs.method.recipes import materialize
    from perpcs.models.loading import resolve_model_dir
    from perpcs.models.lora import merge_lora_into_base

    task = get_task(task_name)
    root = Path(output_root) if output_root is not None else OUTPUT_ROOT / task.name
    task_lora_path = root / TASK_LORA
    if not (task_lora_path / ADAPTER_WEIGHTS).is_file():
        fail(f"{task_lora_path}: no task LoRA ({ADAPTER_WEIGHTS}); run stage 1 (task_LoRA.py --task_name "
             f"{task.name}) first, or pass the --output_root that holds {TASK_LORA}/")
    task_lora = resolve_lora_ckpt(task_lora_path)
    target = Path(output_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        fail(f"--output_dir {target} exists and is not empty: pass a new directory")
    found = export_sources(root)
    model_path = find_base_model(model_path, task_lora, found)
    wanted = training_sources(model_path, task_lora)
    check_sources(found, wanted, root / SHARER_GATES)
    model_dir = resolve_model_dir(model_path)

    def write(staging: Path) -> None:
        # the model's own dtype (config.json), on the CPU: the merged weights are what the stages compute
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", device_map={"": "cpu"})
        model = merge_lora_into_base(model, task_lora)
        model.save_pretrained(staging / BASE_DIR, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(staging / BASE_DIR)
        make_base_portable(staging / BASE_DIR)
        del model
        manifest = {"task": task.name, "base": BASE_DIR, "base_model_path": str(model_path), "output_root": str(root),
                    **wanted, "adapters": {kind: {} for kind in KINDS}}
        # the absolute path of the published folder (staging is renamed to target): loadable from anywhere
        base_ref = str(target.resolve() / BASE_DIR)
        for kind, rows in found.items():
            for uid, src, record, _ in rows:
                rel = Path("adapters") / kind / user_file_name(uid)
                out = staging / rel
                if kind.startswith("per-pcs"):   # the recipe is the record; its adapter is rebuilt from the sharers
                    materialize(src, root / SHARER_LORAS, out)
                else:
                    out.mkdir(parents=True)
                    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                        shutil.copyfile(src / name, out / name)
                entry = {"from": record.relative_to(root).as_posix(), "path": rel.as_posix(), "r": _rank(out),
                         "peft_version": _config(out / ADAPTER_CONFIG).get("peft_version")}
                preds = _predictions_of(src, kind, uid, root)
                if preds is not None:
                    entry["predictions"] = preds
                point_at_base(out / ADAPTER_CONFIG, base_ref)
                manifest["adapters"][kind][uid] = entry
                (out / "README.md").write_text(model_card(kind, uid, entry, manifest, _settings_of(src, kind)),
                                               encoding="utf-8")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        (staging / SERVE_SCRIPT).write_text(serve_script(manifest, task.max_gen_len), encoding="utf-8")
        written.append(manifest)

    written: list = []
    write_dir_atomic(target, write)
    counts = ", ".join(f"{len(rows)} {kind}" for kind, rows in found.items())
    print(f"exported {task.name} to {target}: {BASE_DIR}/ (base model {model_path} + task LoRA merged) and adapters "
          f"({counts}). Serve them with vLLM from {target} ({SERVE_SCRIPT} also holds a request per user):\n"
          f"  {shlex.join(vllm_command(written[0]))}")
    return target


def _config(config_file: Path) -> dict:
    config = read_json(config_file, "adapter config")
    if not isinstance(config, dict):
        fail(f"{config_file}: expected a JSON object (a peft adapter config)")
    return config


def point_at_base(config_file: Path, base_ref: str) -> None:
    """Name the export's base; leave out the keys peft 0.17 would warn about (perpcs/stages/serving.py)."""
    config = portable_adapter_config(_config(config_file))
    config["base_model_name_or_path"] = base_ref
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _predictions_of(src: Path, kind: str, uid: str, root: Path):
    """The stage's prediction file of this user (relative to the output root), or None (sharers predict nothing)."""
    if kind == "sharers":
        return None
    stage_dir = src.parent.parent   # recipes/user_<id>.json and adapters/user_<id>/ sit in the stage's folder
    path = stage_dir / "user_predictions" / user_file_name(uid, ".json")
    return path.relative_to(root).as_posix() if path.is_file() else None


def _settings_of(src: Path, kind: str):
    """The recipe's settings (Per-Pcs), else the training run's (the stage folder's run manifest), if recorded."""
    if kind.startswith("per-pcs"):
        recipe = read_json(src, "recipe")
        lora = {k: v for k, v in (recipe.get("lora") or {}).items() if k != "base_model_name_or_path"}   # the raw base
        return {"recipe": recipe.get("settings"), "lora": lora}
    # stage 3 writes it beside the sharers' folders, OPPU above adapters/ (leaderboard runs: in leaderboard/ or above)
    for folder in (src.parent, src.parent.parent, src.parent.parent.parent):
        if (folder / MANIFEST_FILE).is_file():
            record = read_json(folder / MANIFEST_FILE, "run manifest")
            return record.get("settings") if isinstance(record, dict) else None
    return None


def _rank(adapter_dir: Path) -> int:
    return int(_config(adapter_dir / ADAPTER_CONFIG)["r"])
