"""GPU benchmark of the four heavy stages, run through the project's own code paths, on a random-init model
of the exact Llama-2-7b shape (bf16, sdpa, LoRA r8 on q/k/v/o), against the original Per-Pcs timings (one H200).

On the lent GPU machine, bench/gpu_session.sh runs this with its variants (and the stage tests on CUDA) in one
call; see its header. That machine has no network; its python3 already holds torch 2.11+cu130, transformers
5.17 (the full test suite passes with 5.17 here), peft, safetensors, numpy and tqdm, all this needs. By hand:

    PYTHONUNBUFFERED=1 python3 bench/bench_gpu.py --json $OUT/gpu.json

To time the pinned transformers/peft there instead, carry their wheels (pure Python) and put them first on
PYTHONPATH.
On a CUDA machine with network, first `python3 -m pip install -q -r requirements.txt` (the pinned versions;
the torch 2.13 CUDA wheel and its nvidia-* dependencies are several GB, so that takes minutes), then the same.
Estimated (not yet measured) run time on an H200: 2-3 minutes, most of it the 1,000-prompt generation workload.

Smoke test on the CPU (tiny shape, fp32, < 30 s): python bench/bench_gpu.py --smoke
Not a test of correctness: timings depend on the machine; random token ids (speed does not depend on values).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from perpcs.method.pieces import ADAPTER_PREFIX, PiecePool, composed_lora_model, load_composed
from perpcs.method.composition import ComposeSettings, Composer, assemble_user, composer_removed, install_composer
from perpcs.errors import fail, run_cli  # noqa: E402
from perpcs.method.gates import GATES_FILE, GatedInput, install_gates, remove_gates, save_gates  # noqa: E402
from perpcs.engine.generation import generate  # noqa: E402
from perpcs.models.lora import lora_config, targeted_module_names  # noqa: E402
from perpcs.models.devices import resolve_device  # noqa: E402
from perpcs.data.prompts import Example  # noqa: E402
from perpcs.engine.training import IGNORE_INDEX, Tokenized, TrainConfig, train  # noqa: E402

WORKS = ("train", "gate", "compose", "generate")
PAD_ID = 0
FIRST_TOKEN_ID = 3   # random ids start above pad/bos/eos-like ids

# The original Per-Pcs code on one H200 (bf16, Llama-2-7b shape), and the targets set for this project.
ORIGINAL = {
    "train": {"tokens_per_s": 8575, "s_per_step": 0.358, "peak_gib": 15.3},
    "gate": {"tokens_per_s": 7854, "s_per_step": 0.391},
    "compose": {"s_per_user": 4.53},
    "generate": {"s_per_batch": 0.573, "new_tokens_per_s": 279},
}
TARGET_FACTORS = {"train.tokens_per_s": 2.0, "compose.s_per_user": 4.53 / 1.3,
                  "generate.workload_new_tokens_per_s": 4.0}


@dataclass
class Shape:
    """Model shape and workload sizes; the defaults are the original measurements'."""
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    intermediate: int = 11008
    vocab: int = 32000
    seq_len: int = 512          # tokens per row, everywhere
    answer_len: int = 16        # loss / scoring on the last answer_len tokens of each row
    train_batch: int = 6
    sharers: int = 50
    compose_rows: int = 100     # history rows of one target user
    compose_batch: int = 16
    topk: int = 3
    compose_users: int = 3      # timed target users (after one untimed warm-up user)
    gen_rows: int = 16          # prompts of the per-batch generation timing
    new_tokens: int = 10
    gen_prompts: int = 1000     # prompts of the generation workload
    gen_batch: int = 128        # batch size of the generation workload


LLAMA2_7B = Shape()
SMOKE = Shape(hidden=64, layers=2, heads=4, intermediate=172, vocab=512, seq_len=32, answer_len=4,
              sharers=4, compose_rows=8, compose_batch=4, compose_users=2, gen_rows=4, gen_prompts=12, gen_batch=8)


# ---------------------------------------------------------------- model, tokens, timing

