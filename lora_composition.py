r"""Stage 5: assemble each target user's LoRA from gated sharer pieces (no gradient step), save its recipe, and
predict the 8 test-time variants. The pieces mixed at each position: the --topk best by default; --sample_top_p
and/or --sample choose the other selection modes of the published code (README, "Composition: selection modes").

    python lora_composition.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b \
        --lora_ckpt ./output/movie_tagging/task-base_LLM/lora_ckpt.pt --topk 3 --share_ratio 1 \
        --gate_dir ./output/movie_tagging/Anchor_PEFT/gate --anchor_dir ./output/movie_tagging/Anchor_PEFT/LoRA \
        --output_dir ./output/movie_tagging/LoRA-Composition
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_flags as cli  # noqa: E402
from perpcs.paths import CONTROLS  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_data_args(p)
    cli.add_model_args(p)
    cli.add_generation_args(p)
    cli.add_test_split_arg(p)
    cli.add_shard_args(p)
    p.add_argument("--lora_ckpt", default=None, help="task LoRA of stage 1; default ./output/<task>/task-base_LLM")
    p.add_argument("--anchor_dir", default=None,
                   help="sharer LoRAs of stage 3; default ./output/<task>/Anchor_PEFT/LoRA")
    cli.add_alias(p, "--anchor_path", dest="anchor_dir")
    p.add_argument("--gate_dir", default=None, help="sharer gates of stage 4; default ./output/<task>/Anchor_PEFT/gate")
    cli.add_alias(p, "--gate_path", dest="gate_dir")
    p.add_argument("--anchor_idx_path", default=None,
                   help="stage 2 output; default anchor_selection/<task>/anchor_user_idx.json")
    p.add_argument("--output_dir", default=None, help="default ./output/<task>/LoRA-Composition")
    cli.add_number(p, "--topk", cli.COUNT, "pieces mixed per position (ignored with --sample_top_p and no --sample)",
                   default=3)
    cli.add_number(p, "--agg_temperature", cli.POSITIVE,
                   "softmax temperature of the mix (and of the draw with --sample --sample_top_p)", default=1.0)
    cli.add_number(p, "--recent_k", cli.COUNT, "history items used to assemble", default=2000)
    cli.add_number(p, ("--share_ratio", "--shared_ratio"), cli.FRACTION, "fraction of sharers each piece position "
                   "may choose from (seeded random subset)", dest="share_ratio", default=1.0)
    cli.add_number(p, "--epochs", cli.COUNT, "passes over the history", default=1)
    cli.add_number(p, "--batch_size", cli.COUNT, default=16)
    cli.add_number(p, "--max_seq_len", cli.COUNT, cli.MAX_SEQ_LEN_HELP, default=3500)
    cli.add_number(p, "--seed", cli.SEED, default=0)
    # the four selection modes of the published code (SPEC 7); --sample and --sample_top_p pick the mode
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=False,
                   help="draw the --topk pieces at random instead of taking the best: from the --sample_topk best "
                        "(softmax(score / --sample_temperature)), or with --sample_top_p from the nucleus and the "
                        "--topk best (softmax(score / --agg_temperature))")
    cli.add_number(p, "--sample_topk", cli.COUNT,
                   "with --sample and no --sample_top_p: the candidates drawn from (at most the pool)", default=10)
    cli.add_number(p, "--sample_temperature", cli.POSITIVE,
                   "temperature of the nucleus' softmax, and of the draw with --sample and no --sample_top_p",
                   default=1.0)
    cli.add_number(p, "--sample_top_p", cli.FRACTION,
                   "unset by default; set: without --sample, mix the nucleus of the scores (a variable number of "
                   "pieces, --topk ignored); with --sample, draw from it", default=None)
    p.add_argument("--save_adapters", action=argparse.BooleanOptionalAction, default=False,
                   help="also write each user's assembled peft adapter")
    p.add_argument("--save_scores", action=argparse.BooleanOptionalAction, default=False,
                   help="also write every sharer's gate score for every piece (mean over the user's batches) to "
                        "gate_scores/user_<id>.json: what the choices were made from; python -m perpcs explain "
                        "reads them (Per-Pcs and --control swapped: the other controls score nothing)")
    p.add_argument("--control", default=None, choices=list(CONTROLS),
                   help="a user-blind control instead of Per-Pcs, from the same sharers and gates: uniform (every "
                        "sharer 1/n in every piece), swapped (each user assembled from another test user's history, "
                        "a derangement seeded by --seed), peft_merge (peft's add_weighted_adapter, linear, 1/n); "
                        "or a PEFT-retrieval row, one sharer's whole LoRA per user: nearest_sharer (the highest "
                        "cosine between mean history embeddings, see --encoder), random_sharer (drawn per user, "
                        "seeded by --seed); default output ./output/<task>/LoRA-Composition-control-<name>")
    p.add_argument("--encoder", default=None,
                   help="--control nearest_sharer only: the Hugging Face encoder (id or local directory) that embeds "
                        "the histories, as stage 2 does (anchor_selection/history_anchor.py --encoder); default: the "
                        "encoder recorded in the sharer index, else the bundled all-MiniLM-L6-v2")
    return cli.parse(p, argv)


def main(argv=None):
    from perpcs.stages.lora_composition import compose
    from perpcs.method.composition import ComposeSettings
    from perpcs.stages.config import CompositionStage
    args = parse_args(argv)
    settings = ComposeSettings(topk=args.topk, agg_temperature=args.agg_temperature, share_ratio=args.share_ratio,
                               epochs=args.epochs, batch_size=args.batch_size, recent_k=args.recent_k,
                               seed=args.seed, sample=args.sample, sample_topk=args.sample_topk,
                               sample_temperature=args.sample_temperature, sample_top_p=args.sample_top_p)
    return compose(CompositionStage(
        inputs=cli.stage_inputs(args), compose=settings, generation=cli.generation_config(args),
        shards=cli.shard_config(args), anchor_dir=args.anchor_dir, gate_dir=args.gate_dir,
        anchor_idx_path=args.anchor_idx_path, output_dir=args.output_dir, max_seq_len=args.max_seq_len,
        save_adapters=args.save_adapters, save_scores=args.save_scores, test_split=args.test_split,
        control=args.control, encoder=args.encoder))


if __name__ == "__main__":
    run_cli(main)
