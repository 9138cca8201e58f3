"""How much padding the training batches carry, with and without length grouping (--group_by_length).

Counts, no model run: for every task, the stage-1 examples (base users' queries with profile + BM25 top-1)
and the sharer examples (candidates' histories), tokenized as training tokenizes them, batched as train()
batches them (several seeds), and the tokens a forward pass processes (batch width x rows) divided by the
real tokens. 1.00 means no padding; the training time of a step grows with the processed tokens.

    python bench/bench_padding.py                       # generated sample data, all seven tasks
    python bench/bench_padding.py --data_dir data --tasks news_headline --tokenizer /path/to/llama-2-7b
    python bench/bench_padding.py --tasks news_headline --time_steps 8   # also times train() both ways (CPU)

On real LaMP data (prepared with data/prepare_lamp.py) this measures the padding of a real run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from perpcs.data.layout import Layout, profile_text, user_id  # noqa: E402
from perpcs.data.prompts import history_examples  # noqa: E402
from perpcs.data.tasks import TASKS, get_task  # noqa: E402
from perpcs.stages.task_lora import task_lora_examples  # noqa: E402
from perpcs.engine.training import TrainConfig, make_batches, tokenize_example  # noqa: E402


def sample_layout(task_name: str, root: Path) -> Layout:
    """Generated sample data in the project layout, with a placeholder profile text per user."""
    from perpcs.data.layout import all_splits_users
    from perpcs.atomic import write_json_atomic
    from perpcs.data.prepare import prepare_lamp
    from perpcs.data.sample import write_sample

    write_sample(task_name, root / "raw", n_users=60, n_history=30, n_queries=4, seed=0)
    prepare_lamp(task_name, root / "raw", root / "data", n_test=10, verbose=False)
    layout = Layout(root / "data", get_task(task_name))
    write_json_atomic(layout.profiles, {user_id(u): "a short profile of the user's interests" * 3
                                        for u in all_splits_users(layout)})
    return layout


def example_sets(layout: Layout) -> dict:
    """{"stage 1": examples, "sharers": examples}: what task_LoRA.py and train_anchor_PEFT.py train on."""
    task = layout.task
    profiles = layout.load_profiles()
    base = layout.load_split("base", need_gold=True)
    sets = {"stage 1": task_lora_examples(task, base, profiles, layout.profiles)}
    sharer_examples = []
    for i, user in enumerate(layout.load_split("candidate")):
        prof = profile_text(profiles, user, layout.profiles, i) if task.uses_profile_in_history_training else None
        sharer_examples.extend(history_examples(task, user["profile"], prof))
    sets["sharers"] = sharer_examples
    return sets


def padding_ratio(lengths: list, batch_size: int, grouped: bool, seeds: int) -> float:
    """Mean over seeds of (sum over batches of rows x widest row) / real tokens, one epoch each."""
    ratios = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        batches = make_batches(len(lengths), batch_size, generator, lengths if grouped else None)
        processed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        ratios.append(processed / sum(lengths))
    return statistics.mean(ratios)


def time_training(examples: list, tokenizer, steps: int, batch_size: int) -> dict:
    """Real tokens/s of train() on SmolLM2 (CPU, bf16 autocast, no checkpointing), grouped vs random batches."""
    from peft import get_peft_model

    from perpcs.models.loading import load_base_model
    from perpcs.models.lora import lora_config
    from perpcs.engine.training import train

    model, tokenizer, device = load_base_model("smollm2", device="cpu")
    warm = get_peft_model(model, lora_config())   # the first steps of a process are slower (kernel set-up)
    train(warm, tokenizer, examples, TrainConfig(batch_size=batch_size, max_step=2, grad_ckpt=False, cpu_bf16=True),
          device, show_progress=False)
    model = warm.unload()
    out = {}
    for grouped in (False, True):
        peft_model = get_peft_model(model, lora_config())
        cfg = TrainConfig(batch_size=batch_size, epochs=1, max_step=steps, grad_ckpt=False, cpu_bf16=True,
                          max_seq_len=3000, group_by_length=grouped)
        t0 = time.perf_counter()
        stats = train(peft_model, tokenizer, examples, cfg, device, show_progress=False)
        seconds = time.perf_counter() - t0
        out["grouped" if grouped else "random"] = {"steps": stats["steps"], "real_tokens": stats["tokens"],
                                                   "seconds": round(seconds, 2),
                                                   "real_tokens_per_s": round(stats["tokens"] / seconds, 1)}
        model = peft_model.unload()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None, help="a prepared layout (default: generated sample data)")
    p.add_argument("--tasks", nargs="+", default=sorted(TASKS))
    p.add_argument("--tokenizer", default="smollm2", help="model dir whose tokenizer counts the tokens")
    p.add_argument("--batch_size", type=int, default=6, help="6 is the sharer / OPPU default batch")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max_seq_len", type=int, default=3000)
    p.add_argument("--time_steps", type=int, default=0,
                   help="also time this many train() steps on SmolLM2 both ways (first task, sharer examples)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from perpcs.models.loading import load_tokenizer, resolve_model_dir
    tokenizer = load_tokenizer(resolve_model_dir(args.tokenizer))
    results = {"tokenizer": args.tokenizer, "batch_size": args.batch_size, "seeds": args.seeds, "tasks": {}}
    tmp = tempfile.TemporaryDirectory(prefix="perpcs-padding-")
    print(f"{'task':18} {'examples':>9} {'':9} {'tokens':>8} {'min':>5} {'median':>6} {'max':>6} "
          f"{'random':>7} {'grouped':>8}")
    timing_examples = None
    for name in args.tasks:
        task = get_task(name)
        layout = Layout(args.data_dir, task) if args.data_dir else sample_layout(task.name, Path(tmp.name) / name)
        for which, examples in example_sets(layout).items():
            lengths = [len(tokenize_example(tokenizer, ex, args.max_seq_len).input_ids) for ex in examples]
            row = {"examples": len(examples), "real_tokens": sum(lengths), "min": min(lengths),
                   "median": int(statistics.median(lengths)), "max": max(lengths),
                   "random": round(padding_ratio(lengths, args.batch_size, False, args.seeds), 3),
                   "grouped": round(padding_ratio(lengths, args.batch_size, True, args.seeds), 3)}
            results["tasks"].setdefault(task.name, {})[which] = row
            print(f"{task.name:18} {row['examples']:9d} {which:9} {row['real_tokens']:8d} {row['min']:5d} "
                  f"{row['median']:6d} {row['max']:6d} {row['random']:7.3f} {row['grouped']:8.3f}", flush=True)
            if timing_examples is None and which == "sharers":
                timing_examples = examples
    if args.time_steps:
        results["timing"] = time_training(timing_examples, tokenizer, args.time_steps, args.batch_size)
        print(json.dumps(results["timing"]))
    tmp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
