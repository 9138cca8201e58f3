"""Stage 4: one gate vector per piece of each (frozen) sharer LoRA, and each sharer's mean summary beside its gates.

``--gate_objective published`` (default) trains each sharer's gates alone, as published (docs/method.md section
6); ``routing`` trains every sharer's gates together so that the composition's own score ranks the owner of a
batch first (docs/method.md section 7.1, perpcs/method/calibration.py). Either way each sharer's folder also gets
summary.safetensors, its mean score summary per piece (the reference of lora_composition.py
--score_calibration), its digest in the gates' source.json; a rerun on a finished folder only adds missing ones.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from perpcs.atomic import write_bytes_atomic, write_dir_atomic, write_json_atomic
from perpcs.data.layout import read_json
from perpcs.data.truncation import count_cuts, finish_per_user_stage, update_summary, user_entry
from perpcs.engine.training import tokenize_example, train, user_seed
from perpcs.errors import fail
from perpcs.method.calibration import (SUMMARY_FILE, example_summaries, fit_routing_gates,
                                       routing_report_line)
from perpcs.method.gates import GATES_FILE, install_gates, remove_gates, save_gates
from perpcs.method.pieces import piece_of_key
from perpcs.models.lora import check_adapter_files, is_complete_adapter, read_safetensors
from perpcs.models.provenance import SOURCE_FILE, adapter_sha256, file_sha256, read_source, refuse_other_sources
from perpcs.paths import resolve_sharer_lora_dir, user_file_name
from perpcs.stages.common import (made_from, run_per_user, sharer_run, stage_manifest, staging_dirs, user_dir,
                                user_record)
from perpcs.stages.config import SharerGateStage
from perpcs.stages.manifest import canonical_sha256, open_run

ROUTING_CACHE = "routing_summaries"   # --gate_objective routing: each sharer's per-example summaries, for resuming
ROUTING_REPORT = "routing_fit.json"


def adapter_pieces(adapter_dir: Path) -> list:
    """The piece names (model.layers.0.self_attn.q_proj, ...) of a peft adapter, in file order."""
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        named = [piece_of_key(k) for k in f.keys()]
    return [piece for piece, slot in filter(None, named) if slot == 0]


def write_tensors(path: Path, tensors: dict, kind: str) -> None:
    """A safetensors file written atomically, with one metadata entry (files must be reproducible)."""
    write_bytes_atomic(path, safetensors_bytes({k: v.contiguous() for k, v in tensors.items()},
                                               metadata={"format": kind}))


def summary_means(summaries: dict) -> dict:
    return {p: x.mean(dim=0) for p, x in summaries.items()}


def reference_summaries(gate_dir, sharer_ids: list) -> tuple:
    """([{piece: (d,)} mean summary of each sharer], {sharer: digest}) for --score_calibration: each sharer's
    summary.safetensors beside its gates, checked against the digest its gates' source.json records."""
    means, digests = [], {}
    for uid in sharer_ids:
        folder = Path(gate_dir) / user_file_name(uid)
        path = folder / SUMMARY_FILE
        recorded = (read_source(folder / SOURCE_FILE) or {}).get("summary_sha256")
        if not path.is_file() or recorded is None:
            fail(f"--score_calibration needs each sharer's mean summary beside its gates, and {path} "
                 f"{'is missing' if not path.is_file() else 'is not recorded in its source.json'} (gates trained "
                 f"before summaries existed): run train_anchor_gate.py again with the flags that trained "
                 f"{gate_dir}: it adds the missing summaries and keeps the gates")
        digests[uid] = file_sha256(path)
        if digests[uid] != recorded:
            fail(f"{path} is not the summary its gates' source.json records (changed since): run "
                 f"train_anchor_gate.py again with the flags that trained {gate_dir}")
        means.append(read_safetensors(path, "summary"))
    return means, digests


