"""What every per-user stage (3, 4, 5 and OPPU) shares: the merged base model loaded lazily, the sharers and users'
history examples, sharding and resuming with a JSONL log, refusing outputs made differently. What only the target
stages (5 and OPPU) share, their test users and per-user predictions, is in stages/target_users.py.

A user's work is seeded from (seed, user id), and its output is published atomically, so a run killed at any
moment and started again produces the same files as an uninterrupted one, without redoing finished users.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from perpcs.atomic import remove_orphaned_staging
from perpcs.data.layout import Layout, load_users, log_rows, profile_text, user_id
from perpcs.data.prompts import history_examples
from perpcs.data.tasks import get_task
from perpcs.data.truncation import user_entry
from perpcs.errors import fail
from perpcs.models.lora import is_complete_adapter
from perpcs.models.provenance import SOURCE_FILE, read_source, refuse_other_sources, training_sources
from perpcs.paths import GATE_SCORES_DIR, default_dirs, resolve_sharer_index, user_file_name
from perpcs.stages.config import LoraSettings, ModelConfig, ShardConfig, StageInputs
from perpcs.stages.manifest import RunManifest, environment, numerics, user_data_sha256


def lazy(make: Callable) -> Callable:
    """``make()`` on the first call, the same value afterwards: a stage loads its model only once it has a
    user to work on, so a rerun with everything done costs seconds, not a 13 GB model load."""
    made = []

    def get():
        if not made:
            made.append(make())
        return made[0]
    return get


def refuse_other_settings(path, had: dict, wanted: dict, made: str) -> None:
    """Resuming over an output made with other settings would pass it off as this run's: stop and say which."""
    changed = {k: (had.get(k), v) for k, v in wanted.items() if had.get(k) != v}
    if changed:
        diff = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        fail(f"{path} was {made} with other settings ({diff}); pass another --output_dir, or --overwrite to redo "
             f"every user")


def last_per_user(log_path, key: str) -> dict:
    """{user: value of ``key``} from a per-user log (users_log.jsonl, all shards append to it); the last positive
    value of each user counts (a user resumed from its saved adapter logs 0 training seconds)."""
    values = {}
    for row in log_rows(log_path):
        value = row.get(key)
        if isinstance(value, (int, float)) and value > 0:
            values[str(row["user_id"])] = float(value)
    return values


def shard_users(users: list, num_shards: int, shard_id: int) -> list:
    """Users i with i % num_shards == shard_id: deterministic, and the shards' union is every user once."""
    return [u for i, u in enumerate(users) if i % num_shards == shard_id]


def staging_dirs(out_root) -> list:
    """Where a per-user stage publishes its users' outputs (user_<id>/ dirs, user_<id>.json files), so where a
    killed run may have left their staging."""
    root = Path(out_root)
    return [root] + [root / sub for sub in ("adapters", "user_predictions", "recipes", GATE_SCORES_DIR)]


def run_per_user(users: list, is_done: Callable, work: Callable, desc: str, log_path: Path | None = None,
                 num_shards: int = 1, shard_id: int = 0, overwrite: bool = False, staging=()) -> dict:
    """Call ``work(uid, user) -> dict`` for each (uid, user) of this shard that is not done yet.

    Returns {"done": [...], "skipped": [...]}; each finished user appends a line (time, stats) to log_path.
    ``staging``: the dirs (staging_dirs) where the staging a kill left of this shard's users is removed first.
    """
    todo, skipped = pending_users(users, is_done, desc, num_shards, shard_id, overwrite, staging)
    done = []
    for uid, user in tqdm(todo, desc=desc, unit="user"):
        t0 = time.perf_counter()
        with disk_errors(desc, uid):
            stats = work(uid, user) or {}
            log_user(log_path, {"user_id": uid, "seconds": round(time.perf_counter() - t0, 3), **stats})
        done.append(uid)
    return {"done": done, "skipped": skipped}


