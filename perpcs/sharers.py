"""Per-user training stages on base + merged task LoRA: sharer LoRAs (3), gates (4) and the OPPU baseline.

The base model is loaded and the task LoRA merged once per process; each user then gets a fresh peft
adapter on that same model, which is unloaded again (not merged) when the user is done.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .adapters import is_complete_adapter, load_adapter_weights, save_peft_adapter, write_dir_atomic
from .config import GenerationConfig, LoraSettings, OPPUStage, SharerGateStage, SharerLoRAStage, StageInputs
from .data import Layout, load_users, profile_text, read_json, user_id, write_json_atomic
from .errors import fail
from .gates import GATES_FILE, install_gates, remove_gates, save_gates
from .generation import predict_variants, write_variant_files
from .prompts import history_examples
from .provenance import SOURCE_FILE, adapter_sha256, read_source, refuse_other_sources, training_sources
from .runner import lazy, refuse_other_settings, run_per_user
from .tasks import get_task
from .training import train, user_seed
from .truncation import finish_per_user_stage, user_entry


def user_dir(root, uid: str) -> Path:
    return Path(root) / f"user_{uid}"


def default_dirs(task_name: str) -> dict:
    """The stages' default outputs (perpcs/paths.py) and stage 2's index."""
    from .paths import stage_dirs
    return {**stage_dirs(task_name), "anchor_idx": default_anchor_index(task_name)}


def default_anchor_index(task_name: str) -> Path:
    """Where stage 2 writes by default (anchored at the repo, as history_anchor.py runs from anywhere)."""
    from .anchors import INDEX_FILE, default_output_dir
    return default_output_dir(get_task(task_name)) / INDEX_FILE


PUBLISHED_INDEX_NAME = "anchor_user_idx.pt"   # the published stage 2's pickle; ours is anchor_user_idx.json


def resolve_anchor_index(path, task_name: str) -> Path:
    """Stage 2's index file. The published step 4 names ./anchor_selection/most_active/anchor_user_idx.pt, a
    file nothing writes: a missing file of that name (or of ours) resolves to the index stage 2 wrote, with one
    line saying so; any other missing path is an error naming the file stage 2 writes."""
    from .anchors import INDEX_FILE
    written = default_anchor_index(task_name)
    if path is None:
        return written
    path = Path(path)
    if path.is_file():
        return path
    sibling = path.with_name(INDEX_FILE)
    if path.name in (PUBLISHED_INDEX_NAME, INDEX_FILE):
        for found in (sibling, written):
            if found.is_file():
                print(f"note: --anchor_idx_path {path} does not exist (the published commands name a file their "
                      f"stage 2 never writes); using {found}, written by anchor_selection/history_anchor.py")
                return found
    fail(f"--anchor_idx_path {path}: no such file; stage 2 (anchor_selection/history_anchor.py --task_name "
         f"{task_name}) writes {written}" + ("" if written.is_file() else ", which does not exist yet either"))


def resolve_anchor_dir(path) -> Path:
    """The dir holding the sharers' user_<id>/ adapters. The published step 4 passes the parent Anchor_PEFT/ of
    the LoRA/ that step 3 wrote; output/<task>/ (holding Anchor_PEFT/LoRA/) is accepted too."""
    from .paths import SHARER_LORAS
    path = Path(path)
    if path.is_dir() and not any(path.glob("user_*")):
        for sub in ("LoRA", SHARER_LORAS):
            if (path / sub).is_dir():
                return path / sub
    return path


def load_sharers(anchor_idx_path, candidate_path, task) -> list:
    """[(user id, user record)] of the chosen sharers, from stage 2's index into the candidate file."""
    from .anchors import load_anchor_index
    candidates = load_users(candidate_path, task)
    index = load_anchor_index(anchor_idx_path, candidates)
    return [(str(uid), candidates[idx]) for idx, uid in zip(index["indices"], index["user_ids"])]


def task_lora_dir(inputs: StageInputs) -> Path:
    from .modeling import resolve_lora_ckpt
    return resolve_lora_ckpt(inputs.lora_ckpt or default_dirs(get_task(inputs.task_name).name)["task_lora"])


