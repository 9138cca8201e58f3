"""The OPPU baseline: a LoRA per target user trained on that user's own history only.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from perpcs.data.truncation import finish_per_user_stage
from perpcs.engine.training import train, user_seed
from perpcs.models.lora import load_adapter_weights, save_peft_adapter
from perpcs.models.provenance import SOURCE_FILE
from perpcs.paths import user_file_name
from perpcs.stages.common import (adapter_done, fresh_lora, lazy, load_merged_base, lora_record, made_from,
                                  merged_base_sources, user_record)
from perpcs.stages.config import OPPUStage
from perpcs.stages.target_users import target_run


def train_oppu(cfg: OPPUStage) -> Path:
    """The OPPU baseline: a LoRA per test user on that user's own history only, then its predictions."""
    run = target_run(cfg.inputs, cfg.test_split, cfg.output_dir, lambda dirs: dirs["oppu"])
    task, out_root = run.task, run.out_root
    run.check_histories()
    cfg.shards.resolve()   # a bad --shard_id is refused here, before the base model is digested
    base_cfg = cfg.train
    sources = merged_base_sources(cfg.inputs)
    manifest = run.manifest("oppu", {"lora": lora_record(cfg.lora), "train": asdict(cfg.train),
                                     "generation": cfg.generation.recorded(task)}, sources, cfg.inputs.model)
    engine = lazy(lambda: load_merged_base(cfg.inputs))   # no model load when every user is done

    def work(uid, user):
        model, tokenizer, device = engine()
        examples = run.examples(uid)   # in its turn
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
            shortened = run.predict(peft_model, tokenizer, device, uid, cfg.generation, made_from(manifest, uid))
        finally:
            peft_model.unload()
        return user_record(uid, examples, stats, shortened)

    def check_outputs():   # predictions, and adapters saved before a kill, made otherwise are refused
        run.check_predictions(cfg.generation, lambda uid: made_from(manifest, uid))
        for uid in run.uids:
            adapter_done(out_root / "adapters" / user_file_name(uid), made_from(manifest, uid), "trained")

    with run.open(manifest, cfg.shards, check_outputs):
        run.run(lambda uid: run.predictions_path(uid).is_file(), work, "OPPU users", cfg.shards)
        finish_per_user_stage("OPPU", out_root, run.uids)
        run.combine()
    return out_root
