r"""Stage 1: train the task LoRA on the base users, then predict the 8 baseline variants for the test users.

    python task_LoRA.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_data_args(p)
    cli.add_model_args(p)
    cli.add_lora_args(p)
    cli.add_train_args(p, lr=1e-4, weight_decay=0.01, batch_size=6, epochs=3, max_seq_len=3000)
    cli.add_generation_args(p)
    cli.add_test_split_arg(p)
    p.add_argument("--output_dir", default=None, help="default ./output/<task>/task-base_LLM")
    p.add_argument("--lora_ckpt", default=None, help="with --infer: the task LoRA dir (or .../lora_ckpt.pt)")
    p.add_argument("--infer", action=argparse.BooleanOptionalAction, default=False,
                   help="skip training; load the task LoRA and predict")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="train again even if the adapter exists (predictions are always made again)")
    p.add_argument("--base_only", action=argparse.BooleanOptionalAction, default=False,
                   help="no task LoRA: predict the test users with the plain base model (a reference row of the "
                        "results table); default output ./output/<task>/base_LLM")
    return cli.parse(p, argv)


def main(argv=None):
    from perpcs.stages.config import TaskLoRAStage
    from perpcs.stages.task_lora import run
    args = parse_args(argv)
    return run(TaskLoRAStage(inputs=cli.stage_inputs(args), lora=cli.lora_settings(args), train=cli.train_config(args),
                             generation=cli.generation_config(args), output_dir=args.output_dir, infer=args.infer,
                             overwrite=args.overwrite, test_split=args.test_split, base_only=args.base_only))


if __name__ == "__main__":
    run_cli(main)
