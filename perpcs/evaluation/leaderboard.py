"""A LaMP leaderboard submission file from a stage's predictions on LaMP's test questions (the leaderboard split).

LaMP's own evaluation (``eval/evaluation.py``, ``evaluate_all``) reads every ``*.json`` of the submitted zip, keys
each by its ``"task"`` field and requires the predicted ids to equal the gold ids; file names are not read. Both
LaMP-2 versions are called ``LaMP_2`` in LaMP's files, so that is the task name written for them; the file is
named after it (``LaMP_2.json``).
"""
from __future__ import annotations

from pathlib import Path

from perpcs.atomic import write_json_atomic
from perpcs.data.layout import Layout, outputs_by_id, read_json
from perpcs.data.tasks import Task
from perpcs.errors import fail
from perpcs.paths import COMPOSITION, OPPU, TASK_LORA, split_output_dir

# method -> its stage's output folder under output/<task>/ (perpcs/experiments/leaderboard.py runs the stage)
METHODS = {"per-pcs": COMPOSITION, "oppu": OPPU, "task-lora": TASK_LORA}
VARIANTS = ("kNP", "kNP-profile", "k1", "k1-profile", "k2", "k2-profile", "k4", "k4-profile")


def leaderboard_task(task: Task) -> str:
    """The task name LaMP's leaderboard files carry: LaMP_n (both LaMP-2 versions are LaMP_2 there)."""
    return task.lamp_id.rstrip("MN")


def stage_dir(output_root, method: str) -> Path:
    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return Path(output_root) / METHODS[method]


def predictions_file(output_root, method: str, variant: str) -> Path:
    """Where the stage of ``method`` writes the ``variant`` predictions of the leaderboard users."""
    return split_output_dir(stage_dir(output_root, method), "leaderboard") / "predictions" / f"{variant}.json"


def default_output_file(output_root, method: str, variant: str, task: Task) -> Path:
    return Path(output_root) / "leaderboard" / f"{method}-{variant}" / f"{leaderboard_task(task)}.json"


def write_leaderboard_file(layout: Layout, predictions_path, output_file) -> dict:
    """{"task": "LaMP_n", "golds": [{"id", "output"}]}: one entry per LaMP test question, in the leaderboard
    users' order; the predictions must cover exactly those ids."""
    users = layout.load_split("leaderboard")
    ids = [str(q["id"]) for u in users for q in u["query"]]
    outputs = outputs_by_id(read_json(predictions_path, "leaderboard predictions"), str(predictions_path))
    missing = [i for i in ids if i not in outputs]
    if missing:
        fail(f"{predictions_path}: no prediction for {len(missing)} of the {len(ids)} LaMP test questions "
             f"(first: {', '.join(missing[:5])}); run the stage again with --test_split leaderboard (it resumes)")
    extra = sorted(set(outputs) - set(ids))
    if extra:
        fail(f"{predictions_path}: {len(extra)} predictions are for ids that are not LaMP test questions of "
             f"{layout.leaderboard_users} (first: {', '.join(extra[:5])}); were they made from another prepare run?")
    board = {"task": leaderboard_task(layout.task), "golds": [{"id": i, "output": outputs[i]} for i in ids]}
    write_json_atomic(output_file, board)
    return board
