"""Stage 5 benchmark: what one target user costs in stage 5, split into its parts, against its floor and OPPU.

For each model and user size (LaMP-3-like users: product reviews of ~120 words, a profile text, --queries test
questions), through stage 5's own code with its published defaults (ComposeSettings(): top-3, batch 16,
recent_k 2000, one epoch; --max_seq_len 3500), on a pool of --sharers random sharer LoRAs and gates of the right
shapes (r 8 on q/k/v/o, written and read as stage 5 reads them: PiecePool):

  build_s          the user's history examples (stages.common.user_examples: every item, and again with the
                   profile and BM25 top-1)
  tokenize_s       engine.training.tokenize_example on each, fitted to --max_seq_len
  assembly_s       method.composition.assemble_user (the peft adapter disabled, as stage 5 runs it)
  scoring_mixing_s inside it: the composer's per-piece scoring, selection and mixing (instrument_composer)
  prediction_s     the user's LoRA loaded into peft (load_composed) and its 8 variants predicted
                   (stages.target_users.predict_one_user), composer removed, as stage 5 does
  floor_s          the SAME batches (assemble_user's) through a plain no-grad forward of the same decoder, composer
                   removed and adapter disabled: what the assembly would cost if the pieces were free
  tokens           real vs padded tokens of stage 5's batches
  oppu             OPPU's training of the same user at its published defaults (stages.config.OPPUStage: r 8 on
                   q/v, batch 16, 2 epochs, gradient checkpointing, --max_seq_len 3000): --oppu_steps steps timed
                   after one warm-up step, then extrapolated to the full run by padded tokens (the full run's
                   batches are rebuilt with engine.training.make_batches from the same seed); "extrapolated" says
                   whether it was

--max_batches N times the assembly and its floor on N batches of a seeded random sample of the user's examples
and scales both to the whole user by padded tokens (its batches drawn as stage 5 draws them): where a whole
user's passes take too long (SmolLM2 on a loaded CPU); "sampled" in the report says so.

Every part is timed in wall seconds and in this process's CPU seconds (``cpu_s``); each ratio comes in both forms
(``*_cpu``). On a machine shared with other jobs, run with --threads 1 and read the CPU ratios: wall time then
measures the neighbours. The base model carries no task LoRA (merging one changes no cost). Timings depend on the
machine and its load; read ratios from one run. One JSON report (--out); one progress line per measurement.

    python bench/bench_stage5.py --quick --out q.json                    # tiny model, small users (< 2 min)
    python bench/bench_stage5.py --models smollm2 --sizes 200,500 --out s.json
    python bench/bench_stage5.py --models llama7b --device cuda --sizes 200,2000   # on a GPU (gpu_session.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

import torch  # noqa: E402

from perpcs.data.tasks import get_task  # noqa: E402
from perpcs.engine.training import collate, count_steps, make_batches, tokenize_example, train, user_seed  # noqa: E402
from perpcs.method.composition import (ComposeSettings, Composer, assemble_user, composer_removed,  # noqa: E402
                                       install_composer, micro_batch_overhead, micro_batches)
from perpcs.method.pieces import PiecePool, composed_lora_model, load_composed  # noqa: E402
from perpcs.models.devices import autocast_context, resolve_device  # noqa: E402
from perpcs.stages.common import fresh_lora, user_examples  # noqa: E402
from perpcs.stages.config import CompositionStage, GenerationConfig, OPPUStage  # noqa: E402
from perpcs.stages.target_users import predict_one_user  # noqa: E402

TASK = "product_rating"
MODELS = ("tiny", "smollm2", "llama7b")
RATING_PROMPT = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
                 "or 5 without further explanation. review: ")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device, cpu: dict | None = None, key: str = ""):
    """(fn(), wall seconds); with ``cpu``, this process's CPU seconds go to cpu[key]: on a machine shared with
    other jobs they move far less than wall time (with one torch thread, no spinning counts)."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    if cpu is not None:
        cpu[key] = time.process_time() - c0
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ the one hook

