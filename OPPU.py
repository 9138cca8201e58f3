r"""The OPPU baseline: for each test user, a LoRA trained on that user's own history only, then predictions.

    python OPPU.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b
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
    # defaults of the authors' OPPU release: r 8 on q_proj and v_proj, lr 1e-4, 2 epochs, batch 16
    cli.add_lora_args(p, targets=["q_proj", "v_proj"])
    cli.add_train_args(p, lr=1e-4, weight_decay=0.01, batch_size=16, epochs=2, max_seq_len=3000)
    cli.add_generation_args(p)
    cli.add_test_split_arg(p)
    cli.add_shard_args(p)
    p.add_argument("--lora_ckpt", default=None, help="task LoRA of stage 1; default ./output/<task>/task-base_LLM")
    p.add_argument("--output_dir", default=None, help="default ./output/<task>/OPPU")
    # the OPPU release's spellings: --task_lora is --lora_ckpt; --k K predicts with BM25 top-K (0: none)
    cli.add_alias(p, "--task_lora", dest="lora_ckpt")
    p.add_argument("--k", type=cli.number("--k", cli.NON_NEGATIVE_INT), default=None, help=argparse.SUPPRESS)
    p.add_argument("--add_profile", action="store_true", help=argparse.SUPPRESS)
    args = cli.parse(p, argv)
    if args.k is not None:   # 0: no retrieval
        args.k_list = [args.k] if args.k > 0 else []
        print(f"note: --k {args.k} (the OPPU release's flag) means --k_list {' '.join(map(str, args.k_list))}"
              + (" (no retrieval)" if not args.k_list else ""))
    if args.add_profile:
        print("note: --add_profile (the OPPU release's flag): predictions with and without the profile are both "
              "written here (k*-profile.json and k*.json)")
    del args.k, args.add_profile
    return args


def main(argv=None):
    from perpcs.stages.config import OPPUStage
    from perpcs.stages.oppu import train_oppu
    args = parse_args(argv)
    return train_oppu(OPPUStage(
        inputs=cli.stage_inputs(args), lora=cli.lora_settings(args), train=cli.train_config(args),
        generation=cli.generation_config(args), shards=cli.shard_config(args), output_dir=args.output_dir, test_split=args.test_split))


if __name__ == "__main__":
    run_cli(main)
