"""``python -m perpcs leaderboard``: one method's predictions for LaMP's test questions (the leaderboard split), in
the leaderboard's format. If the method's stage has not predicted them yet, it is run with ``--test_split
leaderboard``, the flags of its run on the test users (from that run's manifest) and the caller's flags; leaderboard
predictions made with other settings or inputs than the test run's are refused. Writing the file itself is
perpcs/evaluation/leaderboard.py's.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from perpcs.data.layout import Layout
from perpcs.data.tasks import get_task
from perpcs.errors import fail
from perpcs.evaluation.leaderboard import default_output_file, predictions_file, stage_dir, write_leaderboard_file
from perpcs.experiments.runner import run_command
from perpcs.experiments.scripts import script_path
from perpcs.paths import split_output_dir
from perpcs.stages.manifest import MANIFEST_FILE, describe_differences, differences, read_manifest

# method -> the script (experiments/scripts.py) of the stage that predicts it
METHOD_SCRIPTS = {"per-pcs": "lora_composition", "oppu": "oppu", "task-lora": "task_lora"}
# set from the request itself; after -- they would send the run elsewhere
OWN_FLAGS = ("--output_dir", "--test_split", "--task_name", "--data_dir")


@dataclass(frozen=True)
class LeaderboardRequest:
    task_name: str
    method: str                        # a key of METHOD_SCRIPTS
    variant: str = "k1-profile"        # which prediction file of the stage
    data_dir: str = "data"
    output_root: str | None = None     # the stages' outputs; default output/<task>
    output_file: str | None = None     # default <output_root>/leaderboard/<method>-<variant>/LaMP_<n>.json
    rerun: bool = False                # run the stage again even if its predictions exist
    standalone: bool = False           # no test run to inherit from: the stage's defaults and stage_args
    stage_args: tuple = ()             # flags for the stage script


def leaderboard_file(request: LeaderboardRequest) -> Path:
    """Run the stage on the leaderboard users if needed, check its predictions, write LaMP's file; returns its path."""
    task = get_task(request.task_name)
    layout = Layout(request.data_dir, task)
    output_root = Path(request.output_root or Path("output") / task.name)
    stage_args = list(request.stage_args)
    if stage_args[:1] == ["--"]:
        stage_args = stage_args[1:]
    for flag in OWN_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in stage_args):
            fail(f"{flag} is set by `python -m perpcs leaderboard` itself (from --output_root, --task_name, "
                 f"--data_dir); leave it out of the flags after --")
    preds = predictions_file(output_root, request.method, request.variant)
    if not layout.leaderboard_users.is_file():
        fail(f"{layout.leaderboard_users} not found: run data/prepare_lamp.py --task_name {task.name} on the LaMP "
             f"folder that holds test_questions.json (or its test/ subfolder)")
    method_dir = stage_dir(output_root, request.method)
    test_run = None if request.standalone else test_run_manifest(method_dir, request.method)
    if not preds.is_file() or request.rerun:
        script = script_path(METHOD_SCRIPTS[request.method])
        inherited = inherited_flags(test_run, request.method) if test_run else []
        command = [sys.executable, str(script), *inherited, "--task_name", task.name,
                   "--data_dir", str(Path(request.data_dir).resolve()),
                   "--output_dir", str(method_dir.resolve()), "--test_split", "leaderboard", *stage_args]
        cwd = test_run["recorded"].get("cwd") if test_run else None
        print(("running (--standalone: the flags after -- and the stage's defaults): " if test_run is None else
               f"running (the test run's flags, from its {MANIFEST_FILE}, in {cwd}): ") + " ".join(command), flush=True)
        if run_command(command, cwd=cwd) != 0:
            fail(f"{script.name} --test_split leaderboard failed (its message is above)")
        if not preds.is_file():
            fail(f"{script.name} wrote no {preds} (other shards still running? a --k_list without this variant?)")
    if test_run is not None:
        refuse_mixed_runs(method_dir, test_run)
    out = Path(request.output_file or default_output_file(output_root, request.method, request.variant, task))
    board = write_leaderboard_file(layout, preds, out)
    print(f"{len(board['golds'])} predictions of {request.method} ({request.variant}) for LaMP's test questions, task "
          f"{board['task']} -> {out}")
    return out


def test_run_manifest(stage_root: Path, method: str) -> dict:
    """The manifest of the stage's run on the test users: the leaderboard run inherits its settings and inputs."""
    manifest = read_manifest(stage_root / MANIFEST_FILE)
    if manifest is None:
        fail(f"{stage_root / MANIFEST_FILE} not found: the leaderboard predictions are made with the settings and "
             f"inputs of the {method} run on the test users, which it records; run that stage on the test split "
             f"first (outputs of an older version have no manifest: run it again with --overwrite)")
    return manifest


def inherited_flags(test_run: dict, method: str) -> list:
    """The test run's own flags (its script path dropped), made safe to repeat: never --overwrite (stage 1 would
    train the task LoRA again under every other output), one process (the leaderboard run is not sharded)."""
    flags = list(test_run["recorded"]["command"][1:]) + ["--no-overwrite"]
    if method != "task-lora":
        flags += ["--num_shards", "1", "--shard_id", "0"]
    return flags


def refuse_mixed_runs(stage_root: Path, test_run: dict) -> None:
    """The leaderboard predictions must come from the test run's settings, inputs and numerics (other users)."""
    path = split_output_dir(stage_root, "leaderboard") / MANIFEST_FILE
    board = read_manifest(path)
    if board is None:
        fail(f"{path} not found: the leaderboard predictions record nothing of what made them; pass --rerun")
    keys = ("stage", "settings", "inputs", "numerics")
    diffs = differences({k: test_run.get(k) for k in keys}, {k: board.get(k) for k in keys})
    if diffs:
        fail(f"{path}: the leaderboard predictions were made otherwise than the test run's in {stage_root} "
             f"({describe_differences(diffs)}); they would not describe the same method: pass --rerun without the "
             f"flags that differ (after --), or run the test users again with those settings")
