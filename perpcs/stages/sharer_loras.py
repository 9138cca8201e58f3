"""Stage 3: one LoRA per sharer on base + merged task LoRA, on the sharer's history.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from perpcs.data.layout import Layout
from perpcs.data.tasks import get_task
from perpcs.data.truncation import finish_per_user_stage
from perpcs.engine.training import train, user_seed
from perpcs.models.lora import save_peft_adapter
from perpcs.models.provenance import SOURCE_FILE
from perpcs.paths import default_dirs, resolve_sharer_index
from perpcs.stages.base import (adapter_done, fresh_lora, lazy, load_merged_base, load_sharers, merged_base_sources,
                                profiles_if_needed, run_per_user, user_dir, user_examples, user_record)
from perpcs.stages.config import SharerLoRAStage


def train_sharer_loras(cfg: SharerLoRAStage) -> Path:
    """Stage 3: one LoRA per sharer on its own history."""
    task = get_task(cfg.inputs.task_name)
    layout = Layout(cfg.inputs.data_dir, task)
    dirs = default_dirs(task.name)
    out_root = Path(cfg.output_dir or dirs["sharer_loras"])
    sharers = load_sharers(resolve_sharer_index(cfg.anchor_idx_path, task.name), layout.candidate_users, task)
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
