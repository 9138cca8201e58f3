"""The OPPU baseline: a LoRA per target user trained on that user's own history only.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from perpcs.atomic import write_json_atomic
from perpcs.data.layout import Layout, user_id
from perpcs.data.tasks import get_task
from perpcs.data.truncation import finish_per_user_stage
from perpcs.engine.training import train, user_seed
from perpcs.models.lora import load_adapter_weights, save_peft_adapter
from perpcs.models.provenance import SOURCE_FILE
from perpcs.paths import default_dirs, split_output_dir, user_file_name
from perpcs.stages.common import (adapter_done, check_existing_predictions, check_histories, combine_user_predictions,
                                fresh_lora, lazy, load_merged_base, lora_record, made_from, merged_base_sources,
                                predict_one_user, run_per_user, stage_manifest, staging_dirs, user_examples,
                                user_predictions_path, user_record, users_data)
from perpcs.stages.config import OPPUStage
from perpcs.stages.manifest import open_run


def train_oppu(cfg: OPPUStage) -> Path:
    """The OPPU baseline: a LoRA per test user on that user's own history only, then its predictions."""
    task = get_task(cfg.inputs.task_name)
    layout = Layout(cfg.inputs.data_dir, task)
    out_root = split_output_dir(cfg.output_dir or default_dirs(task.name)["oppu"], cfg.test_split)
    test_users, _ = layout.load_targets(cfg.test_split)
    profiles = layout.load_profiles()
    users = [(user_id(u), u) for u in test_users]
    users_file = layout.split_path(cfg.test_split)
    check_histories(task, test_users, profiles, layout.profiles, users_file)
    index = {uid: i for i, (uid, _) in enumerate(users)}
    num_shards, shard_id = cfg.shards.resolve()
    base_cfg = cfg.train
    sources = merged_base_sources(cfg.inputs)
    manifest = stage_manifest("oppu", {"lora": lora_record(cfg.lora), "train": asdict(cfg.train),
                                       "generation": cfg.generation.recorded(task)},
                              users_data(task, users, profiles, queries=True), sources, cfg.inputs.model)
    engine = lazy(lambda: load_merged_base(cfg.inputs))   # no model load when every user is done

    def work(uid, user):
        model, tokenizer, device = engine()
        examples = user_examples(task, user, profiles, layout.profiles, index[uid], users_file)   # in its turn
        seed = user_seed(base_cfg.seed, uid)
        adapter_dir = out_root / "adapters" / user_file_name(uid)
        peft_model = fresh_lora(model, cfg.lora, seed)
        try:
            # killed after saving, before predicting: reuse the adapter if it was made from the same inputs
            if not cfg.shards.overwrite and adapter_done(adapter_dir, made_from(manifest, uid), "trained"):
                load_adapter_weights(peft_model, adapter_dir)
                stats = {"tokens": 0, "last_loss": None, "seconds": 0.0}
            else:
                stats = train(peft_model, tokenizer, examples, replace(base_cfg, seed=seed), device,
                              desc=f"OPPU {uid}", log_path=out_root / "train_log.jsonl")
                save_peft_adapter(peft_model, adapter_dir, {SOURCE_FILE: made_from(manifest, uid)})
            shortened = {}
            preds = predict_one_user(peft_model, tokenizer, task, user, profiles, layout.profiles, device,
                                     cfg.generation, shortened, made_from(manifest, uid))
            write_json_atomic(user_predictions_path(out_root, uid), preds)
        finally:
            peft_model.unload()
        return user_record(uid, examples, stats, shortened)

    def check_outputs():   # predictions, and adapters saved before a kill, made otherwise are refused
        check_existing_predictions(out_root, [uid for uid, _ in users], cfg.generation.recorded(task), False,
                                   lambda uid: made_from(manifest, uid))
        for uid, _ in users:
            adapter_done(out_root / "adapters" / user_file_name(uid), made_from(manifest, uid), "trained")

    with open_run(out_root, manifest, num_shards, shard_id, cfg.shards.overwrite, check_outputs):
        run_per_user(users, lambda uid: user_predictions_path(out_root, uid).is_file(), work, "OPPU users",
                     out_root / "users_log.jsonl", num_shards, shard_id, cfg.shards.overwrite,
                     staging_dirs(out_root))
        finish_per_user_stage("OPPU", out_root, [uid for uid, _ in users])
        combine_user_predictions(out_root, task, test_users)
    return out_root
