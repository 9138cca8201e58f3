"""Generate the PAG profile text of every user of a task into data/<task>/profile-id2text.json.

    python data/gen_profile.py --task_name movie_tagging [--model_path smollm2|DIR] [--k 10]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402
from perpcs.stages.config import ProfileConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_flags(p, ProfileConfig)   # each flag's default, help and range: the config's fields
    args = p.parse_args(argv)
    cli.check_profile_flags(args)
    return args


def main(argv=None):
    from perpcs.stages.profiles import generate_profiles
    return generate_profiles(ProfileConfig(**vars(parse_args(argv))))


if __name__ == "__main__":
    run_cli(main)
