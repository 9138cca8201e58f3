"""What the stages that predict target users share (stage 5 and the OPPU baseline): the test split's users and
profiles, their histories checked up front, each user's examples built in its turn, its predictions published per
user (the resume unit) and joined into the variant files once every shard is done.

Stages 3 and 4 work on sharers instead (stages/common.py: sharer_run); what every stage shares is there too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from perpcs.atomic import write_json_atomic
from perpcs.data.layout import Layout, profile_text, read_json, user_id
from perpcs.data.tasks import Task, get_task
from perpcs.engine.generation import (predict_users, predict_variants, resolve_users_per_batch,
                                     write_variant_files)
from perpcs.errors import fail
from perpcs.models.provenance import refuse_other_sources
from perpcs.paths import default_dirs, split_output_dir, user_file_name
from perpcs.stages.common import (refuse_other_settings, run_per_user, run_user_groups, stage_manifest, staging_dirs,
                                  user_examples, users_data)
from perpcs.stages.config import GenerationConfig, ModelConfig, ShardConfig, StageInputs
from perpcs.stages.manifest import RunManifest, open_run


@dataclass
class TargetRun:
    """The target users of one run: who they are, where their outputs go, and the per-user steps both target
    stages take the same way (a user's examples, its predictions, the run loop, the combined files)."""
    task: Task
    layout: Layout
    dirs: dict             # the task's default output dirs (paths.default_dirs)
    out_root: Path         # <output_dir>, or <output_dir>/leaderboard for --test_split leaderboard
    split: str             # "test" or "leaderboard"
    test_users: list       # the split's user records, in file order
    profiles: dict         # every user's profile text (the prompts read it)
    users: list = field(init=False)    # [(user id, user record)]
    index: dict = field(init=False)    # user id -> position in the split's file (named in error messages)

    def __post_init__(self):
        self.users = [(user_id(u), u) for u in self.test_users]
        self.index = {uid: i for i, (uid, _) in enumerate(self.users)}

    @property
    def uids(self) -> list:
        return [uid for uid, _ in self.users]

    @property
    def users_file(self) -> Path:
        return self.layout.split_path(self.split)

    @property
    def history_profiles(self) -> dict | None:
        """The profile texts where a task's history examples use them, else None (not part of a history)."""
        return self.profiles if self.task.uses_profile_in_history_training else None

    @property
    def log_path(self) -> Path:
        return self.out_root / "users_log.jsonl"

    def check_histories(self) -> None:
        check_histories(self.task, self.test_users, self.profiles, self.layout.profiles, self.users_file)

    def manifest(self, stage: str, settings: dict, inputs: dict, model: ModelConfig) -> RunManifest:
        """The run manifest; a user's data digest covers its history, profile text and queries."""
        return stage_manifest(stage, settings, users_data(self.task, self.users, self.profiles, queries=True),
                              inputs, model)

    def examples(self, uid: str, recent_k: int | None = None) -> list:
        """A user's history examples (its last ``recent_k`` items only, where given), built in its turn: all
        users' at once would stay alive for the whole run."""
        return user_examples(self.task, self.test_users[self.index[uid]], self.profiles, self.layout.profiles, self.index[uid],
                             self.users_file, recent_k)

    def predictions_path(self, uid: str) -> Path:
        return user_predictions_path(self.out_root, uid)

    def predict(self, model, tokenizer, device, uid: str, generation: GenerationConfig, made_from: dict) -> dict:
        """The user's predictions of every variant, written to its per-user file; returns how many prompts were
        shortened (for users_log.jsonl)."""
        shortened = {}
        preds = predict_one_user(model, tokenizer, self.task, self.test_users[self.index[uid]], self.profiles,
                                 self.layout.profiles, device, generation, shortened, made_from)
        write_json_atomic(self.predictions_path(uid), preds)
        return shortened

    def predict_group(self, model, tokenizer, device, uids: list, generation: GenerationConfig, made_from: Callable,
                      adapter_names: list | None = None):
        """Several users' predictions generated together (``adapter_names``: one peft adapter per user, each user's
        rows on its own; None: every row on the model as it is): their rows sorted by length and cut into batches
        of --gen_batch_size rows, so less padding and fewer, fuller batches than one user at a time; then each
        user's file written as ``predict`` writes it, yielding (uid, how many prompts were shortened) after each.
        One user: ``predict`` itself."""
        if len(uids) == 1 and adapter_names is None:
            yield uids[0], self.predict(model, tokenizer, device, uids[0], generation, made_from(uids[0]))
            return
        shortened = []
        users = [self.test_users[self.index[uid]] for uid in uids]
        preds = predict_users(model, tokenizer, self.task, users, self.profiles, device, k_list=generation.k_list,
                              max_new_tokens=generation.max_gen_len, profiles_path=self.layout.profiles,
                              shortened=shortened, adapter_names=adapter_names, **generation.kwargs())
        for uid, user_preds, counts in zip(uids, preds, shortened):
            write_json_atomic(self.predictions_path(uid), predictions_record(self.task, generation, user_preds,
                                                                             made_from(uid)))
            yield uid, counts

    def check_predictions(self, generation: GenerationConfig, made_from: Callable) -> None:
        check_existing_predictions(self.out_root, self.uids, generation.recorded(self.task), False, made_from)

    def open(self, manifest: RunManifest, shards: ShardConfig, check_outputs: Callable):
        """The run's lock and manifest on out_root (stages.manifest.open_run)."""
        return open_run(self.out_root, manifest, *shards.resolve(), shards.overwrite, check_outputs)

    def run(self, is_done: Callable, work: Callable, desc: str, shards: ShardConfig) -> dict:
        """``work(uid, user)`` for this shard's users not done yet (stages.common.run_per_user)."""
        return run_per_user(self.users, is_done, work, desc, self.log_path, *shards.resolve(), shards.overwrite,
                            staging_dirs(self.out_root))

    def run_groups(self, is_done: Callable, prepare: Callable, predict: Callable, desc: str, shards: ShardConfig,
                   group_size: int) -> dict:
        """``prepare`` each user of this shard not done yet, ``predict`` them ``group_size`` at a time
        (stages.common.run_user_groups)."""
        return run_user_groups(self.users, is_done, prepare, predict, group_size, desc, self.log_path,
                               *shards.resolve(), shards.overwrite, staging_dirs(self.out_root))

    def combine(self) -> bool:
        return combine_user_predictions(self.out_root, self.task, self.test_users)


def target_run(inputs: StageInputs, test_split: str, output_dir, default: Callable) -> TargetRun:
    """The target users of ``test_split`` and their profiles; outputs under ``output_dir``, else under
    ``default(dirs)`` (dirs: the task's default output dirs)."""
    task = get_task(inputs.task_name)
    layout = Layout(inputs.data_dir, task)
    dirs = default_dirs(task.name)
    out_root = split_output_dir(output_dir or default(dirs), test_split)
    test_users, _ = layout.load_targets(test_split)
    return TargetRun(task, layout, dirs, out_root, test_split, test_users, layout.load_profiles())


def users_per_batch(value, device: str, temperature: float, cpu_bf16: bool) -> int:
    """--users_per_batch resolved on the device the run uses and its numerics (engine.generation.
    resolve_users_per_batch: auto batches users only where that leaves every output as it is)."""
    from perpcs.models.devices import resolve_device
    device = resolve_device(device)
    return resolve_users_per_batch(value, device, temperature, bf16=device.type == "cuda" or cpu_bf16)


def check_histories(task, users: list, profiles, profiles_path, users_path) -> None:
    """What user_examples would refuse, for every user up front, without building the examples: the stages build a
    user's examples in its turn (all of them at once would hold every test user's examples for the whole run)."""
    for index, user in enumerate(users):
        if task.uses_profile_in_history_training:
            profile_text(profiles, user, profiles_path, index)
        if not user["profile"]:
            fail(f"{users_path}: user #{index} (user_id {user_id(user)!r}): empty history, nothing to train on")


def user_predictions_path(root, uid: str) -> Path:
    return Path(root) / "user_predictions" / user_file_name(uid, ".json")


def predict_one_user(model, tokenizer, task, user, profiles, profiles_path, device, gen: GenerationConfig,
                     shortened: dict | None = None, made_from: dict | None = None) -> dict:
    """A user's predictions of every variant, with the generation settings and the inputs that made them (the
    resume unit)."""
    preds = predict_variants(model, tokenizer, task, [user], profiles, device, k_list=gen.k_list,
                             max_new_tokens=gen.max_gen_len, profiles_path=profiles_path, shortened=shortened,
                             **gen.kwargs())
    return predictions_record(task, gen, preds, made_from)


def predictions_record(task, gen: GenerationConfig, preds: dict, made_from: dict | None) -> dict:
    """A per-user predictions file: the generation settings that decide them (not how many users shared a batch:
    greedy outputs are the same, and sampling predicts one user at a time), what they were made from, the rows."""
    return {"settings": gen.recorded(task), **({"made_from": made_from} if made_from is not None else {}),
            "predictions": {stem: [list(r) for r in rows] for stem, rows in preds.items()}}


def read_user_predictions(path) -> tuple:
    """(generation settings or None, {variant: rows}) of a per-user predictions file (older files: no settings)."""
    data = read_json(path, "per-user predictions")
    if isinstance(data, dict) and isinstance(data.get("predictions"), dict):
        return data.get("settings"), data["predictions"]
    return None, data


def check_existing_predictions(root, uids: list, settings: dict, overwrite: bool,
                               made_from: Callable | None = None) -> None:
    """Refuse to resume over per-user predictions made with other generation settings or from other inputs
    (``made_from(uid)``: what this run's prediction of the user is made from)."""
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
            if made_from is not None:
                refuse_other_sources(path, read_json(path, "per-user predictions").get("made_from"), made_from(uid),
                                     "predicted")


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
