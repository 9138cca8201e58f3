r"""Stage 5: assemble each target user's LoRA from gated sharer pieces (no gradient step), save its recipe, and
predict the 8 test-time variants. The pieces mixed at each position: the --topk best by default; --sample_top_p
and/or --sample choose the other selection modes of the published code (docs/reference.md, "Composition: selection modes").

    python lora_composition.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b \
        --lora_ckpt ./output/movie_tagging/task-base_LLM/lora_ckpt.pt --topk 3 --share_ratio 1 \
        --gate_dir ./output/movie_tagging/Anchor_PEFT/gate --anchor_dir ./output/movie_tagging/Anchor_PEFT/LoRA \
        --output_dir ./output/movie_tagging/LoRA-Composition
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_flags as cli  # noqa: E402
from perpcs.stages.config import CompositionStage  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_config_flags(p, CompositionStage)   # each flag's default, help and range: the config's fields
    return cli.parse(p, argv)


def main(argv=None):
    from perpcs.stages.lora_composition import compose
    return compose(cli.config_from_args(CompositionStage, parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
