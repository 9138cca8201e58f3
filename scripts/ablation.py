"""Ablation sweeps of Per-Pcs on one task: sharer count, selection strategy, share ratio, top-k.

    python scripts/ablation.py --task_name movie_tagging --sweep k --values 10 25 50 \
        --extra "--llama_model_path ./llama_download/Llama-2-7b --device cuda"
    python scripts/ablation.py --task_name movie_tagging --sweep all --dry_run

Each setting runs stages 2-5 (k, strategy) or stage 5 (share_ratio, topk) into its own dirs, skipping what is
already done (the sharer LoRAs and gates of stages 3-4 are shared by all settings); then every run is scored,
plotted (output/<task>/ablation/<sweep>.png, costs.png) and written to output/<task>/ablation/results.json.
Stage 1 (task_LoRA.py) must have run. A flag list that is one word needs '=': --extra=--no-grad_ckpt.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perpcs.experiments.ablation import (DEFAULT_VALUES, PIPELINE, STRATEGIES, SWEEPS, AblationConfig, Setting,
                                         run_ablation, split_flags, sweep_values)
from perpcs.errors import run_cli  # noqa: E402
from perpcs.data.tasks import get_task  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_name", required=True, help="movie_tagging, news_headline, ... or a LaMP id")
    p.add_argument("--sweep", choices=SWEEPS + ("all",), default="all",
                   help="which analysis; all = each with its default values")
    p.add_argument("--values", nargs="+", default=None,
                   help="settings of the sweep; defaults: " +
                   "; ".join(f"{s}: {' '.join(map(str, v))}" for s, v in DEFAULT_VALUES.items()))
    p.add_argument("--dry_run", action="store_true", help="print the commands that would run, run nothing")
    p.add_argument("--output_root", default="output", help="runs go to <output_root>/<task>/")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--anchor_dir", default=None,
                   help="the pipeline's stage 2 dir, reused for k 50 / cluster (default anchor_selection/<task>)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the stage scripts")
    p.add_argument("--extra", default="", help="flags for stages 3, 4 and 5, e.g. \"--device cpu --max_seq_len 512\"")
    p.add_argument("--anchor_extra", default="", help="flags for stage 2 only, e.g. \"--min_history 5\"")
    p.add_argument("--peft_extra", default="", help="flags for stage 3 only, e.g. \"--max_step 12\"")
    p.add_argument("--gate_extra", default="", help="flags for stage 4 only")
    p.add_argument("--compose_extra", default="", help="flags for stage 5 only, e.g. \"--recent_k 16\"")
    p.add_argument("--base_k", type=int, default=PIPELINE.k, help="k while another setting is swept")
    p.add_argument("--base_strategy", choices=STRATEGIES, default=PIPELINE.strategy)
    p.add_argument("--base_share_ratio", type=float, default=PIPELINE.share_ratio)
    p.add_argument("--base_topk", type=int, default=PIPELINE.topk)
    p.add_argument("--max_users", type=int, default=100, help="x range of the storage / time curves")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = AblationConfig(
        task=get_task(args.task_name), output_root=Path(args.output_root), data_dir=Path(args.data_dir),
        anchor_root=Path(args.anchor_dir) if args.anchor_dir else None, python=args.python,
        extra=split_flags(args.extra), anchor_extra=split_flags(args.anchor_extra),
        peft_extra=split_flags(args.peft_extra), gate_extra=split_flags(args.gate_extra),
        compose_extra=split_flags(args.compose_extra),
        base=Setting(args.base_k, args.base_strategy, args.base_share_ratio, args.base_topk))
    return run_ablation(config, sweep_values(args.sweep, args.values), args.dry_run, args.max_users)


if __name__ == "__main__":
    run_cli(main)