def instrument_composer(composer: Composer, device) -> dict:
    """The bench's only reach into the composer's internals: wall seconds spent in its per-piece scoring,
    selection and mixing, today ``Composer._summary`` (a forward's pooled input, once per module input) and
    ``Composer._decide`` (scores, choice and mixed A and B, once per batch and piece); the LoRA term itself is
    computed outside them. Not ``piece_for``: with micro-batches it also waits for the other micro-batches' turns.
    If the composer's hot path is renamed or fused, adapt this function; when no known name is found, the report
    says so (hook None) and the split is left out rather than guessed."""
    timing = {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0, "hook": None}
    names = [name for name in ("_summary", "_decide") if getattr(composer, name, None) is not None]
    for name in names if len(names) == 2 else ():
        inner = getattr(composer, name)

        def timed(*args, _inner=inner, name=name, **kwargs):
            sync(device)   # on CUDA: count the kernels, not their launch
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                sync(device)
                timing["seconds"] += time.perf_counter() - t0
                timing["cpu_seconds"] += time.process_time() - c0
                timing["calls"] += name == "_decide"   # once per batch and piece
        setattr(composer, name, timed)   # an instance attribute: the class stays as it is
        timing["hook"] = " + ".join(f"Composer.{n}" for n in names)
    return timing


# ------------------------------------------------------------------------------------------ models, users

def load_model(name: str, device: str, work: Path):
    """(model, tokenizer, device) of a named model; weights in the dtype stage 5 would load them in."""
    from perpcs.models.loading import load_base_model
    if name == "tiny":
        from tiny import build_tiny_llama
        return load_base_model(str(build_tiny_llama(work / "tiny")), device=device)
    if name == "smollm2":
        return load_base_model("smollm2", device=device)
    # llama7b: a random model of Llama-2-7b's decoder shape (no weights to download) with the tiny tokenizer, its
    # vocabulary the tokenizer's (generated ids must decode; embeddings and LM head are a rounding error of the cost)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tiny import train_tokenizer
    dev = resolve_device(device)
    tokenizer = train_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), tokenizer, dev


