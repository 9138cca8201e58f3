r"""The OPPU baseline: for each test user, a LoRA trained on that user's own history only, then predictions.

    python OPPU.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402
from perpcs.stages.config import OPPUStage  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_config_flags(p, OPPUStage)   # the OPPU release's defaults (q_proj and v_proj, 2 epochs, batch 16)
    # the OPPU release's spellings: --task_lora is --lora_ckpt; --k K and --add_profile (cli_flags.py)
    cli.add_alias(p, "--task_lora", dest="lora_ckpt")
    cli.add_release_flags(p)
    args = cli.apply_release_flags(cli.parse(p, argv))
    return args


def main(argv=None):
    from perpcs.stages.oppu import train_oppu
    return train_oppu(cli.config_from_args(OPPUStage, parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