def build_model(shape: Shape, device: torch.device, dtype: torch.dtype):
    """A random-init Llama of ``shape``, built directly on the device (no weights, no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=PAD_ID,
                         bos_token_id=None, eos_token_id=None)   # no EOS: every row generates all new tokens
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model.eval()


class IdTokenizer:
    """Text is token ids written out ("17 5 230"): the project's tokenizing code paths run unchanged,
    and the benchmark chooses every token id and length."""
    pad_token_id = PAD_ID
    eos_token_id = None   # train() then appends no EOS, so rows are exactly seq_len long
    bos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def random_rows(n: int, length: int, vocab: int, generator: torch.Generator) -> list:
    return torch.randint(FIRST_TOKEN_ID, vocab, (n, length), generator=generator).tolist()


def as_text(ids) -> str:
    return " ".join(map(str, ids))


def train_examples(rows: list, answer_len: int) -> list:
    """Examples whose answer (the loss) is the last answer_len tokens of each row."""
    return [Example(as_text(r[:-answer_len]), " " + as_text(r[-answer_len:]), f"row {i}") for i, r in enumerate(rows)]


def scoring_rows(rows: list, answer_len: int) -> list:
    """Tokenized history rows for composition: pieces are scored on the last answer_len positions."""
    return [Tokenized(r, [IGNORE_INDEX] * (len(r) - answer_len) + r[-answer_len:], f"row {i}")
            for i, r in enumerate(rows)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds), with the device idle at both ends so queued kernels are counted."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device):
    """Peak allocated GPU memory since the last reset (weights included); None on the CPU."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tflop_rate(tflop: float, seconds: float) -> float:
    return float(f"{tflop / seconds:.4g}")


def decoder_tflop(shape: Shape, tokens: int) -> float:
    """Approximate forward matmul work of the decoder layers on ``tokens`` tokens of seq_len-token rows
    (q/k/v/o + MLP weights, causal attention); embeddings, norms and the LM head are left out. Training
    counts it twice: the forward plus the backward to the inputs (the frozen base weights get no gradient);
    the forward that gradient checkpointing repeats is not counted, as it is not useful work."""
    h, i = shape.hidden, shape.intermediate
    per_token = shape.layers * (2 * (4 * h * h + 3 * h * i) + 2 * shape.seq_len * h)
    return tokens * per_token / 1e12


# ---------------------------------------------------------------- 1, 2: sharer LoRA and gate training

def bench_training(model, shape: Shape, args, device, generator, desc: str) -> dict:
    """Time train() (the project's loop: answer-only loss, AdamW, clip) on steps batches of random rows."""
    tokenizer = IdTokenizer()
    cfg = TrainConfig(batch_size=shape.train_batch, epochs=1, max_seq_len=shape.seq_len, grad_ckpt=args.grad_ckpt)

    def run(n_steps: int) -> dict:
        rows = random_rows(n_steps * shape.train_batch, shape.seq_len, shape.vocab, generator)
        return train(model, tokenizer, train_examples(rows, shape.answer_len), cfg, device, desc=desc,
                     show_progress=False)

    if args.warmup:
        run(args.warmup)
    reset_peak(device)
    stats, seconds = timed(lambda: run(args.steps), device)
    if stats["steps"] != args.steps or stats["tokens"] != args.steps * shape.train_batch * shape.seq_len:
        fail(f"{desc}: expected {args.steps} steps of {shape.train_batch}x{shape.seq_len} tokens, "
             f"train() ran {stats['steps']} steps on {stats['tokens']} tokens")
    tokens = stats["tokens"]
    return {"grad_ckpt": args.grad_ckpt, "steps": args.steps, "tokens_per_step": tokens // args.steps,
            "s_per_step": round(seconds / args.steps, 4), "tokens_per_s": round(tokens / seconds, 1),
            "peak_gib": peak_gib(device), "last_loss": round(stats["last_loss"], 4),
            "approx_tflop_per_s": tflop_rate(2 * decoder_tflop(shape, tokens), seconds)}


def bench_train_and_gate(model, shape: Shape, args, device, generator, works: set) -> tuple:
    """Sharer LoRA training, then gate training on that (now frozen) LoRA; returns (model, results)."""
    from peft import get_peft_model

    results = {}
    peft_model = get_peft_model(model, lora_config())
    try:
        if "train" in works:
            results["train"] = bench_training(peft_model, shape, args, device, generator, "bench sharer LoRA")
            print(f"train: {results['train']}", flush=True)
        if "gate" in works:
            fresh_compile_cache(args)
            install_gates(peft_model)
            results["gate"] = bench_training(peft_model, shape, args, device, generator, "bench gates")
            remove_gates(peft_model)
            print(f"gate: {results['gate']}", flush=True)
    finally:
        model = peft_model.unload()
        free_memory(device)
    return model, results


