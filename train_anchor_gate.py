r"""Stage 4: one gate vector per piece of each sharer LoRA (the LoRA frozen, only the gates train).

    python train_anchor_gate.py --task_name movie_tagging --llama_model_path ./llama_download/Llama-2-7b \
        --lora_ckpt ./output/movie_tagging/task-base_LLM/lora_ckpt.pt --anchor_path ./output/movie_tagging/Anchor_PEFT \
        --output_dir ./output/movie_tagging/Anchor_PEFT/gate
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
    # SPEC 5: 200 optimizer steps, the lr a cosine over 2 epochs of this user's batches (repeating past them)
    cli.add_train_args(p, lr=2e-5, weight_decay=0.0, batch_size=6, epochs=2, max_step=200,
                       max_seq_len=3300)
    cli.add_shard_args(p)
    p.add_argument("--lora_ckpt", default=None, help="task LoRA of stage 1; default ./output/<task>/task-base_LLM")
    p.add_argument("--anchor_path", default=None,
                   help="sharer LoRAs of stage 3 (holding user_<id>/, or the parent Anchor_PEFT/ of its LoRA/); "
                        "default ./output/<task>/Anchor_PEFT/LoRA")
    p.add_argument("--anchor_idx_path", default=None,
                   help="stage 2 output; default anchor_selection/<task>/anchor_user_idx.json (a missing "
                        "published anchor_user_idx.pt resolves to it)")
    p.add_argument("--recent_k", type=int, default=2000, help="gates train on the last recent_k history items")
    p.add_argument("--output_dir", default=None,
                   help="default ./output/<task>/Anchor_PEFT/gate (user_<id>/gates.safetensors each)")
    return cli.parse(p, argv)


def main(argv=None):
    from perpcs.stages.config import SharerGateStage
    from perpcs.stages.sharer_gates import train_sharer_gates
    args = parse_args(argv)
    return train_sharer_gates(SharerGateStage(
        inputs=cli.stage_inputs(args), train=cli.train_config(args), shards=cli.shard_config(args),
        anchor_path=args.anchor_path, anchor_idx_path=args.anchor_idx_path, recent_k=args.recent_k,
        output_dir=args.output_dir))


if __name__ == "__main__":
    run_cli(main)
