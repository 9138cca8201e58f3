"""Stage 3: one LoRA per sharer on base + merged task LoRA, on the sharer's history.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from perpcs.data.truncation import finish_per_user_stage
from perpcs.engine.training import train, user_seed
from perpcs.models.lora import save_peft_adapter
from perpcs.models.provenance import SOURCE_FILE
from perpcs.stages.base import (adapter_done, fresh_lora, run_per_user, sharer_run, staging_dirs, user_dir,
                                user_record)
from perpcs.stages.config import SharerLoRAStage


def train_sharer_loras(cfg: SharerLoRAStage) -> Path:
    """Stage 3: one LoRA per sharer on its own history."""
    run = sharer_run(cfg.inputs, cfg.shards, cfg.anchor_idx_path)
    out_root = Path(cfg.output_dir or run.dirs["sharer_loras"])
    base_cfg, examples, sources = cfg.train, run.examples, run.sources

    def work(uid, user):
        model, tokenizer, device = run.engine()
        seed = user_seed(base_cfg.seed, uid)
        peft_model = fresh_lora(model, cfg.lora, seed)
        try:
            stats = train(peft_model, tokenizer, examples[uid], replace(base_cfg, seed=seed), device,
                          desc=f"sharer {uid}", log_path=out_root / "train_log.jsonl")
            save_peft_adapter(peft_model, user_dir(out_root, uid), {SOURCE_FILE: sources})
        finally:
            peft_model.unload()
        return user_record(uid, examples[uid], stats)

    run_per_user(run.sharers, lambda uid: adapter_done(user_dir(out_root, uid), sources, "trained"), work,
                 "sharer LoRAs", out_root / "users_log.jsonl", *run.shard, cfg.shards.overwrite, staging_dirs(out_root))
    finish_per_user_stage("sharer LoRAs", out_root, [uid for uid, _ in run.sharers])
    return out_root