def run_user_groups(users: list, is_done: Callable, prepare: Callable, predict: Callable, group_size: int,
                    desc: str, log_path: Path | None = None, num_shards: int = 1, shard_id: int = 0,
                    overwrite: bool = False, staging=()) -> dict:
    """run_per_user for stages that predict several users together: the users to do, ``group_size`` at a time;
    ``prepare(uid, user) -> state`` for each user of a group in turn (its recipe or adapter written), then
    ``predict([(uid, user, state)])``, a generator that writes each user's predictions file and yields
    (uid, stats) after it: the user's log line follows at once, so a kill mid-group leaves every written file
    logged and loses at most the predictions not written yet. A user's ``seconds``: its own preparation and an
    equal share of the group's prediction time."""
    todo, skipped = pending_users(users, is_done, desc, num_shards, shard_id, overwrite, staging)
    done = []
    with tqdm(total=len(todo), desc=desc, unit="user") as bar:
        for start in range(0, len(todo), group_size):
            group, prepared, seconds = todo[start:start + group_size], [], {}
            for uid, user in group:
                t0 = time.perf_counter()
                with disk_errors(desc, uid):
                    prepared.append((uid, user, prepare(uid, user)))
                seconds[uid] = time.perf_counter() - t0
            t0, share = time.perf_counter(), None
            current = group[0][0]
            with disk_errors(desc, lambda: current):
                for uid, stats in predict(prepared):
                    share = (time.perf_counter() - t0) / len(group) if share is None else share
                    log_user(log_path, {"user_id": uid, "seconds": round(seconds[uid] + share, 3),
                                        "users_predicted_together": len(group), **(stats or {})})
                    done.append(uid)
                    bar.update(1)
                    current = next((u for u, _ in group if u not in done), uid)
    return {"done": done, "skipped": skipped}


def pending_users(users: list, is_done: Callable, desc: str, num_shards: int, shard_id: int, overwrite: bool,
                  staging) -> tuple:
    """([(uid, user)] of this shard still to do, [uids done]); the staging a kill left of this shard's users
    removed first."""
    mine = shard_users(users, num_shards, shard_id)
    # only this shard's users: other shards may be writing theirs into the same folders right now
    removed = remove_orphaned_staging(staging, [user_file_name(uid, suffix) for uid, _ in mine
                                                for suffix in ("", ".json")])
    if removed:
        print(f"{desc}: removed {removed} unfinished staging left by an interrupted run")
    finished = set() if overwrite else {uid for uid, _ in mine if is_done(uid)}
    todo = [(uid, u) for uid, u in mine if uid not in finished]
    skipped = [uid for uid, _ in mine if uid in finished]
    print(f"{desc}: {len(mine)} users in shard {shard_id}/{num_shards}, {len(skipped)} already done, "
          f"{len(todo)} to do")
    return todo, skipped


def log_user(log_path: Path | None, record: dict) -> None:
    """One finished user's line in users_log.jsonl."""
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


@contextmanager
def disk_errors(desc: str, uid):
    """Disk full, read-only output dir: say where and for which user (``uid``, or a callable giving it), keep what
    is finished."""
    try:
        yield
    except OSError as err:
        who = uid() if callable(uid) else uid
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        fail(f"{desc}: user {who!r}: {err.strerror or err}{where}; users finished before are intact, "
             f"run again to resume")


def user_dir(root, uid: str) -> Path:
    return Path(root) / user_file_name(uid)


def load_sharers(anchor_idx_path, candidate_path, task) -> list:
    """[(user id, user record)] of the chosen sharers, from stage 2's index into the candidate file."""
    from perpcs.stages.sharer_selection import load_sharer_index
    candidates = load_users(candidate_path, task)
    index = load_sharer_index(anchor_idx_path, candidates)
    return [(str(uid), candidates[idx]) for idx, uid in zip(index["indices"], index["user_ids"])]


def as_json(obj):
    """The value as it reads back from JSON (tuples become lists), so a recorded value compares equal to its source."""
    return json.loads(json.dumps(obj))


def stage_manifest(stage: str, settings: dict, data: dict, inputs: dict, model: ModelConfig) -> RunManifest:
    """A stage's run manifest (perpcs.stages.manifest) on the device and dtype the model config resolves to."""
    return RunManifest(stage, as_json(settings), as_json(data), as_json(inputs),
                       numerics(model.device, model.cpu_bf16), environment(model.device))


