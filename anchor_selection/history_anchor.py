r"""Stage 2: choose the sharer ("anchor") users among the candidates (SPEC section 5).

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

from perpcs.method.clustering import KMEANS_N_INIT, STRATEGIES  # noqa: E402
from perpcs.models.encoder import PAPER_ENCODER  # noqa: E402
from perpcs.stages.sharer_selection import run_sharer_selection  # noqa: E402
import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_name", required=True, help="movie_tagging, news_headline, ... or a LaMP id")
    p.add_argument("--candidate_path", default=None,
                   help="candidate users file (default: <repo>/data/<task>/user_anchor_candidate.json)")
    p.add_argument("--output_dir", default=None,
                   help="where to write the index and embeddings (default: <repo>/anchor_selection/<task>)")
    cli.add_number(p, "--k", cli.COUNT, "number of clusters (cluster) or sharers (others)", default=50)
    p.add_argument("--strategy", choices=STRATEGIES, default="cluster",
                   help=f"cluster: k-means (n_init={KMEANS_N_INIT}) over history embeddings, most active "
                        "user per cluster; most_active: the k longest histories; random: k seeded draws")
    cli.add_number(p, "--min_history", cli.NON_NEGATIVE_INT, "a sharer needs more than this many history items",
                   default=10)
    cli.add_number(p, "--seed", cli.SEED, "k-means random_state / random strategy seed", default=0)
    p.add_argument("--encoder", default=None,
                   help=f"Hugging Face encoder id (the paper's: {PAPER_ENCODER}; read from the local HF cache, "
                        "downloaded into it unless HF_HUB_OFFLINE=1) or a local HF model directory (default: the "
                        "bundled all-MiniLM-L6-v2, offline)")
    cli.add_number(p, "--batch_size", cli.COUNT, default=32)
    cli.add_number(p, "--max_length", cli.COUNT, "tokens per history item", default=512)
    p.add_argument("--device", type=cli.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--reembed", action="store_true",
                   help="recompute the embeddings even if matching ones are stored in output_dir")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_sharer_selection(args.task_name, candidate_path=args.candidate_path, output_dir=args.output_dir,
                         k=args.k, strategy=args.strategy, min_history=args.min_history, seed=args.seed,
                         encoder=args.encoder, batch_size=args.batch_size, max_length=args.max_length,
                         device=args.device, reembed=args.reembed)


if __name__ == "__main__":
    run_cli(main)
