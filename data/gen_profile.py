"""Generate the PAG profile text of every user of a task into data/<task>/profile-id2text.json.

    python data/gen_profile.py --task_name movie_tagging [--model_path smollm2|DIR] [--k 10]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_name", required=True)
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--model_path", default="smollm2", help="'smollm2', an HF dir or a Meta download dir")
    p.add_argument("--device", default="auto", type=cli.device_name, help="auto, cpu, cuda or cuda:N")
    cli.add_number(p, "--k", cli.NON_NEGATIVE_INT, "most recent history items shown to the model (0 = all)",
                   default=10)
    cli.add_number(p, "--max_gen_len", cli.COUNT, default=128)
    cli.add_number(p, "--max_seq_len", cli.COUNT, "at least 1 (BOS) + the words of the task's profile instruction + "
                   "--max_gen_len, e.g. 159 for citation with the default --max_gen_len", default=3000)
    cli.add_number(p, "--batch_size", cli.COUNT, default=16)
    cli.add_number(p, "--temperature", cli.TEMPERATURE, "reproducible profiles when 0", default=0.0)
    cli.add_number(p, "--top_p", cli.FRACTION, default=0.9)
    cli.add_number(p, "--seed", cli.SEED, default=0)
    p.add_argument("--chat_template", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template when it has one")
    p.add_argument("--output_file", default=None, help="default data/<task>/profile-id2text.json")
    args = p.parse_args(argv)
    cli.check_profile_flags(args)
    return args


def main(argv=None):
    from perpcs.stages.config import ProfileConfig
    from perpcs.stages.profiles import generate_profiles
    return generate_profiles(ProfileConfig(**vars(parse_args(argv))))


if __name__ == "__main__":
    run_cli(main)
