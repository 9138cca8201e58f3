r"""The OPPU baseline: for each test user, a LoRA trained on that user's own history only, then predictions.

    python OPPU.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402
from perpcs.stages.config import OPPUStage  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_config_flags(p, OPPUStage)   # the OPPU release's defaults (q_proj and v_proj, 2 epochs, batch 16)
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
    from perpcs.stages.oppu import train_oppu
    return train_oppu(cli.config_from_args(OPPUStage, parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
