r"""Stage 3: one LoRA per sharer (on base + merged task LoRA), trained on the sharer's own history.

    python train_anchor_PEFT.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b \
        --lora_ckpt ./output/movie_tagging/task-base_LLM/lora_ckpt.pt \
        --output_dir ./output/movie_tagging/Anchor_PEFT/LoRA
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402
from perpcs.stages.config import SharerLoRAStage  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_config_flags(p, SharerLoRAStage)   # each flag's default, help and range: the config's fields
    return cli.parse(p, argv)


def main(argv=None):
    from perpcs.stages.sharer_loras import train_sharer_loras
    return train_sharer_loras(cli.config_from_args(SharerLoRAStage, parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