def english_words(words):
    """bench_scale's Zipf vocabulary with its most frequent ranks made real English words (the sample data's word
    banks, ~1,450; about two thirds of the drawn words), so texts tokenize at nearly English rates while the
    vocabulary stays LaMP-like in size (the made-up tail)."""
    import re

    from importlib import resources
    found: set = set()

    def walk(x):
        if isinstance(x, str):
            found.update(w.lower() for w in re.findall(r"[A-Za-z]+", x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(json.loads(resources.files("perpcs").joinpath("resources/sample_words.json").read_text(encoding="utf-8")))
    real = sorted(found)
    words.rng.shuffle(real)
    words.vocab[:len(real)] = real[:len(words.vocab)]
    return words


def make_user(words, n_items: int, n_queries: int, uid: str, word_median: float) -> tuple:
    """(user record, profile text): n_items reviews as history, the next n_queries as test questions."""
    from bench_scale import review_items
    items = review_items(words, n_items + n_queries, word_median)
    user = {"user_id": uid,
            "profile": [{"id": f"{uid}-{i}", **it} for i, it in enumerate(items[:n_items])],
            "query": [{"id": f"{uid}-q{j}", "input": RATING_PROMPT + it["text"], "gold": it["score"]}
                      for j, it in enumerate(items[n_items:])]}
    profile = "The user " + words.texts([100])[0] + "."
    return user, profile


def padded_tokens(lengths: list, batches: list, overhead: float | None = None) -> tuple:
    """(real, padded) tokens of index batches: a batch is as wide as its longest row; with ``overhead`` (stage 5's
    micro-batching) each batch runs as the length-sorted micro-batches assemble_user cuts it into."""
    real = sum(lengths[i] for b in batches for i in b)
    if overhead is None:
        return real, sum(len(b) * max(lengths[i] for i in b) for b in batches)
    padded = 0
    for b in batches:
        rows = [lengths[i] for i in b]
        padded += sum(len(run) * max(rows[j] for j in run) for run in micro_batches(rows, overhead))
    return real, padded


# ------------------------------------------------------------------------------------------ measurements

def measure_oppu(model, tokenizer, examples: list, lengths: list, uid: str, device, steps: int, cpu_bf16: bool,
                 warmup: bool = True) -> dict:
    """OPPU's training of this user at its published defaults: ``steps`` steps timed (after a warm-up step unless
    ``warmup`` is off), then scaled by padded tokens to the full run (whose batches are those train() would draw
    from the same seed)."""
    fields = OPPUStage.__dataclass_fields__
    cfg = replace(fields["train"].default_factory(), cpu_bf16=cpu_bf16)
    cfg = replace(cfg, seed=user_seed(cfg.seed, uid))
    lora = fields["lora"].default_factory()
    lengths = [min(n, cfg.max_seq_len) for n in lengths]
    full_steps = count_steps(len(examples), cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    full = [b for _ in range(cfg.epochs)
            for b in make_batches(len(examples), cfg.batch_size, generator, lengths if cfg.group_by_length else None)]
    _, full_padded = padded_tokens(lengths, full)
    extrapolated = full_steps > steps
    peft_model = fresh_lora(model, lora, cfg.seed)
    try:
        if extrapolated:
            if warmup:
                train(peft_model, tokenizer, examples, replace(cfg, max_step=1), device, desc="warm-up",
                      show_progress=False)
            c0 = time.process_time()
            stats = train(peft_model, tokenizer, examples, replace(cfg, max_step=steps), device, desc=f"OPPU {uid}",
                          show_progress=False)
            cpu = time.process_time() - c0 - tokenize_cpu_s(tokenizer, examples, cfg.max_seq_len)
            _, timed_padded = padded_tokens(lengths, full[:steps])   # the first steps: the same seed's first batches
            seconds = stats["seconds"] / timed_padded * full_padded
            cpu_seconds = cpu / timed_padded * full_padded
        else:
            c0 = time.process_time()
            stats = train(peft_model, tokenizer, examples, cfg, device, desc=f"OPPU {uid}", show_progress=False)
            cpu_seconds = time.process_time() - c0 - tokenize_cpu_s(tokenizer, examples, cfg.max_seq_len)
            timed_padded, seconds = full_padded, stats["seconds"]
    finally:
        peft_model.unload()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "extrapolated": extrapolated, "steps_full": full_steps,
            "steps_timed": stats["steps"], "timed_s": stats["seconds"], "padded_tokens_full": full_padded,
            "padded_tokens_timed": timed_padded, "warmup_step": warmup and extrapolated, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "grad_ckpt": cfg.grad_ckpt, "r": lora.r,
            "target_modules": list(lora.target_modules)}


def tokenize_cpu_s(tokenizer, examples: list, max_seq_len: int) -> float:
    """CPU seconds of the tokenizing train() does before its clock starts (taken off its CPU time: its own
    "seconds" leave it out too)."""
    c0 = time.process_time()
    for ex in examples:
        tokenize_example(tokenizer, ex, max_seq_len)
    return time.process_time() - c0


@torch.no_grad()
def floor_pass(model, tokenized: list, batches: list, pad_id: int, device, cpu_bf16: bool) -> None:
    """The given batches through the decoder, nothing else: collate, forward (no LM head, as assembly)."""
    decoder = model.get_decoder()
    for idx in batches:
        batch = collate([tokenized[i] for i in idx], pad_id, device)
        with autocast_context(device, cpu_bf16):
            decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def run_model(name: str, args, work: Path, report: dict) -> None:
    from bench_gpu import write_pool
    from bench_scale import Words

    task = get_task(TASK)
    model, tokenizer, device = load_model(name, args.device, work)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    entry = report["models"][name] = {"parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                                      "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                                      "users": {}}
    log(f"{name}: {entry['parameters_m']} M parameters on {device}; RSS {rss_mb():.0f} MiB")
    max_seq_len = CompositionStage.__dataclass_fields__["max_seq_len"].default
    settings = ComposeSettings(seed=args.seed)
    words = english_words(Words(args.vocab, args.seed))
    users = {}
    # 1. per user: examples and tokens (stage 5's), then OPPU on the clean model (before stage 5's adapter)
    for n in args.sizes:
        uid = f"bench{n}"
        user, profile = make_user(words, n, args.queries, uid, args.words)
        cpu = {}
        examples, build_s = clock(lambda: user_examples(task, user, {uid: profile}, "profiles", 0, "bench users",
                                                        settings.recent_k), device, cpu, "build")
        tokenized, tokenize_s = clock(lambda: [tokenize_example(tokenizer, ex, max_seq_len) for ex in examples],
                                      device, cpu, "tokenize")
        lengths = [len(t.input_ids) for t in tokenized]
        row = entry["users"][str(n)] = {"items": n, "examples": len(examples), "mean_example_tokens":
                                        sum(lengths) / len(lengths), "build_s": build_s, "tokenize_s": tokenize_s,
                                        "cpu_s": cpu}
        log(f"{name} {n} items: {len(examples)} examples built in {build_s:.2f} s, tokenized in {tokenize_s:.2f} s "
            f"({row['mean_example_tokens']:.0f} tokens on average)")
        row["oppu"] = measure_oppu(model, tokenizer, examples, lengths, uid, device, args.oppu_steps, args.cpu_bf16,
                                   args.oppu_warmup)
        o = row["oppu"]
        log(f"{name} {n} items: OPPU {o['seconds']:.1f} s, CPU {o['cpu_seconds']:.1f} s "
            f"({'extrapolated from ' if o['extrapolated'] else ''}{o['steps_timed']} of {o['steps_full']} steps in "
            f"{o['timed_s']:.1f} s)")
        users[n] = (user, profile, tokenized)
        del examples
    # 2. stage 5's model: one peft LoRA for predictions, the composer around it, the pool beside the model
    generator = torch.Generator().manual_seed(args.seed)
    pool_dir = Path(tempfile.mkdtemp(dir=work))
    with torch.no_grad():
        sharer_ids = write_pool(pool_dir, model, args.sharers, generator)
    pool, pool_s = clock(lambda: PiecePool(sharer_ids, pool_dir / "anchor", pool_dir / "gate", device=device), device)
    settings.check(len(pool))
    entry.update({"sharers": len(pool), "pieces": len(pool.pieces), "pool_read_s": pool_s})
    peft_model = composed_lora_model(model, pool)
    composer = Composer(pool, settings)
    install_composer(model, composer)
    hook = instrument_composer(composer, device)
    overhead = micro_batch_overhead(args.split_batches, device)   # stage 5's default: length-sorted micro-batches
    if args.split_batches and args.micro_batch_overhead is not None:   # measuring the constant itself
        overhead = args.micro_batch_overhead
    generation = GenerationConfig(cpu_bf16=args.cpu_bf16)
    # one-time costs out of the first timed user: one batch of the shortest examples (cheap on any model)
    warm = sorted(users[args.sizes[0]][2], key=lambda t: len(t.input_ids))[:settings.batch_size]
    with peft_model.disable_adapter():
        assemble_user(model, composer, warm, pad_id, device, 0, "warm-up", cpu_bf16=args.cpu_bf16)
    for n in args.sizes:
        user, profile, tokenized = users[n]
        row = entry["users"][str(n)]
        cpu, uid = row["cpu_s"], user["user_id"]
        hook.update(seconds=0.0, cpu_seconds=0.0, calls=0)
        lengths = [len(t.input_ids) for t in tokenized]
        subset = tokenized   # --max_batches: a seeded random sample of the user's examples, scaled up below
        if args.max_batches and len(tokenized) > args.max_batches * settings.batch_size:
            pick = torch.randperm(len(tokenized), generator=torch.Generator().manual_seed(args.seed + n)).tolist()
            subset = [tokenized[i] for i in sorted(pick[:args.max_batches * settings.batch_size])]
        with peft_model.disable_adapter():
            (weights, batches), assembly_s = clock(lambda: assemble_user(
                model, composer, subset, pad_id, device, user_seed(settings.seed, uid), f"user {uid}",
                cpu_bf16=args.cpu_bf16, micro_batch_overhead=overhead), device, cpu, "assembly")
        hooked = hook["hook"] is not None
        cpu["scoring_mixing"] = hook["cpu_seconds"] if hooked else None
        log(f"{name} {n} items: assembly {assembly_s:.2f} s (CPU {cpu['assembly']:.2f} s) over {len(batches)} "
            f"batches" + (f"; scoring + mixing {hook['seconds']:.2f} s (CPU {hook['cpu_seconds']:.2f} s) in "
                          f"{hook['calls']} calls" if hooked else "; scoring + mixing not hooked"))
        with composer_removed(model), peft_model.disable_adapter():
            _, floor_s = clock(lambda: floor_pass(model, subset, batches, pad_id, device, args.cpu_bf16), device,
                               cpu, "floor")
        log(f"{name} {n} items: floor (plain forward, same batches) {floor_s:.2f} s (CPU {cpu['floor']:.2f} s); "
            f"assembly / floor {assembly_s / floor_s:.3f} wall, {cpu['assembly'] / cpu['floor']:.3f} CPU")

        def predict():
            with composer_removed(model):
                load_composed(peft_model, pool, weights)
                return predict_one_user(peft_model, tokenizer, task, user, {uid: profile}, "profiles", device,
                                        generation)
        preds, prediction_s = clock(predict, device, cpu, "prediction")
        log(f"{name} {n} items: prediction of {sum(len(r) for r in preds['predictions'].values())} prompts "
            f"(8 variants) {prediction_s:.2f} s (CPU {cpu['prediction']:.2f} s)")
        real, padded = padded_tokens([len(t.input_ids) for t in subset], batches, overhead)
        sampled = {"examples": len(subset), "batches": len(batches), "real": real, "padded": padded,
                   "assembly_s": assembly_s, "floor_s": floor_s, "scoring_mixing_s": hook["seconds"],
                   "cpu_s": {k: cpu[k] for k in ("assembly", "floor", "scoring_mixing")}} if subset is not tokenized \
            else None
        if sampled:   # the whole user: its batches drawn as stage 5 draws them (a seeded random order, batch 16)
            generator = torch.Generator().manual_seed(user_seed(settings.seed, uid))
            real_s, padded_s = real, padded
            real, padded = padded_tokens(lengths, make_batches(len(tokenized), settings.batch_size, generator), overhead)
            scale = padded / padded_s
            assembly_s, floor_s, hook["seconds"] = assembly_s * scale, floor_s * scale, hook["seconds"] * scale
            for k in ("assembly", "floor", "scoring_mixing"):
                cpu[k] = cpu[k] * scale if cpu[k] is not None else None
            sampled["scale"] = scale
            log(f"{name} {n} items: sampled {len(subset)} of {len(tokenized)} examples; assembly and floor scaled by "
                f"padded tokens x{scale:.2f} to the whole user (estimated {padded} padded tokens)")
        build = row["build_s"] + row["tokenize_s"]
        stage5_s = build + assembly_s + prediction_s
        cpu_build = cpu["build"] + cpu["tokenize"]
        cpu_stage5 = cpu_build + cpu["assembly"] + cpu["prediction"]
        oppu = row["oppu"]
        row.update({
            "assembly_s": assembly_s, "batches": -(-len(tokenized) // settings.batch_size), "sampled": sampled,
            "scoring_mixing_s": hook["seconds"] if hooked else None,
            "scoring_mixing_calls": hook["calls"], "scoring_mixing_hook": hook["hook"],
            "floor_s": floor_s, "prediction_s": prediction_s, "stage5_s": stage5_s,
            "tokens": {"real": real, "padded": padded, "padded_over_real": padded / real},
            # the ratios, from wall time and from this process's CPU time (the steadier on a shared machine)
            "assembly_over_floor": assembly_s / floor_s, "assembly_over_floor_cpu": cpu["assembly"] / cpu["floor"],
            "scoring_mixing_share_cpu": cpu["scoring_mixing"] / cpu["assembly"] if hooked else None,
            "lora_term_and_overhead_share_cpu": (cpu["assembly"] - cpu["floor"] - cpu["scoring_mixing"])
            / cpu["assembly"] if hooked else None,
            "build_share": build / stage5_s, "build_share_cpu": cpu_build / cpu_stage5,
            "oppu_over_assembly": oppu["seconds"] / assembly_s,
            "oppu_over_assembly_cpu": oppu["cpu_seconds"] / cpu["assembly"],
            "oppu_user_over_perpcs_user": (build + oppu["seconds"] + prediction_s) / stage5_s,
            "oppu_user_over_perpcs_user_cpu": (cpu_build + oppu["cpu_seconds"] + cpu["prediction"]) / cpu_stage5,
            "rss_mb_after": rss_mb()})
        log(f"{name} {n} items: padded / real tokens {padded / real:.3f}; OPPU / assembly "
            f"{row['oppu_over_assembly']:.2f} ({row['oppu_over_assembly_cpu']:.2f} CPU); building share "
            f"{row['build_share']:.1%}; RSS {row['rss_mb_after']:.0f} MiB")
        del users[n]
    entry["peak_rss_mb"] = peak_rss_mb()
    del model, peft_model, pool, composer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model, users of 10 and 20 short reviews, 8 "
                   "sharers, 1 OPPU step (a smoke run: well under 2 minutes)")
    p.add_argument("--models", default="tiny,smollm2", help=f"comma-separated of {','.join(MODELS)}")
    p.add_argument("--sizes", help="history items per user, comma-separated (default 200,500,1000,2000; --quick "
                   "10,20)")
    p.add_argument("--queries", type=int, default=1, help="test questions per user (LaMP: one per user)")
    p.add_argument("--sharers", type=int, default=50, help="the pool (stage 2's default k: 50)")
    p.add_argument("--oppu_steps", type=int, default=3, help="OPPU steps timed (after one warm-up step)")
    p.add_argument("--oppu_warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="an untimed OPPU step first (--no-oppu_warmup: where one step costs minutes, its one-time "
                   "costs are noise)")
    p.add_argument("--max_batches", type=int, default=0, help="time the assembly and its floor on this many batches "
                   "of a seeded random sample of the user's examples, scaled to the whole user by padded tokens "
                   "(0: the whole user, exact batches)")
    p.add_argument("--vocab", type=int, default=50000, help="distinct words the reviews are drawn from")
    p.add_argument("--words", type=float, default=87, help="median words of a review (lognormal, sigma 0.8: mean "
                   "~1.38x the median; 87 gives LaMP-3's ~120)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a shared machine)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--cpu_bf16", action="store_true", help="bf16 autocast on the CPU (stage 5's --cpu_bf16)")
    p.add_argument("--split_batches", action=argparse.BooleanOptionalAction, default=True,
                   help="stage 5's micro-batches (its default); --no-split_batches: each batch in one padded pass, as "
                        "published (the floor is always the published batches, one padded pass each)")
    p.add_argument("--micro_batch_overhead", type=float, help="a micro-batch's fixed cost in padded tokens when "
                   "cutting batches (default: stage 5's MICRO_BATCH_OVERHEAD for the device; a guess on CUDA, which "
                   "gpu_session.sh measures by running a few values)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.oppu_steps, args.sharers, args.words = "tiny", 1, 8, 15
    args.sizes = args.sizes or ("10,20" if args.quick else "200,500,1000,2000")
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    try:
        args.sizes = [int(x) for x in args.sizes.split(",") if x]
    except ValueError:
        p.error(f"--sizes: integers, comma-separated, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 2 or args.oppu_steps < 1 or args.queries < 1 or args.sharers < 3:
        p.error("--sizes >= 2 each, --oppu_steps, --queries >= 1, --sharers >= 3 (top-3)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = {"quick": args.quick, "task": TASK, "device": args.device, "cpu_bf16": args.cpu_bf16,
              "split_batches": args.split_batches, "micro_batch_overhead": args.micro_batch_overhead,
              "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg(),
              "sizes": args.sizes, "queries": args.queries, "seed": args.seed,
              "compose": asdict(ComposeSettings(seed=args.seed)),
              "max_seq_len": CompositionStage.__dataclass_fields__["max_seq_len"].default,
              "oppu_steps_timed": args.oppu_steps, "review_words_median": args.words, "sharers": args.sharers,
              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            run_model(name, args, Path(tmp), report)
    report.update({"load_after": os.getloadavg(), "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        log(f"report -> {args.out}")
    return report


if __name__ == "__main__":
    main()
