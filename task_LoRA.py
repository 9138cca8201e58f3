r"""Stage 1: train the task LoRA on the base users, then predict the 8 baseline variants for the test users.

    python task_LoRA.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402
from perpcs.stages.config import TaskLoRAStage  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_config_flags(p, TaskLoRAStage)   # each flag's default, help and range: the config's fields
    cli.add_release_flags(p)                 # the OPPU release's task_LoRA.py spellings: --k K, --add_profile
    return cli.apply_release_flags(cli.parse(p, argv))


def main(argv=None):
    from perpcs.stages.task_lora import run
    return run(cli.config_from_args(TaskLoRAStage, parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
