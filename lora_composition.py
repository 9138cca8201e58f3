r"""Stage 5: assemble each target user's LoRA from the top-k gated sharer pieces (no gradient step), save its
recipe, and predict the 8 test-time variants.

    python lora_composition.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b \
        --lora_ckpt ./output/movie_tagging/task-base_LLM/lora_ckpt.pt --topk 3 --share_ratio 1 \
        --gate_dir ./output/movie_tagging/Anchor_PEFT/gate --anchor_dir ./output/movie_tagging/Anchor_PEFT/LoRA \
        --output_dir ./output/movie_tagging/LoRA-Composition
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perpcs import cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_data_args(p)
    cli.add_model_args(p)
    cli.add_generation_args(p)
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
    p.add_argument("--topk", type=int, default=3, help="pieces mixed per position")
    p.add_argument("--agg_temperature", type=float, default=1.0, help="softmax temperature of the top-k mix")
    p.add_argument("--recent_k", type=int, default=2000, help="history items used to assemble")
    p.add_argument("--share_ratio", "--shared_ratio", dest="share_ratio", type=float, default=1.0,
                   help="fraction of sharers each piece position may choose from (seeded random subset)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the history")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_seq_len", type=int, default=3500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=False,
                   help="sample the k pieces from the softmax of the best candidates instead of taking the top k")
    p.add_argument("--sample_topk", type=int, default=10, help="candidates sampled from")
    p.add_argument("--sample_temperature", type=float, default=1.0)
    p.add_argument("--sample_top_p", type=float, default=0.9)
    p.add_argument("--save_adapters", action=argparse.BooleanOptionalAction, default=False,
                   help="also write each user's assembled peft adapter")
    return cli.parse(p, argv)


def main(argv=None):
    from perpcs.compose_stage import compose
    return compose(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
