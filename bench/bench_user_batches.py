"""Prediction throughput: many users per generation batch (--users_per_batch) against one user at a time.

Each of --users synthetic target users (the demo's sample data, LaMP-like: --queries queries, so 8 x queries
prompts each) has its own random LoRA (r 8 on q/k/v/o) as a named peft adapter. The per-user loop predicts
each user's 8 variants on its own adapter (batches of --gen_batch_size rows), as stage 5 and OPPU do with
--users_per_batch 1; the batched runs predict groups of users together, their prompts sorted by length into
batches of --gen_batch_size rows, each row on its own user's adapter (engine.generation.predict_users).
Greedy; the outputs must be identical, and the script exits 1 if not.

    python bench/bench_user_batches.py                          # the tests' tiny Llama and the bundled SmolLM2
    python bench/bench_user_batches.py --models tiny --users 32 --groups 8 32 --json out.json
    python bench/bench_user_batches.py --models llama7b --device cuda   # on a GPU (gpu_session.sh), bf16

In fp32 the batched outputs must equal the loop's (exit 1 otherwise); in bf16 (CUDA) batching users changes the
rows' GEMM shapes and so may change an answer (docs/reference.md: --users_per_batch auto keeps 1 user in bf16):
there the differing predictions are counted and reported, not an error.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from perpcs.engine.generation import predict_users, predict_variants  # noqa: E402

TASK = "movie_tagging"


def sample_users(root: Path, n_users: int, n_queries: int) -> tuple:
    """(task, the test users, profiles) of generated sample data with n_users test users."""
    from perpcs.atomic import write_json_atomic
    from perpcs.data.layout import Layout, all_splits_users, user_id
    from perpcs.data.prepare import prepare_lamp
    from perpcs.data.sample import write_sample
    from perpcs.data.tasks import get_task
    write_sample(TASK, root / "raw", n_users=n_users + 10, n_history=20, n_queries=n_queries, seed=0)
    prepare_lamp(TASK, root / "raw", root / "data", n_test=n_users, verbose=False)
    layout = Layout(root / "data", get_task(TASK))
    profiles = {user_id(u): "a short profile of the user's interests " * 3 for u in all_splits_users(layout)}
    write_json_atomic(layout.profiles, profiles)
    users, _ = layout.load_targets("test")
    return layout.task, users, profiles


def model_with_adapters(name: str, root: Path, n: int, device: str):
    """(peft model with n random LoRAs named user_0.., tokenizer, device): tiny, smollm2 or llama7b (a random model
    of Llama-2-7b's shape, bf16 on CUDA: bench_stage5.load_model)."""
    from peft import get_peft_model

    from bench_stage5 import load_model
    from perpcs.models.lora import lora_config
    model, tokenizer, dev = load_model(name, device, root)
    config = lora_config(8, 8, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
    peft_model = get_peft_model(model, config, adapter_name="user_0")
    for i in range(1, n):
        peft_model.add_adapter(f"user_{i}", config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:   # peft starts B at zero: every user's LoRA would be the base model
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.eval()
    return peft_model, tokenizer, torch.device(dev)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_user_loop(model, tokenizer, task, users, profiles, gen: dict, device: torch.device) -> tuple:
    sync(device)
    t0 = time.perf_counter()
    out = []
    for i, user in enumerate(users):
        model.set_adapter(f"user_{i}")
        out.append(predict_variants(model, tokenizer, task, [user], profiles, device, **gen))
    sync(device)
    return time.perf_counter() - t0, out


def batched(model, tokenizer, task, users, profiles, gen: dict, group: int, device: torch.device) -> tuple:
    sync(device)
    t0 = time.perf_counter()
    out = []
    for start in range(0, len(users), group):
        part = users[start:start + group]
        names = [f"user_{i}" for i in range(start, start + len(part))]
        out.extend(predict_users(model, tokenizer, task, part, profiles, device, adapter_names=names, **gen))
    sync(device)
    return time.perf_counter() - t0, out


def differing(got: list, expected: list) -> int:
    """Predictions (user x variant x query) whose text differs between two runs."""
    return sum(a != b for g, e in zip(got, expected) for stem in e for a, b in zip(g[stem], e[stem]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2", "llama7b"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--queries", type=int, default=1, help="queries per user (LaMP's test users have 1)")
    p.add_argument("--groups", type=int, nargs="+", default=[8, 32], help="users per batch to measure")
    p.add_argument("--gen_batch_size", type=int, default=16)
    p.add_argument("--max_gen_len", type=int, default=None, help="default: the task's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report, same = {"users": args.users, "queries": args.queries, "threads": args.threads, "device": args.device,
                    "models": {}}, True
    with tempfile.TemporaryDirectory() as tmp:
        task, users, profiles = sample_users(Path(tmp), args.users, args.queries)
        gen = dict(k_list=(1, 2, 4), max_new_tokens=args.max_gen_len, temperature=0, batch_size=args.gen_batch_size,
                   max_seq_len=3000)
        for name in args.models:
            model, tokenizer, device = model_with_adapters(name, Path(tmp), len(users), args.device)
            exact = next(model.parameters()).dtype == torch.float32   # fp32: batching must not change an answer
            print(f"{name} ({device.type}, {next(model.parameters()).dtype}): {len(users)} users x "
                  f"{8 * args.queries} prompts, one user at a time ...", flush=True)
            per_user_loop(model, tokenizer, task, users[:1], profiles, gen, device)   # warm-up (kernels, caches)
            loop_s, expected = per_user_loop(model, tokenizer, task, users, profiles, gen, device)
            entry = {"device": device.type, "dtype": str(next(model.parameters()).dtype), "per_user_loop_s":
                     round(loop_s, 3), "batched": {}}
            distinct = len({json.dumps(p, sort_keys=True) for p in expected})
            print(f"  one at a time: {loop_s:.2f} s ({distinct} distinct users' predictions)")
            for group in args.groups:
                seconds, got = batched(model, tokenizer, task, users, profiles, gen, group, device)
                n_diff = differing(got, expected)
                if exact:
                    same &= got == expected
                entry["batched"][group] = {"seconds": round(seconds, 3), "speedup": round(loop_s / seconds, 2),
                                           "identical": got == expected, "differing_predictions": n_diff}
                print(f"  {group} users per batch: {seconds:.2f} s, {loop_s / seconds:.2f}x, "
                      f"identical: {got == expected} ({n_diff} predictions differ)", flush=True)
            report["models"][name] = entry
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
