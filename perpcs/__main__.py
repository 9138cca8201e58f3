"""``python -m perpcs <command>``: small tools beside the stage scripts.

show-prompts  print the exact prompts the model gets for the first n queries of a split
materialize   rebuild a user's peft adapter from its recipe and the sharer LoRAs
report        the results table of one task (task LoRA, OPPU, Per-Pcs) from output/<task>/
export        base + task LoRA merged, and every sharer / Per-Pcs / OPPU adapter on it, as one servable folder
"""
from __future__ import annotations

import argparse

from perpcs.errors import fail, run_cli


def show_prompts(args) -> None:
    from perpcs.data.layout import Layout, profile_text
    from perpcs.data.prompts import UserHistory, query_example
    from perpcs.data.tasks import get_task
    task = get_task(args.task_name)
    layout = Layout(args.data_dir, task)
    users = layout.load_split(args.split)
    profiles = layout.load_profiles() if args.profile else None
    shown = 0
    for ui, user in enumerate(users):
        history = UserHistory(task, user["profile"])
        prof = profile_text(profiles, user, layout.profiles, ui) if args.profile else None
        for q in user["query"]:
            if shown >= args.n:
                return
            ex = query_example(task, q, history, args.k, prof)
            print(f"===== user {user['user_id']} query {q['id']} (k={args.k}, profile={bool(args.profile)}) =====")
            print(ex.prompt)
            print(f"----- gold:{ex.answer}")
            shown += 1
    if shown == 0:
        fail(f"{layout.split_path(args.split)}: no queries to show")


def materialize_cmd(args) -> None:
    from perpcs.method.recipes import materialize
    out = materialize(args.recipe, args.anchor_dir, args.output_dir)
    print(f"wrote the adapter to {out}")


def report_cmd(args) -> None:
    from perpcs.atomic import write_bytes_atomic
    from perpcs.evaluation.report import results_table
    table = results_table(args.task_name, args.data_dir, args.output_root)
    print(table)
    if args.output_file:
        write_bytes_atomic(args.output_file, table.encode("utf-8"))
        print(f"saved to {args.output_file}")


def export_cmd(args) -> None:
    from perpcs.stages.export import export_task
    export_task(args.task_name, args.output_dir, args.output_root, args.llama_model_path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m perpcs", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("show-prompts", allow_abbrev=False, help="print the prompts of the first n queries")
    sp.add_argument("--task_name", required=True)
    sp.add_argument("--data_dir", default="data")
    sp.add_argument("--split", default="test", choices=["test", "base", "candidate", "reserve"])
    sp.add_argument("--n", type=int, default=3)
    sp.add_argument("--k", type=int, default=1, help="BM25 history items (0 = none)")
    sp.add_argument("--profile", action="store_true", help="prepend the user's profile text")
    sp.set_defaults(func=show_prompts)
    mp = sub.add_parser("materialize", allow_abbrev=False, help="rebuild a peft adapter from a recipe")
    mp.add_argument("--recipe", required=True)
    mp.add_argument("--anchor_dir", required=True, help="the sharer LoRAs (stage 3 output)")
    mp.add_argument("--output_dir", required=True)
    mp.set_defaults(func=materialize_cmd)
    rp = sub.add_parser("report", allow_abbrev=False, help="results table of one task")
    rp.add_argument("--task_name", required=True)
    rp.add_argument("--data_dir", default="data")
    rp.add_argument("--output_root", default=None, help="default output/<task>")
    rp.add_argument("--output_file", default=None)
    rp.set_defaults(func=report_cmd)
    ep = sub.add_parser("export", allow_abbrev=False, help="a servable folder: merged base and every adapter on it")
    ep.add_argument("--task_name", required=True)
    ep.add_argument("--output_dir", required=True, help="a new (or empty) directory")
    ep.add_argument("--output_root", default=None, help="the stages' outputs; default output/<task>")
    ep.add_argument("--llama_model_path", default=None,
                    help="the base model the outputs were made from; default: the path the task LoRA names or the "
                         "bundled SmolLM2, whichever the outputs' records match")
    ep.set_defaults(func=export_cmd)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    run_cli(main)