def load_merged_base(inputs: StageInputs):
    """Base LLM with the stage 1 task LoRA merged into its weights (every personal LoRA sits on top)."""
    from .modeling import load_base_model, merge_lora_into_base
    adapter = task_lora_dir(inputs)
    m = inputs.model
    model, tokenizer, device = load_base_model(m.llama_model_path, m.tokenizer_path, m.device, cpu_bf16=m.cpu_bf16)
    return merge_lora_into_base(model, adapter), tokenizer, device


def merged_base_sources(inputs: StageInputs) -> dict:
    """Digests of the base model and the task LoRA a per-user stage works on (checked before any user counts
    as done: a nonexistent --llama_model_path fails here, not after "all users done")."""
    return training_sources(inputs.model.llama_model_path, task_lora_dir(inputs))


def adapter_done(adapter_dir: Path, sources: dict, what: str) -> bool:
    """A complete adapter counts as done only if it was trained on this run's base model and task LoRA."""
    if not is_complete_adapter(adapter_dir):
        return False
    refuse_other_sources(adapter_dir, read_source(adapter_dir / SOURCE_FILE), sources, what)
    return True


def user_examples(task, user, profiles, profiles_path, index, users_path, recent_k=None):
    """A user's history examples (SPEC 4); the profile text only for tasks whose examples use it."""
    prof = profile_text(profiles, user, profiles_path, index) if task.uses_profile_in_history_training else None
    examples = history_examples(task, user["profile"], prof, recent_k=recent_k)
    if not examples:
        fail(f"{users_path}: user #{index} (user_id {user_id(user)!r}): empty history, nothing to train on")
    return examples


def fresh_lora(model, lora: LoraSettings, seed: int):
    """A new peft LoRA on the shared (base + task) model, its A init seeded per user."""
    from peft import get_peft_model
    from transformers import set_seed

    from .modeling import lora_config
    set_seed(seed)
    return get_peft_model(model, lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules))


def user_record(uid: str, examples: list, stats: dict, prompts: dict | None = None) -> dict:
    """What a per-user stage logs for a user (users_log.jsonl), with how many examples/prompts were shortened."""
    return {"examples": len(examples), "tokens": stats["tokens"], "last_loss": stats["last_loss"],
            "train_seconds": round(stats["seconds"], 3),
            "truncated": user_entry(uid, stats.get("truncated"), prompts)}


def profiles_if_needed(layout, task):
    return layout.load_profiles() if task.uses_profile_in_history_training else None


def train_sharer_loras(cfg: SharerLoRAStage) -> Path:
    """Stage 3: one LoRA per sharer on its own history."""
    task = get_task(cfg.inputs.task_name)
    layout = Layout(cfg.inputs.data_dir, task)
    dirs = default_dirs(task.name)
    out_root = Path(cfg.output_dir or dirs["anchor_peft"])
    sharers = load_sharers(resolve_anchor_index(cfg.anchor_idx_path, task.name), layout.candidate_users, task)
    profiles = profiles_if_needed(layout, task)
    examples = {uid: user_examples(task, u, profiles, layout.profiles, i, layout.candidate_users)
                for i, (uid, u) in enumerate(sharers)}
    num_shards, shard_id = cfg.shards.resolve()
    base_cfg = cfg.train
    sources = merged_base_sources(cfg.inputs)
    engine = lazy(lambda: load_merged_base(cfg.inputs))   # no model load when every sharer is done

    def work(uid, user):
        model, tokenizer, device = engine()
        seed = user_seed(base_cfg.seed, uid)
        peft_model = fresh_lora(model, cfg.lora, seed)
        try:
            stats = train(peft_model, tokenizer, examples[uid], replace(base_cfg, seed=seed), device,
                          desc=f"sharer {uid}", log_path=out_root / "train_log.jsonl")
            save_peft_adapter(peft_model, user_dir(out_root, uid), {SOURCE_FILE: sources})
        finally:
            peft_model.unload()
        return user_record(uid, examples[uid], stats)

    run_per_user(sharers, lambda uid: adapter_done(user_dir(out_root, uid), sources, "trained"), work,
                 "sharer LoRAs", out_root / "users_log.jsonl", num_shards, shard_id, cfg.shards.overwrite)
    finish_per_user_stage("sharer LoRAs", out_root, [uid for uid, _ in sharers])
    return out_root


