"""Flag groups shared by the stage scripts, with the original's names and defaults, and the builders that turn
parsed flags into the library's typed configs (perpcs/stages/config.py): the library never sees a Namespace.

``type=bool`` flags of the original could not be turned off; here booleans are ``--flag/--no-flag``.
"""
from __future__ import annotations

import argparse
import re
import sys

from perpcs.checks import (COUNT, DROPOUT, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, SEED, TEMPERATURE,
                           Range)
from perpcs.data.prompts import check_max_seq_len
from perpcs.data.tasks import get_task
from perpcs.engine.training import TrainConfig
from perpcs.errors import fail
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
    check_flags(args)
    return args


def number(flag: str, rule: Range):
    """An argparse ``type``: the flag's text as a number in ``rule``'s range (perpcs/checks.py). A bad value
    raises the library's error, so the script prints ``error: --flag must be ..., got ...`` and exits 2 while
    parsing, before any model loads (argparse lets errors other than ValueError and TypeError through)."""
    def convert(text: str):
        return rule.parse(flag, text)
    convert.__name__ = "int" if rule.integer else "float"
    return convert


def add_number(p: argparse.ArgumentParser, flag: str, rule: Range, help: str | None = None, **kwargs):
    """A numeric flag checked by ``rule``; its range ends the --help text."""
    flags = flag if isinstance(flag, tuple) else (flag,)
    text = rule.describe()
    return p.add_argument(*flags, type=number(flags[0], rule), help=f"{help} ({text})" if help else text, **kwargs)


def check_flags(args) -> None:
    """The checks that need several flags, right after parsing: the shard in range, and --max_seq_len long enough
    for the task's instruction and the new tokens (perpcs/data/prompts.check_max_seq_len)."""
    num, sid = getattr(args, "num_shards", None), getattr(args, "shard_id", None)
    if num is not None and sid is not None and sid >= num:
        fail(f"--shard_id {sid} must be in [0, --num_shards {num})")
    if getattr(args, "max_seq_len", None) is not None and getattr(args, "task_name", None):
        check_max_seq_len(get_task(args.task_name), args.max_seq_len, getattr(args, "max_gen_len", None))


def check_profile_flags(args) -> None:
    """data/gen_profile.py: --max_seq_len holds the profile instruction and --max_gen_len new tokens."""
    task = get_task(args.task_name)
    check_max_seq_len(task, args.max_seq_len, args.max_gen_len, template=task.profile_prompts["profile_prompt"],
                      what="the profile instruction")


MAX_SEQ_LEN_HELP = ("tokens of a prompt and its new tokens (of an example and its answer in training); at least 1 "
                    "(BOS) + the words of the task's instruction + --max_gen_len (or the task's answer length), e.g. "
                    "59 for movie_tagging, 99 for tweet_paraphrase")


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
    add_number(p, "--lora_r", COUNT, default=r)
    add_number(p, "--lora_alpha", POSITIVE, default=alpha)
    add_number(p, "--lora_dropout", DROPOUT, default=dropout)
    p.add_argument("--target_modules", nargs="+", default=list(targets or LORA_TARGETS))


def add_train_args(p: argparse.ArgumentParser, lr: float, weight_decay: float = 0.01, batch_size: int = 6,
                   epochs: int = 1, max_step: int | None = None, max_seq_len: int = 3000) -> None:
    add_number(p, "--lr", POSITIVE, default=lr)
    add_number(p, "--weight_decay", NON_NEGATIVE, default=weight_decay)
    add_number(p, "--batch_size", COUNT, default=batch_size)
    add_number(p, "--accum_iter", COUNT, "gradient accumulation micro-batches per step", default=1)
    add_number(p, "--epochs", COUNT, "length of the cosine lr schedule in epochs (SPEC 5), and of the run unless "
               "--max_step is set", default=epochs)
    add_number(p, "--max_step", COUNT, "run exactly this many optimizer steps, repeating epochs as needed; the lr "
               "keeps following the cosine over --epochs past its end (it rises again)", default=max_step)
    add_number(p, "--clip", POSITIVE, "gradient-norm clip", default=0.3)
    add_number(p, "--max_seq_len", COUNT, MAX_SEQ_LEN_HELP, default=max_seq_len)
    p.add_argument("--grad_ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing (less memory, ~30%% slower)")
    p.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=False,
                   help="opt-in speed flag: batch examples of similar length together (less padding). It changes "
                        "the batches vs the published code, whose loops shuffle; off (default): a fresh random "
                        "order each epoch, seeded per user from --seed (the published generator was unseeded, "
                        "so its exact order cannot be matched)")
    add_number(p, "--seed", SEED, default=0)


class _DistinctPositive(argparse.Action):
    """--k_list: each k names a predictions file (k2.json), so a repeated k is an error (its type refuses k < 1)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(set(values)) != len(values):
            fail(f"{option_string} must be distinct, got {' '.join(map(str, values))}")
        setattr(namespace, self.dest, values)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    add_number(p, "--max_gen_len", COUNT, "new tokens; default per task", default=None)
    add_number(p, "--temperature", TEMPERATURE, default=0.1)
    add_number(p, "--top_p", FRACTION, default=0.9)
    add_number(p, "--k_list", COUNT, "BM25 k of the RAG variants, distinct", nargs="+", default=[1, 2, 4],
               action=_DistinctPositive)
    add_number(p, "--gen_batch_size", COUNT, default=16)
    p.add_argument("--kv_cache", default="dynamic", choices=["dynamic", "static"],
                   help="static: preallocated KV cache with a compiled decoding step on CUDA (same outputs)")


def add_test_split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test_split", default="test", choices=["test", "leaderboard"],
                   help="the users to predict: test (data/<task>/test_100, with golds) or leaderboard (LaMP's test "
                        "questions, data/<task>/leaderboard; outputs under <output_dir>/leaderboard/)")


def add_shard_args(p: argparse.ArgumentParser) -> None:
    add_number(p, "--num_shards", COUNT, "default: $WORLD_SIZE or 1", default=None)
    add_number(p, "--shard_id", NON_NEGATIVE_INT, "below --num_shards; default: $RANK or 0", default=None)
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
