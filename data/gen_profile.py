"""Generate the PAG profile text of every user of a task into data/<task>/profile-id2text.json.

    python data/gen_profile.py --task_name movie_tagging [--model_path smollm2|DIR] [--k 10]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_flags import device_name  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_name", required=True)
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--model_path", default="smollm2", help="'smollm2', an HF dir or a Meta download dir")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--k", type=int, default=10, help="most recent history items shown to the model (0 = all)")
    p.add_argument("--max_gen_len", type=int, default=128)
    p.add_argument("--max_seq_len", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (reproducible profiles)")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat_template", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template when it has one")
    p.add_argument("--output_file", default=None, help="default data/<task>/profile-id2text.json")
    return p.parse_args(argv)


def main(argv=None):
    from perpcs.stages.config import ProfileConfig
    from perpcs.stages.profiles import generate_profiles
    return generate_profiles(ProfileConfig(**vars(parse_args(argv))))


if __name__ == "__main__":
    run_cli(main)
