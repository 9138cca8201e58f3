"""Write synthetic raw LaMP files (train_* / dev_* questions and outputs, sample_info.json) for one task.

Users fall into latent groups with habits their history reveals, so personalization is measurable
(see perpcs/sample.py). Example:
    python data/make_sample.py --task_name movie_tagging --out_dir data/raw/movie_tagging
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perpcs.errors import run_cli  # noqa: E402
from perpcs.atomic import write_json_atomic  # noqa: E402
from perpcs.data.sample import sample_groups, write_sample  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_name", required=True, help="citation, movie_tagging, news_categorize, product_rating, "
                   "news_headline, scholarly_title, tweet_paraphrase (or the LaMP id)")
    p.add_argument("--out_dir", required=True, help="where the raw LaMP files go")
    p.add_argument("--n_users", type=int, default=60)
    p.add_argument("--n_history", type=int, default=30, help="history items of each user")
    p.add_argument("--n_queries", type=int, default=4, help="questions per user; the last one goes to dev")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_groups", type=int, default=4, help="latent user groups, each with its own habits (2-6)")
    p.add_argument("--groups_file", default=None, help="also write the latent group of every user (keyed by the "
                   "user ids prepare_lamp.py will give them) to this JSON file, for `python -m perpcs explain` and "
                   "the report's routing share; no stage reads it (keep it out of data/<task>/ all the same)")
    args = p.parse_args(argv)
    files = write_sample(args.task_name, args.out_dir, args.n_users, args.n_history, args.n_queries, args.seed,
                         args.n_groups)
    if args.groups_file:
        write_json_atomic(args.groups_file, sample_groups(files["sample_info.json"]))
        print(f"wrote the latent group of every user to {args.groups_file}")
    counts = ", ".join(f"{name} ({len(obj) if isinstance(obj, list) else len(obj.get('golds', obj))})"
                       for name, obj in files.items() if name != "sample_info.json")
    print(f"wrote {args.n_users} users x {args.n_queries} questions ({args.n_history} history items each) "
          f"to {args.out_dir}: {counts}, sample_info.json")


if __name__ == "__main__":
    run_cli(main)