def train_sharer_gates(cfg: SharerGateStage) -> Path:
    """Stage 4: one gate per piece of each (frozen) sharer LoRA, on the sharer's last recent_k items."""
    from peft import PeftModel
    if cfg.recent_k < 1:
        fail(f"--recent_k must be at least 1, got {cfg.recent_k}")
    run = sharer_run(cfg.inputs, cfg.shards, cfg.anchor_idx_path, cfg.recent_k)
    routing = cfg.gate_objective == "routing"
    if routing and run.shard[0] > 1:
        fail("--gate_objective routing trains every sharer's gates together, in one process: run it without "
             "--num_shards (and without torchrun); only the summaries' forward passes scale with the sharers")
    anchor_dir = resolve_sharer_lora_dir(cfg.anchor_path or run.dirs["sharer_loras"])
    out_root = Path(cfg.output_dir or run.dirs["sharer_gates"])
    for uid, _ in run.sharers:   # every sharer LoRA readable before anything is written
        if not is_complete_adapter(user_dir(anchor_dir, uid)):
            fail(f"no sharer LoRA for user {uid!r} in {user_dir(anchor_dir, uid)} (run train_anchor_PEFT.py)")
        check_adapter_files(user_dir(anchor_dir, uid))
    base_cfg, examples = cfg.train, run.examples
    adapters = {uid: adapter_sha256(user_dir(anchor_dir, uid)) for uid, _ in run.sharers}
    settings = {"train": asdict(cfg.train), "recent_k": cfg.recent_k}
    if routing:   # recorded only when not published: the manifests of published runs stay as they are
        settings.update(gate_objective=cfg.gate_objective, routing_steps=cfg.routing_steps, routing_lr=cfg.routing_lr,
                        routing_temperature=cfg.routing_temperature)
    manifest = stage_manifest("sharer_gates", settings, run.data,
                              {**run.sources, "sharers": list(adapters), "sharer_adapters": adapters},
                              cfg.inputs.model)

    def source(uid) -> dict:   # what one sharer's gates are made from: its own LoRA among them
        extra = ({"gate_objective": "routing", "sharers_data_sha256": canonical_sha256(manifest.data)}
                 if routing else {})   # routing gates: from every sharer's data
        return made_from(manifest, uid, adapter_sha256=adapters[uid], **extra)

    def summaries(uid) -> tuple:
        """({piece: (n, d)}, cut counts): the sharer's examples on base + task model, no LoRA, and how many of
        them were shortened to fit --max_seq_len."""
        model, tokenizer, device = run.engine()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tokenized = [tokenize_example(tokenizer, ex, base_cfg.max_seq_len) for ex in examples[uid]]
        return (example_summaries(model, adapter_pieces(user_dir(anchor_dir, uid)), tokenized, pad_id, device,
                                  base_cfg.batch_size, cfg.inputs.model.cpu_bf16),
                count_cuts([t.cut for t in tokenized], base_cfg.max_seq_len))

    def write_gates(uid, write_gate_file, means: dict) -> None:   # the gates, the summary, their record
        def write(d: Path) -> None:
            write_gate_file(d / GATES_FILE)
            write_tensors(d / SUMMARY_FILE, means, "perpcs-summary")
            write_json_atomic(d / SOURCE_FILE, {**source(uid), "summary_sha256": file_sha256(d / SUMMARY_FILE)})
        write_dir_atomic(user_dir(out_root, uid), write)

    def work(uid, user):
        # gates of an older run (not --overwrite, which trains them again): only the summary is added
        if not cfg.shards.overwrite and gates_done(uid):
            means = summary_means(summaries(uid)[0])
            folder = user_dir(out_root, uid)
            write_tensors(folder / SUMMARY_FILE, means, "perpcs-summary")
            recorded = read_source(folder / SOURCE_FILE)
            write_json_atomic(folder / SOURCE_FILE, {**recorded, "summary_sha256": file_sha256(folder / SUMMARY_FILE)})
            return {"examples": len(examples[uid]), "summary_added": True}
        model, tokenizer, device = run.engine()
        means = summary_means(summaries(uid)[0])   # before the sharer's LoRA is put on the model
        seed = user_seed(base_cfg.seed, uid)
        peft_model = PeftModel.from_pretrained(model, str(user_dir(anchor_dir, uid)), is_trainable=False)
        try:
            gates = install_gates(peft_model)
            stats = train(peft_model, tokenizer, examples[uid], replace(base_cfg, seed=seed), device,
                          desc=f"gates {uid}", log_path=out_root / "train_log.jsonl")
            write_gates(uid, lambda path: save_gates(gates, path), means)
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

    def summary_done(uid) -> bool:
        folder = user_dir(out_root, uid)
        recorded = (read_source(folder / SOURCE_FILE) or {}).get("summary_sha256")
        return (folder / SUMMARY_FILE).is_file() and recorded == file_sha256(folder / SUMMARY_FILE)

    def done(uid) -> bool:
        return gates_done(uid) and summary_done(uid)

    with open_run(out_root, manifest, *run.shard, cfg.shards.overwrite,
                  lambda: [gates_done(u) for u, _ in run.sharers]):
        if routing:
            fit_routing(cfg, run, out_root, summaries, write_gates, done)
        else:
            run_per_user(run.sharers, done, work, "sharer gates", out_root / "users_log.jsonl", *run.shard,
                         cfg.shards.overwrite, staging_dirs(out_root))
        finish_per_user_stage("sharer gates", out_root, [uid for uid, _ in run.sharers])
    return out_root


