"""Stage 4: one gate vector per piece of each (frozen) sharer LoRA.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from perpcs.atomic import write_dir_atomic, write_json_atomic
from perpcs.data.truncation import finish_per_user_stage
from perpcs.engine.training import train, user_seed
from perpcs.errors import fail
from perpcs.method.gates import GATES_FILE, install_gates, remove_gates, save_gates
from perpcs.models.lora import check_adapter_files, is_complete_adapter
from perpcs.models.provenance import SOURCE_FILE, adapter_sha256, read_source, refuse_other_sources
from perpcs.paths import resolve_sharer_lora_dir
from perpcs.stages.common import (made_from, run_per_user, sharer_run, stage_manifest, staging_dirs, user_dir,
                                user_record)
from perpcs.stages.config import SharerGateStage
from perpcs.stages.manifest import open_run


def train_sharer_gates(cfg: SharerGateStage) -> Path:
    """Stage 4: one gate per piece of each (frozen) sharer LoRA, on the sharer's last recent_k items."""
    from peft import PeftModel
    if cfg.recent_k < 1:
        fail(f"--recent_k must be at least 1, got {cfg.recent_k}")
    run = sharer_run(cfg.inputs, cfg.shards, cfg.anchor_idx_path, cfg.recent_k)
    anchor_dir = resolve_sharer_lora_dir(cfg.anchor_path or run.dirs["sharer_loras"])
    out_root = Path(cfg.output_dir or run.dirs["sharer_gates"])
    for uid, _ in run.sharers:   # every sharer LoRA readable before anything is written
        if not is_complete_adapter(user_dir(anchor_dir, uid)):
            fail(f"no sharer LoRA for user {uid!r} in {user_dir(anchor_dir, uid)} (run train_anchor_PEFT.py)")
        check_adapter_files(user_dir(anchor_dir, uid))
    base_cfg, examples = cfg.train, run.examples
    adapters = {uid: adapter_sha256(user_dir(anchor_dir, uid)) for uid, _ in run.sharers}
    manifest = stage_manifest("sharer_gates", {"train": asdict(cfg.train), "recent_k": cfg.recent_k}, run.data,
                              {**run.sources, "sharers": list(adapters), "sharer_adapters": adapters},
                              cfg.inputs.model)

    def source(uid) -> dict:   # what one sharer's gates are made from: its own LoRA among them
        return made_from(manifest, uid, adapter_sha256=adapters[uid])

    def work(uid, user):
        model, tokenizer, device = run.engine()
        seed = user_seed(base_cfg.seed, uid)
        peft_model = PeftModel.from_pretrained(model, str(user_dir(anchor_dir, uid)), is_trainable=False)
        try:
            gates = install_gates(peft_model)
            stats = train(peft_model, tokenizer, examples[uid], replace(base_cfg, seed=seed), device,
                          desc=f"gates {uid}", log_path=out_root / "train_log.jsonl")

            def write(d: Path) -> None:
                save_gates(gates, d / GATES_FILE)
                write_json_atomic(d / SOURCE_FILE, source(uid))

            write_dir_atomic(user_dir(out_root, uid), write)
            remove_gates(peft_model)
        finally:
            peft_model.unload()
        return user_record(uid, examples[uid], stats)

    def gates_done(uid) -> bool:
        """Gates exist and were trained on the sharer LoRA that is there now, with this run's settings, data, base
        model and task LoRA (else refused: stage 3 retrained the LoRA -> --overwrite trains every gate again)."""
        gate_dir = user_dir(out_root, uid)
        if not (gate_dir / GATES_FILE).is_file():
            return False
        refuse_other_sources(gate_dir, read_source(gate_dir / SOURCE_FILE), source(uid), "trained")
        return True

    with open_run(out_root, manifest, *run.shard, cfg.shards.overwrite,
                  lambda: [gates_done(u) for u, _ in run.sharers]):
        run_per_user(run.sharers, gates_done, work, "sharer gates", out_root / "users_log.jsonl", *run.shard,
                     cfg.shards.overwrite, staging_dirs(out_root))
        finish_per_user_stage("sharer gates", out_root, [uid for uid, _ in run.sharers])
    return out_root
