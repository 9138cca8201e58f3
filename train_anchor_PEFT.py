r"""Stage 3: one LoRA per sharer (on base + merged task LoRA), trained on the sharer's own history.

    python train_anchor_PEFT.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b \
        --lora_ckpt ./output/movie_tagging/task-base_LLM/lora_ckpt.pt \
        --output_dir ./output/movie_tagging/Anchor_PEFT/LoRA
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_flags as cli  # noqa: E402
from perpcs.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = cli.stage_parser(__doc__)
    cli.add_data_args(p)
    cli.add_model_args(p)
    cli.add_lora_args(p)
    # SPEC 5: 100 optimizer steps, the lr a cosine over 3 epochs of this user's batches (repeating past them)
    cli.add_train_args(p, lr=2e-5, weight_decay=0.01, batch_size=6, epochs=3, max_step=100,
                       max_seq_len=3000)
    cli.add_shard_args(p)
    p.add_argument("--lora_ckpt", default=None, help="task LoRA of stage 1 (dir or .../lora_ckpt.pt); "
                   "default ./output/<task>/task-base_LLM")
    p.add_argument("--anchor_idx_path", default=None,
                   help="stage 2 output; default anchor_selection/<task>/anchor_user_idx.json (a missing "
                        "published anchor_user_idx.pt resolves to it)")
    p.add_argument("--output_dir", default=None, help="default ./output/<task>/Anchor_PEFT/LoRA (user_<id>/ each)")
    return cli.parse(p, argv)


def main(argv=None):
    from perpcs.stages.config import SharerLoRAStage
    from perpcs.stages.sharer_loras import train_sharer_loras
    args = parse_args(argv)
    return train_sharer_loras(SharerLoRAStage(
        inputs=cli.stage_inputs(args), lora=cli.lora_settings(args), train=cli.train_config(args),
        shards=cli.shard_config(args), anchor_idx_path=args.anchor_idx_path, output_dir=args.output_dir))


if __name__ == "__main__":
    run_cli(main)