# ---------------------------------------------------------------- 3: composition

def small_random(shape: tuple, generator, dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def write_pool(root: Path, model, n_sharers: int, generator) -> list:
    """Random sharer LoRAs and gates in the standard layout (anchor/user_<id>/, gate/user_<id>/); also used by
    bench_stage5.py."""
    modules = dict(model.named_modules())
    pieces = targeted_module_names(model, lora_config().target_modules)
    dtype = next(model.parameters()).dtype   # sharer adapters are saved in the model's dtype
    rank = lora_config().r
    config_file = root / "adapter_config.json"
    lora_config().save_pretrained(str(root))
    sharer_ids = [f"s{i}" for i in range(n_sharers)]
    for uid in sharer_ids:
        adapter_dir, gate_dir = root / "anchor" / f"user_{uid}", root / "gate" / f"user_{uid}"
        adapter_dir.mkdir(parents=True)
        gate_dir.mkdir(parents=True)
        tensors, gates = {}, {}
        for piece in pieces:
            d_in, d_out = modules[piece].in_features, modules[piece].out_features
            tensors[f"{ADAPTER_PREFIX}{piece}.lora_A.weight"] = small_random((rank, d_in), generator, dtype)
            tensors[f"{ADAPTER_PREFIX}{piece}.lora_B.weight"] = small_random((d_out, rank), generator, dtype)
            gates[piece] = GatedInput(d_in, torch.nn.Identity())
            gates[piece].gate.data = torch.randn(d_in, generator=generator)
        save_file(tensors, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(config_file, adapter_dir / "adapter_config.json")
        save_gates(gates, gate_dir / GATES_FILE)
    return sharer_ids


def pool_gib(pool: PiecePool) -> float:
    tables = (pool.A, pool.B, pool.G)
    return round(sum(t.numel() * t.element_size() for table in tables for t in table.values()) / 2**30, 3)


def bench_compose(model, shape: Shape, args, device, generator) -> dict:
    """Seconds per target user: assemble_user over its history rows plus loading its LoRA into the peft model that
    predicts (load_composed), as stage 5 does. The pool is written and read once, outside the timing."""
    root = Path(tempfile.mkdtemp(prefix="perpcs-bench-pool-", dir=args.tmp_dir))
    try:
        sharer_ids, write_s = timed(lambda: write_pool(root, model, shape.sharers, generator), device)
        pool, read_s = timed(lambda: PiecePool(sharer_ids, root / "anchor", root / "gate", device=device), device)
    finally:
        shutil.rmtree(root, ignore_errors=True)   # the pool is in memory now
    settings = ComposeSettings(topk=min(shape.topk, shape.sharers), batch_size=shape.compose_batch)
    settings.check(len(pool))
    peft_model = composed_lora_model(model, pool)
    composer = Composer(pool, settings)
    install_composer(model, composer)

    def one_user(seed: int) -> None:
        rows = scoring_rows(random_rows(shape.compose_rows, shape.seq_len, shape.vocab, generator), shape.answer_len)
        sync(device)
        t0 = time.perf_counter()
        with peft_model.disable_adapter():
            weights, _ = assemble_user(model, composer, rows, PAD_ID, device, seed, f"bench user {seed}")
        with composer_removed(model):
            load_composed(peft_model, pool, weights)
        sync(device)
        return time.perf_counter() - t0

    one_user(0)   # warm-up
    reset_peak(device)
    seconds = [one_user(seed) for seed in range(1, shape.compose_users + 1)]
    return {"sharers": len(pool), "pieces": len(pool.pieces), "rows": shape.compose_rows,
            "batch": shape.compose_batch, "topk": settings.topk, "users_timed": len(seconds),
            "s_per_user": round(statistics.mean(seconds), 4), "s_per_user_min": round(min(seconds), 4),
            "pool_write_s": round(write_s, 4), "pool_read_s": round(read_s, 4), "pool_gib": pool_gib(pool),
            "peak_gib": peak_gib(device),
            "approx_tflop_per_s": tflop_rate(decoder_tflop(shape, shape.compose_rows * shape.seq_len),
                                              statistics.mean(seconds))}


# ---------------------------------------------------------------- 4: generation

def bench_generate(model, shape: Shape, args, device, generator) -> dict:
    """One batch of gen_rows prompts (median of 3), then gen_prompts prompts at batch gen_batch."""
    tokenizer = IdTokenizer()

    def prompts(n: int) -> list:
        return [as_text(r) for r in random_rows(n, shape.seq_len, shape.vocab, generator)]

    def run(texts: list, batch_size: int) -> int:
        outputs = generate(model, tokenizer, texts, shape.new_tokens, device, temperature=0, batch_size=batch_size,
                           kv_cache=args.kv_cache)
        return sum(len(o.split()) for o in outputs)   # new tokens actually produced

    batch = prompts(shape.gen_rows)
    run(batch, shape.gen_rows)   # warm-up
    reset_peak(device)
    timings = [timed(lambda: run(batch, shape.gen_rows), device) for _ in range(3)]
    batch_new = timings[0][0]
    batch_s = statistics.median(s for _, s in timings)

    workload = prompts(shape.gen_prompts)
    run(workload[:shape.gen_batch], shape.gen_batch)   # warm-up at the workload's batch size
    workload_new, workload_s = timed(lambda: run(workload, shape.gen_batch), device)
    expected = shape.new_tokens * (shape.gen_rows + shape.gen_prompts)
    if batch_new + workload_new != expected:
        print(f"warning: generation made {batch_new + workload_new} new tokens, expected {expected}", flush=True)
    return {"kv_cache": args.kv_cache, "prompt_tokens": shape.seq_len, "new_tokens": shape.new_tokens,
            "batch": shape.gen_rows,
            "s_per_batch": round(batch_s, 4), "new_tokens_per_s": round(batch_new / batch_s, 1),
            "workload_prompts": shape.gen_prompts, "workload_batch": shape.gen_batch,
            "workload_s": round(workload_s, 4), "workload_new_tokens_per_s": round(workload_new / workload_s, 1),
            "peak_gib": peak_gib(device),
            "approx_tflop_per_s": tflop_rate(decoder_tflop(shape, shape.gen_prompts * shape.seq_len), workload_s)}


# ---------------------------------------------------------------- report

# (work, metric, label, higher is better)
TABLE_ROWS = (
    ("train", "tokens_per_s", "sharer LoRA train tokens/s", True),
    ("train", "s_per_step", "sharer LoRA train s/step", False),
    ("train", "peak_gib", "sharer LoRA train peak GiB", False),
    ("gate", "tokens_per_s", "gate train tokens/s", True),
    ("gate", "s_per_step", "gate train s/step", False),
    ("compose", "s_per_user", "composition s/target user", False),
    ("generate", "s_per_batch", "generate s/batch", False),
    ("generate", "new_tokens_per_s", "generate new tokens/s (batch)", True),
    ("generate", "workload_new_tokens_per_s", "generate new tokens/s (workload)", True),
)


def table_rows(works: dict) -> list:
    """Measured vs original; ratio is the speed-up (>1 is better) for speeds and times alike."""
    rows = []
    for work, metric, label, higher_better in TABLE_ROWS:
        measured = works.get(work, {}).get(metric)
        if measured is None:
            continue
        # the workload is compared with the original's only generation speed, at batch 16
        original = ORIGINAL[work].get("new_tokens_per_s" if metric.startswith("workload") else metric)
        factor = TARGET_FACTORS.get(f"{work}.{metric}")
        target = None if factor is None or original is None else (
            round(original * factor, 1) if higher_better else round(original / factor, 2))
        ratio = None
        if original and measured:
            ratio = round(measured / original if higher_better else original / measured, 2)
        rows.append({"work": label, "measured": measured, "original": original, "target": target, "ratio": ratio,
                     "meets_target": None if target is None else
                     (measured >= target if higher_better else measured <= target)})
    return rows


def print_table(rows: list, smoke: bool) -> None:
    def cell(value) -> str:
        return "-" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)

    header = ("work", "measured", "original", "target", "ratio")
    lines = [header] + [tuple(cell(r[k]) for k in header) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    if smoke:
        print("(smoke shape: the original numbers are for the 7B shape on an H200, ratios mean nothing here)")


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import peft
    import transformers

    env = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU in fp32 (a quick check, < 30 s)")
    p.add_argument("--only", default=",".join(WORKS), help=f"comma-separated subset of {','.join(WORKS)}")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 2; smoke 1)")
    p.add_argument("--gen_batch", type=int, default=None, help="batch size of the generation workload (default 128)")
    p.add_argument("--gen_prompts", type=int, default=None,
                   help="prompts in the generation workload (default 1000)")
    p.add_argument("--grad_ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing in train and gate (default on; --no-grad_ckpt turns it off)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer first (experimental; compile time falls in the warm-ups)")
    p.add_argument("--kv_cache", default="dynamic", choices=["dynamic", "static"],
                   help="generation's KV cache (static: transformers compiles the decoding step on CUDA)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present; the CPU with --smoke), cpu, cuda, cuda:N")
    p.add_argument("--tmp_dir", default=None,
                   help="where the sharer pool is written for a moment (default: the system temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def resolve_settings(args):
    works = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in works if w not in WORKS]
    if unknown or not works:
        fail(f"--only {args.only!r}: unknown work {', '.join(unknown) or '(none given)'}; "
             f"choose from {','.join(WORKS)}")
    shape = SMOKE if args.smoke else LLAMA2_7B
    if args.gen_batch is not None:
        shape = replace(shape, gen_batch=args.gen_batch)
    if args.gen_prompts is not None:
        shape = replace(shape, gen_prompts=args.gen_prompts)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    for flag in ("steps", "gen_batch", "gen_prompts"):
        value = args.steps if flag == "steps" else getattr(shape, flag)
        if value < 1:
            fail(f"--{flag} must be at least 1, got {value}")
    if args.warmup < 0:
        fail(f"--warmup must be 0 or more, got {args.warmup}")
    device = resolve_device("cpu" if args.smoke and args.device == "auto" else args.device)
    return set(works), shape, device


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place (peft and the composer wrap modules inside the layers later,
    which the compiled layers pick up on their next call)."""
    for layer in model.get_decoder().layers:
        layer.compile()


def fresh_compile_cache(args) -> None:
    """Each work changes the layers (LoRA in or out, gates, checkpointing, composer): drop the graphs of the
    previous work, so its recompiles do not use up dynamo's recompile limit and fall back to eager.
    Generation alone needs several graphs (prefill and decode shapes, grad mode), hence the higher limit."""
    if args.compile:
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = 32


def main(argv=None) -> dict:
    args = parse_args(argv)
    works, shape, device = resolve_settings(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32   # as load_base_model
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model, build_s = timed(lambda: build_model(shape, device, dtype), device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters, {dtype}, {device}, "
          f"built in {build_s:.1f} s", flush=True)
    if args.compile:
        compile_layers(model)
    results = {}
    if works & {"train", "gate"}:
        fresh_compile_cache(args)
        model, trained = bench_train_and_gate(model, shape, args, device, generator, works)
        results.update(trained)
    if "generate" in works:
        fresh_compile_cache(args)
        results["generate"] = bench_generate(model, shape, args, device, generator)
        print(f"generate: {results['generate']}", flush=True)
    if "compose" in works:   # last: it leaves the composer's wrappers and a peft LoRA in the model
        fresh_compile_cache(args)
        results["compose"] = bench_compose(model, shape, args, device, generator)
        print(f"compose: {results['compose']}", flush=True)
    works_out = {w: results[w] for w in WORKS if w in results}
    rows = table_rows(works_out)
    print()
    print_table(rows, args.smoke)
    report = {"smoke": args.smoke, "shape": asdict(shape), "steps": args.steps, "warmup": args.warmup,
              "compile": args.compile, "kv_cache": args.kv_cache, "environment": environment(device, dtype),
              "original": ORIGINAL, "works": works_out, "table": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"results -> {args.json}")
    return report


if __name__ == "__main__":
    run_cli(main)
