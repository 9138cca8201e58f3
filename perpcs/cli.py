"""Flag groups shared by the stage scripts, with the original's names and defaults.

``type=bool`` flags of the original could not be turned off; here booleans are ``--flag/--no-flag``.
"""
from __future__ import annotations

import argparse
import os

from .training import TrainConfig

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task_name", required=True, help="citation, movie_tagging, news_categorize, product_rating, "
                   "news_headline, scholarly_title, tweet_paraphrase (or the LaMP id)")
    p.add_argument("--data_dir", default="./data", help="holds <task>/ in the layout of SPEC section 3")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llama_model_path", default="smollm2",
                   help="HF model dir, Meta download dir (params.json + consolidated.*.pth, converted once), "
                        "or 'smollm2' for the bundled SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer_path", default=None, help="defaults to the model path")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cpu_bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast on CPU (where supported); default fp32 on CPU, bf16 on CUDA")


def add_lora_args(p: argparse.ArgumentParser, r: int = 8, alpha: float = 8, dropout: float = 0.05,
                  targets=None) -> None:
    p.add_argument("--lora_r", type=int, default=r)
    p.add_argument("--lora_alpha", type=float, default=alpha)
    p.add_argument("--lora_dropout", type=float, default=dropout)
    p.add_argument("--target_modules", nargs="+", default=list(targets or LORA_TARGETS))


def add_train_args(p: argparse.ArgumentParser, lr: float, weight_decay: float = 0.01, batch_size: int = 6,
                   epochs: int = 1, max_step: int | None = None, max_seq_len: int = 3000) -> None:
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight_decay", type=float, default=weight_decay)
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation micro-batches per step")
    p.add_argument("--epochs", type=int, default=epochs,
                   help="length of the cosine lr schedule in epochs (SPEC 5), and of the run unless --max_step "
                        "is set")
    p.add_argument("--max_step", type=int, default=max_step,
                   help="run exactly this many optimizer steps, repeating epochs as needed; the lr keeps "
                        "following the cosine over --epochs past its end (it rises again)")
    p.add_argument("--clip", type=float, default=0.3, help="gradient-norm clip")
    p.add_argument("--max_seq_len", type=int, default=max_seq_len)
    p.add_argument("--grad_ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing (less memory, ~30%% slower)")
    p.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch examples of similar length together (less padding)")
    p.add_argument("--seed", type=int, default=0)


class _DistinctPositive(argparse.Action):
    """--k_list: each k names a predictions file (k2.json), so a repeated or non-positive k is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(set(values)) != len(values) or min(values) < 1:
            parser.error(f"{option_string}: distinct positive integers expected, got {' '.join(map(str, values))}")
        setattr(namespace, self.dest, values)


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or positive, got {text}")
    return value


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_gen_len", type=int, default=None, help="new tokens; default per task")
    p.add_argument("--temperature", type=_non_negative, default=0.1, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--k_list", type=int, nargs="+", default=[1, 2, 4], action=_DistinctPositive,
                   help="BM25 k of the RAG variants")
    p.add_argument("--gen_batch_size", type=int, default=16)
    p.add_argument("--kv_cache", default="dynamic", choices=["dynamic", "static"],
                   help="static: preallocated KV cache with a compiled decoding step on CUDA (same outputs)")


def add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num_shards", type=int, default=None, help="default: $WORLD_SIZE or 1")
    p.add_argument("--shard_id", type=int, default=None, help="default: $RANK or 0")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="redo users whose outputs already exist")


def shard_of(args) -> tuple:
    """(num_shards, shard_id) from the flags, else torchrun's WORLD_SIZE / RANK, else (1, 0)."""
    num = args.num_shards if args.num_shards is not None else int(os.environ.get("WORLD_SIZE", 1))
    sid = args.shard_id if args.shard_id is not None else int(os.environ.get("RANK", 0))
    if num < 1 or not 0 <= sid < num:
        from .errors import fail
        fail(f"--shard_id {sid} must be in [0, --num_shards {num})")
    return num, sid


def train_config(args) -> TrainConfig:
    return TrainConfig(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                       accum_iter=args.accum_iter, epochs=args.epochs, max_step=args.max_step, clip=args.clip,
                       max_seq_len=args.max_seq_len, grad_ckpt=args.grad_ckpt, seed=args.seed,
                       cpu_bf16=args.cpu_bf16, group_by_length=args.group_by_length)


def generation_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.gen_batch_size,
                max_seq_len=args.max_seq_len, cpu_bf16=args.cpu_bf16, kv_cache=args.kv_cache)
