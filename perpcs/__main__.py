"""``python -m perpcs <command>``: small tools beside the stage scripts.

show-prompts  print the exact prompts the model gets for the first n queries of a split
materialize   rebuild a user's peft adapter from its recipe and the sharer LoRAs
report        the results table of one task (task LoRA, OPPU, Per-Pcs) from output/<task>/
explain       what Per-Pcs recipes say: weight per sharer, per layer and module, heatmaps, entropy, routing
leaderboard   predictions for LaMP's test questions in the leaderboard's format (runs the stage if needed)
demo-flags    the commands of one step of the demo (scripts/demo.sh), from the demo's settings in perpcs/experiments/demo.py
export        base + task LoRA merged, and every sharer / Per-Pcs / OPPU adapter on it, as one servable folder
"""
from __future__ import annotations

import argparse
from pathlib import Path

from perpcs.checks import COUNT, NON_NEGATIVE_INT
from perpcs.errors import fail, run_cli
from perpcs.experiments.demo import DEMO_STEPS


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
    table = results_table(args.task_name, args.data_dir, args.output_root, groups_file=args.groups_file)
    print(table)
    if args.output_file:
        write_bytes_atomic(args.output_file, table.encode("utf-8"))
        print(f"saved to {args.output_file}")


def explain_cmd(args) -> None:
    from perpcs.evaluation.explain import explain, load_recipes
    from perpcs.paths import COMPOSITION, GATE_SCORES_DIR, OUTPUT_ROOT
    if not (args.recipe or args.recipes_dir or args.task_name):
        fail("explain needs --recipe FILE, --recipes_dir DIR or --task_name (for output/<task>/LoRA-Composition)")
    recipes_dir = args.recipes_dir or (None if args.recipe else OUTPUT_ROOT / args.task_name / COMPOSITION / "recipes")
    out = args.output_dir or Path(args.recipe or recipes_dir).resolve().parent / (
        "explain" if not args.recipe else f"explain_{Path(args.recipe).stem}")
    rdir = Path(args.recipe).parent if args.recipe else Path(recipes_dir)
    scores_dir = args.scores_dir or rdir.parent / GATE_SCORES_DIR   # where stage 5 --save_scores writes them
    if args.scores_dir and not Path(args.scores_dir).is_dir():
        fail(f"--scores_dir {args.scores_dir}: no such directory")
    print(explain(load_recipes(args.recipe, recipes_dir), out, args.groups_file,
                  scores_dir if Path(scores_dir).is_dir() else None))
    print(f"saved explain.md, explain.json and one heatmap per user to {out}")


def leaderboard_cmd(args) -> None:
    from perpcs.experiments.leaderboard import LeaderboardRequest, leaderboard_file
    leaderboard_file(LeaderboardRequest(args.task_name, args.method, args.variant, args.data_dir, args.output_root,
                                        args.output_file, args.rerun, args.standalone, tuple(args.stage_args)))