def train_sharer_gates(cfg: SharerGateStage) -> Path:
    """Stage 4: one gate per piece of each (frozen) sharer LoRA, on the sharer's last recent_k items."""
    from peft import PeftModel
    task = get_task(cfg.inputs.task_name)
    layout = Layout(cfg.inputs.data_dir, task)
    dirs = default_dirs(task.name)
    anchor_dir = resolve_anchor_dir(cfg.anchor_path or dirs["anchor_peft"])
    out_root = Path(cfg.output_dir or dirs["anchor_gate"])
    if cfg.recent_k < 1:
        fail(f"--recent_k must be at least 1, got {cfg.recent_k}")
    sharers = load_sharers(resolve_anchor_index(cfg.anchor_idx_path, task.name), layout.candidate_users, task)
    for uid, _ in sharers:
        if not is_complete_adapter(user_dir(anchor_dir, uid)):
            fail(f"no sharer LoRA for user {uid!r} in {user_dir(anchor_dir, uid)} (run train_anchor_PEFT.py)")
    profiles = profiles_if_needed(layout, task)
    examples = {uid: user_examples(task, u, profiles, layout.profiles, i, layout.candidate_users, cfg.recent_k)
                for i, (uid, u) in enumerate(sharers)}
    num_shards, shard_id = cfg.shards.resolve()
    base_cfg = cfg.train
    sources = merged_base_sources(cfg.inputs)
    engine = lazy(lambda: load_merged_base(cfg.inputs))   # no model load when every sharer is done

    def work(uid, user):
        model, tokenizer, device = engine()
        seed = user_seed(base_cfg.seed, uid)
        peft_model = PeftModel.from_pretrained(model, str(user_dir(anchor_dir, uid)), is_trainable=False)
        try:
            gates = install_gates(peft_model)
            stats = train(peft_model, tokenizer, examples[uid], replace(base_cfg, seed=seed), device,
                          desc=f"gates {uid}", log_path=out_root / "train_log.jsonl")
            source = {**sources, "adapter_sha256": adapter_sha256(user_dir(anchor_dir, uid))}

            def write(d: Path) -> None:
                save_gates(gates, d / GATES_FILE)
                write_json_atomic(d / SOURCE_FILE, source)

            write_dir_atomic(user_dir(out_root, uid), write)
            remove_gates(peft_model)
        finally:
            peft_model.unload()
        return user_record(uid, examples[uid], stats)

    def gates_done(uid) -> bool:
        """Gates exist and were trained on the sharer LoRA that is there now (stage 3 may have retrained it: then
        they are trained again), on this run's base model and task LoRA (else refused)."""
        gate_dir = user_dir(out_root, uid)
        if not (gate_dir / GATES_FILE).is_file():
            return False
        recorded = read_source(gate_dir / SOURCE_FILE)
        wanted = {**sources, "adapter_sha256": adapter_sha256(user_dir(anchor_dir, uid))}
        if recorded is not None and recorded.get("adapter_sha256") not in (None, wanted["adapter_sha256"]):
            print(f"gates of sharer {uid}: its LoRA changed since they were trained; training them again")
            return False
        refuse_other_sources(gate_dir, recorded, wanted, "trained")   # unknown or other base/task LoRA: refused
        return True

    run_per_user(sharers, gates_done, work, "sharer gates", out_root / "users_log.jsonl", num_shards, shard_id,
                 cfg.shards.overwrite)
    finish_per_user_stage("sharer gates", out_root, [uid for uid, _ in sharers])
    return out_root


def user_predictions_path(root, uid: str) -> Path:
    return Path(root) / "user_predictions" / f"user_{uid}.json"


def predict_one_user(model, tokenizer, task, user, profiles, profiles_path, device, gen: GenerationConfig,
                     shortened: dict | None = None) -> dict:
    """A user's predictions of every variant, with the generation settings that made them (the resume unit)."""
    preds = predict_variants(model, tokenizer, task, [user], profiles, device, k_list=gen.k_list,
                             max_new_tokens=gen.max_gen_len, profiles_path=profiles_path, shortened=shortened,
                             **gen.kwargs())
    return {"settings": gen.recorded(task),
            "predictions": {stem: [list(r) for r in rows] for stem, rows in preds.items()}}


