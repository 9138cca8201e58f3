r"""Stage 4: one gate vector per piece of each sharer LoRA (the LoRA frozen, only the gates train).

    python train_anchor_gate.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b \
        --lora_ckpt ./output/movie_tagging/task-base_LLM/lora_ckpt.pt --anchor_path ./output/movie_tagging/Anchor_PEFT \
        --output_dir ./output/movie_tagging/Anchor_PEFT/gate
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402
from perpcs.stages.config import SharerGateStage  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_config_flags(p, SharerGateStage)   # each flag's default, help and range: the config's fields
    return cli.parse(p, argv)


def main(argv=None):
    from perpcs.stages.sharer_gates import train_sharer_gates
    return train_sharer_gates(cli.config_from_args(SharerGateStage, parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