def demo_flags_cmd(args) -> None:
    import shlex
    from perpcs.experiments.demo import ENV, demo_commands
    if args.step == "env":
        print(" ".join(f"{name}={value}" for name, value in ENV.items()))
    else:
        for command in demo_commands(args.step, args.task_name, args.max_gen_len):
            print(shlex.join(command))


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
    sp.add_argument("--split", default="test", choices=["test", "base", "candidate", "reserve", "leaderboard"])
    sp.add_argument("--n", type=lambda text: COUNT.parse("--n", text), default=3, help="at least 1")
    sp.add_argument("--k", type=lambda text: NON_NEGATIVE_INT.parse("--k", text), default=1,
                    help="BM25 history items (0 = none)")
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
    rp.add_argument("--groups_file", default=None, help="the sample's latent groups (data/make_sample.py "
                    "--groups_file): adds the routing share of Per-Pcs's recipes under the table")
    rp.set_defaults(func=report_cmd)
    ep = sub.add_parser("explain", allow_abbrev=False, help="what Per-Pcs recipes say (sharer weights, heatmaps)")
    src = ep.add_mutually_exclusive_group()
    src.add_argument("--recipe", default=None, help="one recipe file (<stage 5 output>/recipes/user_<id>.json)")
    src.add_argument("--recipes_dir", default=None, help="every recipe of a run (default with --task_name: "
                     "output/<task>/LoRA-Composition/recipes)")
    ep.add_argument("--task_name", default=None)
    ep.add_argument("--groups_file", default=None, help="the sample's latent groups (data/make_sample.py "
                    "--groups_file): adds how much weight goes to sharers of the user's own group")
    ep.add_argument("--output_dir", default=None, help="where explain.md, explain.json and the heatmaps go "
                    "(default: explain/ beside the recipes dir)")
    ep.add_argument("--scores_dir", default=None, help="the gate scores behind the recipes (lora_composition.py "
                    "--save_scores; default: gate_scores/ beside the recipes dir, when it exists): adds where the "
                    "choices come from (a per-sharer offset or the user)")
    ep.set_defaults(func=explain_cmd)
    lp = sub.add_parser("leaderboard", allow_abbrev=False,
                        help="LaMP leaderboard file of one task and method (LaMP's test questions)",
                        description="Write the predictions of one method for LaMP's test questions (the "
                                    "leaderboard split of data/<task>/) as LaMP's leaderboard takes them: "
                                    "{\"task\": \"LaMP_n\", \"golds\": [{\"id\", \"output\"}]}. If the "
                                    "method's stage has not predicted them yet, it is run with --test_split "
                                    "leaderboard, the flags of its run on the test users (from that run's "
                                    "manifest) and the flags after --; leaderboard predictions made with other "
                                    "settings or inputs than the test run's are refused.")
    lp.add_argument("--task_name", required=True)
    lp.add_argument("--method", required=True, choices=["per-pcs", "oppu", "task-lora"])
    lp.add_argument("--variant", default="k1-profile",
                    choices=["kNP", "kNP-profile", "k1", "k1-profile", "k2", "k2-profile", "k4", "k4-profile"],
                    help="which prediction file of the stage (BM25 k, with/without the profile text)")
    lp.add_argument("--data_dir", default="data")
    lp.add_argument("--output_root", default=None, help="the stages' outputs; default output/<task>")
    lp.add_argument("--output_file", default=None,
                    help="default <output_root>/leaderboard/<method>-<variant>/LaMP_<n>.json")
    lp.add_argument("--rerun", action="store_true", help="run the stage again even if its predictions exist")
    lp.add_argument("--standalone", action="store_true",
                    help="no run on the test users to inherit from: run the stage with the flags after -- and its "
                         "defaults (by default the stage runs with the test run's flags, recorded in its "
                         "run_manifest.json, and predictions made otherwise are refused)")
    lp.add_argument("stage_args", nargs=argparse.REMAINDER,
                    help="after --: flags for the stage script (e.g. --llama_model_path, --lora_ckpt, --anchor_dir)")
    lp.set_defaults(func=leaderboard_cmd)
    dp = sub.add_parser("demo-flags", allow_abbrev=False, help="the commands of one step of scripts/demo.sh",
                        description="Print the commands of one step of the demo (scripts/demo.sh), one a line, each "
                                    "what follows the interpreter (script and flags), shell-quoted; `env` prints the "
                                    "environment the demo runs in. The demo's settings live in "
                                    "perpcs/experiments/demo.py, which the study shares.")
    dp.add_argument("step", choices=["env", *DEMO_STEPS])
    dp.add_argument("--task_name", default=None, help="the demo's TASK (every step but env)")
    dp.add_argument("--max_gen_len", default=None, help="the demo's MAX_GEN_LEN: new tokens for every generating step")
    dp.set_defaults(func=demo_flags_cmd)
    xp = sub.add_parser("export", allow_abbrev=False, help="a servable folder: merged base and every adapter on it")
    xp.add_argument("--task_name", required=True)
    xp.add_argument("--output_dir", required=True, help="a new (or empty) directory")
    xp.add_argument("--output_root", default=None, help="the stages' outputs; default output/<task>")
    xp.add_argument("--llama_model_path", default=None,
                    help="the base model the outputs were made from; default: the path the task LoRA names or the "
                         "bundled SmolLM2, whichever the outputs' records match")
    xp.set_defaults(func=export_cmd)
    args = p.parse_args(argv)
    if args.command == "demo-flags" and args.step != "env" and not args.task_name:
        p.error("demo-flags: --task_name is required for every step but env")
    args.func(args)


if __name__ == "__main__":
    run_cli(main)