def made_from(manifest: RunManifest, uid: str, **extra) -> dict:
    """What one user's output records it was made from: the run's settings (digest), this user's data, the inputs
    shared by every user (base model, task LoRA) and ``extra`` (a sharer's own adapter, a recipe)."""
    shared = {k: v for k, v in manifest.inputs.items() if k in ("base_model", "task_lora_sha256")}
    return {**shared, "settings_sha256": manifest.settings_sha256, "user_data_sha256": manifest.data[uid], **extra}


def lora_record(lora: LoraSettings) -> dict:
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": list(lora.target_modules)}


def users_data(task, users: list, profiles, queries: bool) -> dict:
    """{user id: digest of what the stage reads of that user} (perpcs.stages.manifest.user_data_sha256)."""
    return {uid: user_data_sha256(u, profiles.get(uid) if profiles is not None else None, queries) for uid, u in users}


@dataclass
class SharerRun:
    """The set-up stages 3 and 4 share: the sharers (stage 2's index into the candidates), their examples, this
    process's shard, what the outputs must be made from, and the merged base model, loaded at the first user."""
    task: object
    layout: Layout
    dirs: dict
    sharers: list          # [(user id, user record)]
    examples: dict         # user id -> history examples
    shard: tuple           # (num_shards, shard_id)
    sources: dict          # digests of the base model and task LoRA (provenance)
    engine: Callable       # -> (model, tokenizer, device); no model load when every sharer is done
    data: dict             # user id -> digest of the sharer's history (and profile text where examples use it)


def sharer_run(inputs: StageInputs, shards: ShardConfig, anchor_idx_path, recent_k: int | None = None) -> SharerRun:
    task = get_task(inputs.task_name)
    layout = Layout(inputs.data_dir, task)
    sharers = load_sharers(resolve_sharer_index(anchor_idx_path, task.name), layout.candidate_users, task)
    profiles = profiles_if_needed(layout, task)
    examples = {uid: user_examples(task, u, profiles, layout.profiles, i, layout.candidate_users, recent_k)
                for i, (uid, u) in enumerate(sharers)}
    return SharerRun(task, layout, default_dirs(task.name), sharers, examples, shards.resolve(),
                     merged_base_sources(inputs), lazy(lambda: load_merged_base(inputs)),
                     users_data(task, sharers, profiles, queries=False))


def task_lora_dir(inputs: StageInputs) -> Path:
    from perpcs.models.lora import resolve_lora_ckpt
    return resolve_lora_ckpt(inputs.lora_ckpt or default_dirs(get_task(inputs.task_name).name)["task_lora"])


def load_merged_base(inputs: StageInputs):
    """Base LLM with the stage 1 task LoRA merged into its weights (every personal LoRA sits on top)."""
    from perpcs.models.loading import load_base_model
    from perpcs.models.lora import merge_lora_into_base
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
    """A user's history examples (docs/method.md section 4); the profile text only for tasks whose examples use it."""
    prof = profile_text(profiles, user, profiles_path, index) if task.uses_profile_in_history_training else None
    examples = history_examples(task, user["profile"], prof, recent_k=recent_k)
    if not examples:
        fail(f"{users_path}: user #{index} (user_id {user_id(user)!r}): empty history, nothing to train on")
    return examples


def fresh_lora(model, lora: LoraSettings, seed: int, adapter_name: str = "default"):
    """A new peft LoRA on the shared (base + task) model, its A init seeded per user."""
    from peft import get_peft_model
    from transformers import set_seed

    from perpcs.models.lora import lora_config
    set_seed(seed)
    return get_peft_model(model, lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules),
                          adapter_name=adapter_name)


def user_record(uid: str, examples, stats: dict, prompts: dict | None = None) -> dict:
    """What a per-user stage logs for a user (users_log.jsonl), with how many examples/prompts were shortened;
    ``examples``: the user's examples, or how many."""
    return {"examples": examples if isinstance(examples, int) else len(examples), "tokens": stats["tokens"], "last_loss": stats["last_loss"],
            "train_seconds": round(stats["seconds"], 3),
            "truncated": user_entry(uid, stats.get("truncated"), prompts)}


def profiles_if_needed(layout, task):
    return layout.load_profiles() if task.uses_profile_in_history_training else None
