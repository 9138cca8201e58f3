r"""Stage 2: choose the sharer ("anchor") users among the candidates (docs/method.md section 5).

    python anchor_selection/history_anchor.py --task_name movie_tagging --k 50
    cd anchor_selection && python history_anchor.py \
        --candidate_path ../data/movie_tagging/user_anchor_candidate.json --task_name movie_tagging --k 50

Writes <output_dir>/anchor_user_idx.json (the sharers) and user_history_emb.npy (one row per candidate),
by default in <repo>/anchor_selection/<task>/ whatever the working directory.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perpcs.stages.config import SharerSelectionStage  # noqa: E402
from perpcs.stages.sharer_selection import run_sharer_selection_stage  # noqa: E402
import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_flags(p, SharerSelectionStage)   # each flag's default, help and range: the config's fields
    return p.parse_args(argv)


def main(argv=None):
    run_sharer_selection_stage(cli.config_from_args(SharerSelectionStage, parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
