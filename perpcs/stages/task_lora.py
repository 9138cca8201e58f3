"""Stage 1: the task LoRA on the base LLM, and the non-personalized / RAG / PAG baseline predictions."""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path

import torch

from perpcs.data.layout import Layout, profile_text
from perpcs.data.prompts import UserHistory, query_example
from perpcs.data.tasks import get_task
from perpcs.data.truncation import describe, record_in_summary
from perpcs.engine.generation import predict_variants, write_variant_files
from perpcs.engine.training import train
from perpcs.errors import fail
from perpcs.models.lora import check_adapter_files, is_complete_adapter, resolve_lora_ckpt, save_peft_adapter
from perpcs.paths import split_output_dir, stage_dirs
from perpcs.stages.common import as_json, lora_record, stage_manifest, users_data
from perpcs.stages.config import TaskLoRAStage


def init_data_parallel(device: str) -> tuple:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on GPUs, gloo on CPUs); (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    from perpcs.models.devices import resolve_device
    if not dist.is_initialized():
        dev = resolve_device(device)   # cuda:LOCAL_RANK under torchrun on GPUs
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def task_lora_examples(task, users: list, profiles: dict, profiles_path) -> list:
    """docs/method.md section 4: each query of each base user with profile text + BM25 top-1 of the user's history; target gold."""
    examples = []
    for ui, user in enumerate(users):
        history = UserHistory(task, user["profile"])
        prof = profile_text(profiles, user, profiles_path, ui)
        examples.extend(query_example(task, q, history, 1, prof) for q in user["query"])
    return examples


def training_source(cfg: TaskLoRAStage, base_users: list, profiles: dict) -> dict:
    """What the task LoRA is made from (its source.json): the base model, the LoRA and training settings, the base
    users' data (history, queries with golds, profile text). A rerun reuses the adapter only if all match."""
    from perpcs.models.provenance import base_model_fingerprint
    from perpcs.stages.manifest import canonical_sha256
    settings = {"lora": lora_record(cfg.lora), "train": asdict(cfg.train)}
    data = [{"user": u, "profile_text": profiles.get(str(u["user_id"]))} for u in base_users]
    return {"base_model": base_model_fingerprint(cfg.inputs.model.llama_model_path),
            "settings_sha256": canonical_sha256(as_json(settings)),
            "base_users_sha256": canonical_sha256(data)}


def run(cfg: TaskLoRAStage) -> Path:
    """Stage 1 under this folder's lock (rank 0 of a data-parallel run: the only one that writes)."""
    from perpcs.stages.manifest import folder_lock

    inputs, m = cfg.inputs, cfg.inputs.model
    task = get_task(inputs.task_name)
    layout = Layout(inputs.data_dir, task)
    out_dir = Path(cfg.output_dir or stage_dirs(task.name)["base_only" if cfg.base_only else "task_lora"])
    if cfg.base_only and cfg.infer:
        fail("--base_only predicts without any LoRA; --infer loads the task LoRA: pass one of them")
    # read and validate every input before the (slow) model load
    test_users, golds = layout.load_targets(cfg.test_split)
    profiles = layout.load_profiles()
    base_users = None if cfg.infer or cfg.base_only else layout.load_split("base", need_gold=True, check=True)
    loading = not cfg.base_only and (cfg.infer or (is_complete_adapter(out_dir) and not cfg.overwrite))
    if loading:   # a damaged adapter is named now, not as peft's traceback after the model load
        check_adapter_files(resolve_lora_ckpt(inputs.lora_ckpt) if inputs.lora_ckpt else resolve_lora_ckpt(out_dir))
    rank, world = init_data_parallel(m.device)
    with folder_lock(out_dir) if rank == 0 else contextlib.nullcontext():
        return train_and_predict(cfg, task, layout, out_dir, test_users, profiles, base_users, rank)


def train_and_predict(cfg: TaskLoRAStage, task, layout, out_dir: Path, test_users, profiles, base_users,
                      rank: int) -> Path:
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    from perpcs.atomic import write_json_atomic
    from perpcs.models.loading import load_base_model
    from perpcs.models.lora import lora_config
    from perpcs.models.provenance import SOURCE_FILE, adapter_sha256, base_model_fingerprint, read_source
    from perpcs.stages.manifest import MANIFEST_FILE, differences, describe_differences

    inputs, m = cfg.inputs, cfg.inputs.model
    source = None if cfg.infer or cfg.base_only else training_source(cfg, base_users, profiles)
    reuse = not cfg.base_only and not cfg.infer and is_complete_adapter(out_dir) and not cfg.overwrite
    if reuse:   # checked before the model load: a rerun with other settings must not pass the old LoRA off as its own
        had = read_source(out_dir / SOURCE_FILE)
        diffs = differences(had, source) if had is not None else None
        if diffs is None or diffs:
            what = (f"made from other inputs or settings ({describe_differences(diffs)})" if diffs else
                    f"with no record of what it was trained on ({SOURCE_FILE}; made by an older version?)")
            fail(f"{out_dir} holds a task LoRA {what}; pass --overwrite to train it again, --infer to predict with it "
                 f"as it is, or another --output_dir")
    model, tokenizer, device = load_base_model(m.llama_model_path, m.tokenizer_path, m.device, cpu_bf16=m.cpu_bf16)
    if cfg.base_only:
        print("no LoRA (--base_only): the base model's predictions")
        adapter_dir = None
    elif cfg.infer or reuse:
        adapter_dir = resolve_lora_ckpt(inputs.lora_ckpt) if inputs.lora_ckpt else resolve_lora_ckpt(out_dir)
        print(f"loading the task LoRA from {adapter_dir}" + ("" if cfg.infer else " (already trained)"))
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    else:
        examples = task_lora_examples(task, base_users, profiles, layout.profiles)
        set_seed(cfg.train.seed)   # the LoRA's A init
        model = get_peft_model(model, lora_config(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                                  cfg.lora.target_modules))
        print(f"training the task LoRA on {len(examples)} queries of {len(base_users)} base users")
        out_dir.mkdir(parents=True, exist_ok=True)
        stats = train(model, tokenizer, examples, cfg.train, device, desc=f"task LoRA ({task.name})",
                      log_path=out_dir / "train_log.jsonl")
        if rank != 0:   # data parallel: rank 0 saves and predicts
            return out_dir
        save_peft_adapter(model, out_dir, {SOURCE_FILE: source})
        adapter_dir = out_dir
        print(f"saved the task LoRA to {out_dir} ({stats['steps']} steps, last loss {stats['last_loss']:.4f}, "
              f"{stats['tokens_per_s']:.0f} tokens/s)")
        print(describe("task LoRA training", stats["truncated"], "examples"))
        record_in_summary(out_dir, {"examples": stats["truncated"]})
    if rank != 0:
        return out_dir
    if not cfg.base_only:
        model = model.merge_and_unload()   # faster generation; the adapter on disk is unchanged

    pred_root = split_output_dir(out_dir, cfg.test_split)
    pred_dir = pred_root / "predictions"
    gen = cfg.generation
    # The predictions are made again on every run (never resumed); their manifest says what made them. It is
    # removed first so that a run killed while predicting leaves no record claiming the old files as its own.
    manifest = stage_manifest(
        "task_lora_predictions",
        {"generation": gen.recorded(task), "base_only": cfg.base_only,
         "lora_settings_sha256": source["settings_sha256"] if source else None},
        users_data(task, [(str(u["user_id"]), u) for u in test_users], profiles, queries=True),
        {"base_model": source["base_model"] if source else base_model_fingerprint(m.llama_model_path),
         "task_lora_sha256": adapter_sha256(adapter_dir) if adapter_dir is not None else None}, m)
    (pred_root / MANIFEST_FILE).unlink(missing_ok=True)
    shortened = {}
    preds = predict_variants(model, tokenizer, task, test_users, profiles, device, k_list=gen.k_list,
                             max_new_tokens=gen.max_gen_len, profiles_path=layout.profiles, shortened=shortened,
                             show_progress=True, **gen.kwargs())
    write_variant_files(pred_dir, task, preds)
    write_json_atomic(pred_root / MANIFEST_FILE, manifest.to_json())
    where = record_in_summary(pred_root, {"prompts": shortened})
    what = "base model predictions" if cfg.base_only else "task LoRA predictions"
    print(describe(what, shortened, "prompts") + f" -> {where}")
    n_queries = sum(len(u["query"]) for u in test_users)
    print(f"predictions for {n_queries} {cfg.test_split} queries in {pred_dir}")
    return out_dir
