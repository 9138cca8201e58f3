"""The held-out-seed study of Per-Pcs on the sample data (issue 15): settings chosen on seeds the demo never uses.

    python scripts/study.py                       # the study docs/study.md reports (CPU, hours; resumable)
    python scripts/study.py --dry_run             # the commands, nothing run
    python scripts/study.py --seeds 1 --n_groups 5 --variants published center --tasks movie_tagging --jobs 2
    python scripts/study.py --sweep k=8 sharer_steps=40 gate_steps=16 topk=2 recent_k=8 --variants published
                                                  # the earlier sweeps (docs/study.md's settings table)

Each (task, seed, number of latent groups) gets its own sample and runs the demo's pipeline (scripts/demo.sh's
flags) in <root>/<task>/seed<s>-groups<g>/, for each variant (published, center, routing, routing+center), with
the controls on the base setting and on the k sweep (k = groups x 1 and x 2), then any other sweeps (one setting
varied at a time). A subset (--tasks, --seeds, --n_groups, --variants) runs part of it; a rerun resumes. Results: <root>/results.json, study.md, study.png. See perpcs/experiments/study.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perpcs.errors import run_cli  # noqa: E402
from perpcs.experiments.study import (CONTROLS, RETRIEVAL_CONTROLS, VARIANTS, StudyConfig, StudySetting,  # noqa: E402
                                      collect, parse_sweeps, run_study)

BASE = StudySetting()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["movie_tagging", "product_rating"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="sample seeds (never 0, the demo's)")
    p.add_argument("--n_groups", type=int, nargs="+", default=[3, 5], help="latent user groups of the samples")
    p.add_argument("--root", default="output/study")
    for name, default in vars(BASE).items():
        p.add_argument(f"--base_{name}", type=int, default=default, help=f"base setting: {name}")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="published; center: lora_composition.py --score_calibration center; routing: "
                        "train_anchor_gate.py --gate_objective routing; routing+center: both")
    p.add_argument("--k_per_group", type=int, nargs="*", default=[1, 2],
                   help="the k sweep: k = groups x each, beside the base k (empty: none)")
    p.add_argument("--sweep", nargs="*", default=[],
                   help="NAME=V1,V2 ... one setting varied at a time around the base (names: k, sharer_steps, "
                        "gate_steps, topk, recent_k); Per-Pcs only, no controls")
    p.add_argument("--sweep_groups", type=int, nargs="*", default=[5],
                   help="run the k sweep and the sweeps only on samples with these group counts (empty: on all)")
    p.add_argument("--controls", nargs="*", default=list(CONTROLS + RETRIEVAL_CONTROLS),
                   choices=list(CONTROLS + RETRIEVAL_CONTROLS))
    p.add_argument("--jobs", type=int, default=2, help="samples run side by side (one thread each)")
    p.add_argument("--dry_run", action="store_true", help="print every command still to run and a count per kind "
                   "of step; run nothing")
    p.add_argument("--collect", action="store_true", help="only score what has run")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    base = StudySetting(**{name: getattr(args, f"base_{name}") for name in vars(BASE)})
    cfg = StudyConfig(tasks=args.tasks, seeds=args.seeds, n_groups=args.n_groups, root=Path(args.root), base=base,
                      sweeps=parse_sweeps(args.sweep), sweep_groups=args.sweep_groups or None,
                      controls=tuple(args.controls), python=sys.executable, jobs=args.jobs,
                      variants=tuple(args.variants), k_per_group=tuple(args.k_per_group))
    if args.collect:
        collect(cfg)
    else:
        run_study(cfg, dry_run=args.dry_run)


if __name__ == "__main__":
    run_cli(main)
