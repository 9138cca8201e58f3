"""Stage 3: one LoRA per sharer on base + merged task LoRA, on the sharer's history.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from perpcs.data.truncation import finish_per_user_stage
from perpcs.engine.training import train, user_seed
from perpcs.models.lora import save_peft_adapter
from perpcs.models.provenance import SOURCE_FILE
from perpcs.stages.common import (adapter_done, fresh_lora, lora_record, made_from, run_per_user, sharer_run,
                                stage_manifest, staging_dirs, user_dir, user_record)
from perpcs.stages.config import SharerLoRAStage
from perpcs.stages.manifest import open_run


def train_sharer_loras(cfg: SharerLoRAStage) -> Path:
    """Stage 3: one LoRA per sharer on its own history."""
    run = sharer_run(cfg.inputs, cfg.shards, cfg.anchor_idx_path)
    out_root = Path(cfg.output_dir or run.dirs["sharer_loras"])
    base_cfg, examples = cfg.train, run.examples
    manifest = stage_manifest("sharer_loras", {"lora": lora_record(cfg.lora), "train": asdict(cfg.train)}, run.data,
                              {**run.sources, "sharers": [uid for uid, _ in run.sharers]}, cfg.inputs.model)

    def work(uid, user):
        model, tokenizer, device = run.engine()
        seed = user_seed(base_cfg.seed, uid)
        peft_model = fresh_lora(model, cfg.lora, seed)
        try:
            stats = train(peft_model, tokenizer, examples[uid], replace(base_cfg, seed=seed), device,
                          desc=f"sharer {uid}", log_path=out_root / "train_log.jsonl")
            save_peft_adapter(peft_model, user_dir(out_root, uid), {SOURCE_FILE: made_from(manifest, uid)})
        finally:
            peft_model.unload()
        return user_record(uid, examples[uid], stats)

    def done(uid) -> bool:   # a finished adapter made otherwise is refused, not redone
        return adapter_done(user_dir(out_root, uid), made_from(manifest, uid), "trained")

    with open_run(out_root, manifest, *run.shard, cfg.shards.overwrite, lambda: [done(u) for u, _ in run.sharers]):
        run_per_user(run.sharers, done, work, "sharer LoRAs", out_root / "users_log.jsonl", *run.shard,
                     cfg.shards.overwrite, staging_dirs(out_root))
        finish_per_user_stage("sharer LoRAs", out_root, [uid for uid, _ in run.sharers])
    return out_root
