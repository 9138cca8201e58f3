"""Convert a LaMP task folder as downloaded into the data layout of docs/method.md section 3.

The folder holds train/ dev/ test/ subfolders (LaMP's layout, user- or time-based) or the same files flat:
train_questions.json + train_outputs.json, dev_*, test_questions.json. Train and dev questions become our users:
<out_dir>/<task>/user_base_LLM.json, user_anchor_candidate.json, user_reserve_10_percent.json,
test_100/user_test_100.json and test_100/golds.json. LaMP's test questions (no outputs) become the separate
leaderboard split, <out_dir>/<task>/leaderboard/user_leaderboard.json (see `python -m perpcs leaderboard`).
The grouping of questions into users, the choice of test users and the citation mapping are described in
perpcs/data/prepare.py. Examples:
    python data/prepare_lamp.py --task_name LaMP_2M --lamp_dir LaMP/LaMP_2 --n_test 100
    python data/prepare_lamp.py --task_name movie_tagging --lamp_dir data/raw/movie_tagging --n_test 10
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perpcs.checks import NON_NEGATIVE_INT, Range  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402
from perpcs.data.prepare import prepare_lamp  # noqa: E402


SHARE = Range(0, 1)


def checked(flag: str, rule: Range):
    """Checked while parsing, before the LaMP files are read: nan and inf pass no rule (perpcs/checks.py)."""
    return lambda text: rule.parse(flag, text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_name", required=True, help="citation, movie_tagging, news_categorize, product_rating, "
                   "news_headline, scholarly_title, tweet_paraphrase (or the LaMP id: LaMP_1 ... LaMP_7, LaMP_2M, LaMP_2N; LaMP_2 is "
                   "detected from the questions' prompt)")
    p.add_argument("--lamp_dir", required=True, help="the task's LaMP folder: train/ dev/ test/ subfolders or flat "
                   "train_questions.json / train_outputs.json (dev_*, test_questions.json optional; test_questions.json "
                   "alone writes the leaderboard split only)")
    p.add_argument("--out_dir", default="data", help="the layout goes to <out_dir>/<task>/")
    p.add_argument("--n_test", type=checked("--n_test", NON_NEGATIVE_INT), default=100,
                   help="test users: those with the longest history")
    p.add_argument("--seed", type=int, default=0, help="shuffles the non-test users before the split")
    p.add_argument("--base_frac", type=checked("--base_frac", SHARE), default=0.5,
                   help="share of non-test users for the task LoRA (in [0, 1]; the three shares sum to at most 1)")
    p.add_argument("--candidate_frac", type=checked("--candidate_frac", SHARE), default=0.4,
                   help="share of non-test users as sharer candidates")
    p.add_argument("--reserve_frac", type=checked("--reserve_frac", SHARE), default=0.1,
                   help="share of non-test users held out")
    p.add_argument("--citation_field", default="abstract", choices=["abstract", "title"],
                   help="citation task: the raw history field copied into 'citation' (what the prompts read)")
    args = p.parse_args(argv)
    prepare_lamp(args.task_name, args.lamp_dir, args.out_dir, args.n_test, args.seed, args.base_frac,
                 args.candidate_frac, args.reserve_frac, args.citation_field)


if __name__ == "__main__":
    run_cli(main)