def fit_routing(cfg: SharerGateStage, run, out_root: Path, summaries, write_gates, done) -> None:
    """--gate_objective routing: each sharer's per-example summaries (cached under routing_summaries/, so a killed
    run resumes from the sharers it had summarised), then every gate fitted together and written."""
    overwrite = cfg.shards.overwrite
    if not overwrite and all(done(uid) for uid, _ in run.sharers) and (out_root / ROUTING_REPORT).is_file():
        print("sharer gates (routing): every sharer's gates are done")
        record_routing_fit(out_root)
        return
    cache = out_root / ROUTING_CACHE

    def cached(uid) -> bool:
        return (cache / user_file_name(uid, ".safetensors")).is_file()

    def work(uid, user):
        tensors, cuts = summaries(uid)
        write_tensors(cache / user_file_name(uid, ".safetensors"), tensors, "perpcs-example-summaries")
        return {"examples": next(iter(tensors.values())).shape[0], "routing_summaries": True,
                "truncated": user_entry(uid, cuts)}

    run_per_user(run.sharers, cached, work, "routing summaries", out_root / "users_log.jsonl", 1, 0, overwrite,
                 [cache])
    per_sharer = [read_safetensors(cache / user_file_name(uid, ".safetensors"), "routing summaries")
                  for uid, _ in run.sharers]
    steps = cfg.routing_steps
    gates, report = fit_routing_gates(per_sharer, steps, cfg.routing_lr, cfg.routing_temperature,
                                      cfg.train.batch_size, cfg.train.seed)
    for i, (uid, _) in enumerate(run.sharers):
        mine = {p: g[i] for p, g in gates.items()}   # the published file format: one vector per piece
        write_gates(uid, lambda path: write_tensors(path, mine, "perpcs-gates"), summary_means(per_sharer[i]))
    report = {"sharers": [uid for uid, _ in run.sharers], "steps": steps, "batch_size": cfg.train.batch_size,
              "lr": cfg.routing_lr, "temperature": cfg.routing_temperature, **report}
    write_json_atomic(out_root / ROUTING_REPORT, report)
    record_routing_fit(out_root)
    print(routing_report_line(report) + f" -> {out_root / ROUTING_REPORT}")


def record_routing_fit(out_root: Path) -> None:
    """The fit's overall figures in summary.json, the stage's "done" file (a routing run logs no training, so no
    truncation totals may write it)."""
    report = read_json(out_root / ROUTING_REPORT, "routing fit report")
    update_summary(out_root, "routing_fit", {"report": ROUTING_REPORT, **{
        key: report.get(key) for key in ("steps", "held_out_top1", "train_top1", "chance_top1", "loss")}})