def read_user_predictions(path) -> tuple:
    """(generation settings or None, {variant: rows}) of a per-user predictions file (older files: no settings)."""
    data = read_json(path, "per-user predictions")
    if isinstance(data, dict) and isinstance(data.get("predictions"), dict):
        return data.get("settings"), data["predictions"]
    return None, data


def check_existing_predictions(root, uids: list, settings: dict, overwrite: bool) -> None:
    """Refuse to resume over per-user predictions made with other generation settings (see recipes)."""
    if overwrite:
        return
    for uid in uids:
        path = user_predictions_path(root, uid)
        if path.is_file():
            had, _ = read_user_predictions(path)
            if had is None:   # made by an older version: nothing says how
                fail(f"{path} records no generation settings (made by an older version): it cannot be counted as "
                     f"this run's; pass --overwrite to predict every user again, or another --output_dir")
            refuse_other_settings(path, had, settings, "predicted")


def combine_user_predictions(root, task, users: list) -> bool:
    """Join the per-user prediction files into <root>/predictions/<variant>.json once every user is done."""
    paths = [user_predictions_path(root, user_id(u)) for u in users]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"{len(missing)} of {len(paths)} users have no predictions yet (other shards?); "
              f"the combined files are written when all are done")
        return False
    combined: dict = {}
    for p in paths:
        _, predictions = read_user_predictions(p)
        if combined and set(predictions) != set(combined):
            fail(f"{p} holds the variants {sorted(predictions)}, other users' files {sorted(combined)}: they were "
                 f"made with other --k_list; rerun with --overwrite")
        for stem, rows in predictions.items():
            combined.setdefault(stem, []).extend(tuple(r) for r in rows)
    write_variant_files(Path(root) / "predictions", task, combined)
    print(f"predictions of {len(users)} users in {Path(root) / 'predictions'}")
    return True


def train_oppu(cfg: OPPUStage) -> Path:
    """The OPPU baseline: a LoRA per test user on that user's own history only, then its predictions."""
    task = get_task(cfg.inputs.task_name)
    layout = Layout(cfg.inputs.data_dir, task)
    out_root = Path(cfg.output_dir or default_dirs(task.name)["oppu"])
    test_users = layout.load_split("test", check=True)
    layout.load_golds(test_users)
    profiles = layout.load_profiles()
    users = [(user_id(u), u) for u in test_users]
    examples = {uid: user_examples(task, u, profiles, layout.profiles, i, layout.test_users)
                for i, (uid, u) in enumerate(users)}
    num_shards, shard_id = cfg.shards.resolve()
    base_cfg = cfg.train
    check_existing_predictions(out_root, [uid for uid, _ in users], cfg.generation.recorded(task),
                               cfg.shards.overwrite)
    sources = merged_base_sources(cfg.inputs)
    engine = lazy(lambda: load_merged_base(cfg.inputs))   # no model load when every user is done

    def work(uid, user):
        model, tokenizer, device = engine()
        seed = user_seed(base_cfg.seed, uid)
        adapter_dir = out_root / "adapters" / f"user_{uid}"
        peft_model = fresh_lora(model, cfg.lora, seed)
        try:
            # killed after saving, before predicting: reuse the adapter if it was made from the same inputs
            if not cfg.shards.overwrite and adapter_done(adapter_dir, sources, "trained"):
                load_adapter_weights(peft_model, adapter_dir)
                stats = {"tokens": 0, "last_loss": None, "seconds": 0.0}
            else:
                stats = train(peft_model, tokenizer, examples[uid], replace(base_cfg, seed=seed), device,
                              desc=f"OPPU {uid}", log_path=out_root / "train_log.jsonl")
                save_peft_adapter(peft_model, adapter_dir, {SOURCE_FILE: sources})
            shortened = {}
            preds = predict_one_user(peft_model, tokenizer, task, user, profiles, layout.profiles, device,
                                     cfg.generation, shortened)
            write_json_atomic(user_predictions_path(out_root, uid), preds)
        finally:
            peft_model.unload()
        return user_record(uid, examples[uid], stats, shortened)

    run_per_user(users, lambda uid: user_predictions_path(out_root, uid).is_file(), work, "OPPU users",
                 out_root / "users_log.jsonl", num_shards, shard_id, cfg.shards.overwrite)
    finish_per_user_stage("OPPU", out_root, [uid for uid, _ in users])
    combine_user_predictions(out_root, task, test_users)
    return out_root
