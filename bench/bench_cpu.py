"""CPU benchmark with the bundled SmolLM2-135M: training tokens/s, batched vs one-by-one generation, peak RSS.

    python bench/bench_cpu.py [--steps 4] [--seq_words 150] [--json bench/cpu_results.json]

Numbers and what was expected are kept in bench/NOTES.md. Not a test: timings depend on the machine.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from perpcs.models.loading import load_base_model  # noqa: E402
from perpcs.models.lora import lora_config  # noqa: E402
from perpcs.data.prompts import Example  # noqa: E402
from perpcs.engine.training import TrainConfig, train  # noqa: E402
from perpcs.engine.generation import generate  # noqa: E402


def make_examples(n: int, words: int, answer_words: int = 2) -> list:
    """Prompts of ~words words with a short answer, like the classification tasks."""
    filler = "the movie follows a young detective who uncovers a conspiracy in a small town".split()
    return [Example(" ".join(filler[(i + j) % len(filler)] for j in range(words)) + " Tag:",
                    " " + " ".join(["thriller"] * answer_words)) for i in range(n)]


def bench_train(model, tokenizer, device, steps, seq_words, grad_ckpt, cpu_bf16) -> dict:
    from peft import get_peft_model
    peft_model = get_peft_model(model, lora_config())
    cfg = TrainConfig(lr=1e-4, batch_size=6, epochs=1000, max_step=steps, grad_ckpt=grad_ckpt, cpu_bf16=cpu_bf16)
    train(peft_model, tokenizer, make_examples(6, seq_words), TrainConfig(batch_size=6, max_step=1, epochs=1,
          grad_ckpt=grad_ckpt, cpu_bf16=cpu_bf16), device, show_progress=False)   # warm-up
    stats = train(peft_model, tokenizer, make_examples(6 * steps, seq_words), cfg, device, show_progress=False)
    peft_model.unload()
    return {"grad_ckpt": grad_ckpt, "cpu_bf16": cpu_bf16, "tokens_per_s": round(stats["tokens_per_s"], 1),
            "s_per_step": round(stats["seconds"] / stats["steps"], 3)}


def bench_generate(model, tokenizer, device, n_prompts, seq_words, new_tokens) -> dict:
    prompts = [e.prompt for e in make_examples(n_prompts, seq_words)]
    t0 = time.perf_counter()
    generate(model, tokenizer, prompts, new_tokens, device, temperature=0, batch_size=n_prompts)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in prompts:
        generate(model, tokenizer, [p], new_tokens, device, temperature=0, batch_size=1)
    single = time.perf_counter() - t0
    return {"prompts": n_prompts, "new_tokens": new_tokens, "batched_s": round(batched, 2),
            "one_by_one_s": round(single, 2), "batched_new_tokens_per_s": round(n_prompts * new_tokens / batched, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq_words", type=int, default=150, help="prompt words (~1.3 tokens each)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer, device = load_base_model("smollm2", device="cpu")
    results = {"torch_threads": torch.get_num_threads(), "train": [], "generate": None}
    for grad_ckpt, bf16 in ((True, False), (False, False), (False, True)):
        results["train"].append(bench_train(model, tokenizer, device, args.steps, args.seq_words, grad_ckpt, bf16))
        print(results["train"][-1], flush=True)
    results["generate"] = bench_generate(model, tokenizer, device, 8, args.seq_words, 10)
    print(results["generate"])
    results["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"peak RSS {results['peak_rss_mib']} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
