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
from perpcs.stages.target_users import target_run, users_per_batch


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

    def adapter_dir(uid):
        return out_root / "adapters" / user_file_name(uid)

    def prepare(uid, user):   # the user's LoRA trained and saved (or the one a killed run saved): (examples, stats)
        model, tokenizer, device = engine()
        examples = run.examples(uid)   # in its turn
        seed = user_seed(base_cfg.seed, uid)
        peft_model = fresh_lora(model, cfg.lora, seed)
        try:
            # killed after saving, before predicting: reuse the adapter if it was made from the same inputs
            if not cfg.shards.overwrite and adapter_done(adapter_dir(uid), made_from(manifest, uid), "trained"):
                load_adapter_weights(peft_model, adapter_dir(uid))   # checked strictly here, before its group
                stats = {"tokens": 0, "last_loss": None, "seconds": 0.0}
            else:
                stats = train(peft_model, tokenizer, examples, replace(base_cfg, seed=seed), device,
                              desc=f"OPPU {uid}", log_path=out_root / "train_log.jsonl")
                save_peft_adapter(peft_model, adapter_dir(uid), {SOURCE_FILE: made_from(manifest, uid)})
        finally:
            peft_model.unload()
        return len(examples), stats

    def predict(group):   # the group's saved adapters (fp32, as trained) on the model, each user's rows on its own
        model, tokenizer, device = engine()
        uids = [uid for uid, _, _ in group]
        names = ["default"] + [f"user_slot_{i}" for i in range(1, len(group))]
        peft_model = fresh_lora(model, cfg.lora, base_cfg.seed, names[0])
        try:
            for i, (uid, name) in enumerate(zip(uids, names)):
                if i:
                    peft_model.add_adapter(name, peft_model.peft_config[names[0]])
                load_adapter_weights(peft_model, adapter_dir(uid), adapter_name=name)
            peft_model.eval()   # predicting only: no dropout
            for uid, shortened in run.predict_group(peft_model, tokenizer, device, uids, cfg.generation,
                                                    lambda u: made_from(manifest, u),
                                                    names if len(group) > 1 else None):
                n_examples, stats = next(state for u, _, state in group if u == uid)
                yield uid, user_record(uid, n_examples, stats, shortened)
        finally:
            peft_model.unload()

    def check_outputs():   # predictions, and adapters saved before a kill, made otherwise are refused
        run.check_predictions(cfg.generation, lambda uid: made_from(manifest, uid))
        for uid in run.uids:
            adapter_done(out_root / "adapters" / user_file_name(uid), made_from(manifest, uid), "trained")

    with run.open(manifest, cfg.shards, check_outputs):
        run.run_groups(lambda uid: run.predictions_path(uid).is_file(), prepare, predict, "OPPU users", cfg.shards,
                       users_per_batch(cfg.users_per_batch, cfg.inputs.model.device, cfg.generation.temperature,
                                   cfg.inputs.model.cpu_bf16))
        finish_per_user_stage("OPPU", out_root, run.uids)
        run.combine()
    return out_root
