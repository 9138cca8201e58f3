"""Flag groups shared by the stage scripts, with the original's names and defaults, and the builders that turn
parsed flags into the library's typed configs (perpcs/stages/config.py): the library never sees a Namespace.

``type=bool`` flags of the original could not be turned off; here booleans are ``--flag/--no-flag``.
"""
from __future__ import annotations

import argparse
import re
import sys

from perpcs.engine.training import TrainConfig
from perpcs.stages.config import LORA_TARGETS, GenerationConfig, LoraSettings, ModelConfig, ShardConfig, StageInputs
from perpcs.stages.manifest import set_command

# Flags of the published parsers that change nothing here: accepted (with a note) so that the authors' commands
# and scripts built on them run as written instead of stopping at an argparse error.
PUBLISHED_NO_OPS = {
    "--num_workers": "examples are tokenized in the training process",
    "--log_dir": "logs go to train_log.jsonl / users_log.jsonl in the output directory",
    "--w_lora": "sharer LoRAs are read from --anchor_dir / --anchor_path",
    "--w_gate": "gates are read from --gate_dir",
    "--model": "the architecture comes from --llama_model_path",
    "--warmup_epochs": "the published runs had no warm-up (SPEC 5)",
    "--gate_reset": "gates always start from 0",
    "--test_idx_dir": "the target users are data/<task>/test_100/user_test_100.json",
}


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """The parser of a stage script: no abbreviated flags (``--k`` must not mean ``--k_list``), and the
    published parsers' no-op flags accepted (see :func:`parse`)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    for flag in PUBLISHED_NO_OPS:
        p.add_argument(flag, dest=_no_op_dest(flag), nargs="?", const="", default=None, help=argparse.SUPPRESS)
    return p


def _no_op_dest(flag: str) -> str:
    return "_no_op_" + flag.lstrip("-")


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then say in one line per given no-op flag that it changes nothing here, and drop it. The command is
    recorded for the run manifest (perpcs.stages.manifest): the calling script's path and these flags."""
    args = p.parse_args(argv)
    script = sys._getframe(1).f_code.co_filename   # the stage script whose parse_args called this
    set_command(script, sys.argv[1:] if argv is None else list(argv))
    for flag, why in PUBLISHED_NO_OPS.items():
        dest = _no_op_dest(flag)
        if getattr(args, dest, None) is not None:
            print(f"note: {flag} (a flag of the published code) is accepted and changes nothing here: {why}")
        if hasattr(args, dest):
            delattr(args, dest)
    return args


def add_alias(p: argparse.ArgumentParser, flag: str, dest: str, **kwargs) -> None:
    """Another spelling of a flag, accepted but not shown in --help (one spelling there)."""
    p.add_argument(flag, dest=dest, default=None, help=argparse.SUPPRESS, **kwargs)


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (the published commands select GPUs with CUDA_VISIBLE_DEVICES)."""
    name = text.strip().lower()
    if name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task_name", required=True, help="citation, movie_tagging, news_categorize, product_rating, "
                   "news_headline, scholarly_title, tweet_paraphrase (or the LaMP id)")
    p.add_argument("--data_dir", default="./data", help="holds <task>/ in the layout of SPEC section 3")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llama_model_path", default="smollm2",
                   help="HF model dir, Meta download dir (params.json + consolidated.*.pth, converted once), "
                        "or 'smollm2' for the bundled SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer_path", default=None, help="defaults to the model path")
    p.add_argument("--device", default="auto", type=device_name, help="auto (CUDA when present), cpu, cuda, cuda:N")
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


def add_test_split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test_split", default="test", choices=["test", "leaderboard"],
                   help="the users to predict: test (data/<task>/test_100, with golds) or leaderboard (LaMP's test "
                        "questions, data/<task>/leaderboard; outputs under <output_dir>/leaderboard/)")


def add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num_shards", type=int, default=None, help="default: $WORLD_SIZE or 1")
    p.add_argument("--shard_id", type=int, default=None, help="default: $RANK or 0")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="redo users whose outputs already exist")


def model_config(args) -> ModelConfig:
    return ModelConfig(llama_model_path=args.llama_model_path, tokenizer_path=args.tokenizer_path,
                       device=args.device, cpu_bf16=args.cpu_bf16)


def stage_inputs(args) -> StageInputs:
    return StageInputs(task_name=args.task_name, data_dir=args.data_dir, model=model_config(args),
                       lora_ckpt=getattr(args, "lora_ckpt", None))


def lora_settings(args) -> LoraSettings:
    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        target_modules=tuple(args.target_modules))


def train_config(args) -> TrainConfig:
    """Checks the training flags (TrainConfig refuses bad ones) before any model loads."""
    return TrainConfig(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                       accum_iter=args.accum_iter, epochs=args.epochs, max_step=args.max_step, clip=args.clip,
                       max_seq_len=args.max_seq_len, grad_ckpt=args.grad_ckpt, seed=args.seed,
                       cpu_bf16=args.cpu_bf16, group_by_length=args.group_by_length)


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_gen_len=args.max_gen_len, temperature=args.temperature, top_p=args.top_p,
                            k_list=tuple(args.k_list), batch_size=args.gen_batch_size, kv_cache=args.kv_cache,
                            max_seq_len=args.max_seq_len, seed=args.seed, cpu_bf16=args.cpu_bf16)


def shard_config(args) -> ShardConfig:
    return ShardConfig(num_shards=args.num_shards, shard_id=args.shard_id, overwrite=args.overwrite)
