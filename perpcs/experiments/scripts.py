"""The one table of the repository's top-level scripts: what the experiments (ablation, study, leaderboard, demo) run.

Only this layer (and ``python -m perpcs``) names a script; a script moved or renamed changes here alone
(tests/test_code_map.py keeps the layers below from naming one).
"""
from __future__ import annotations

from pathlib import Path

from perpcs.paths import REPO_ROOT

# name -> path relative to the repository root
SCRIPTS = {
    "make_sample": "data/make_sample.py",
    "prepare_lamp": "data/prepare_lamp.py",
    "gen_profile": "data/gen_profile.py",
    "task_lora": "task_LoRA.py",                              # stage 1 (and the base model without a LoRA)
    "sharer_selection": "anchor_selection/history_anchor.py",  # stage 2
    "sharer_loras": "train_anchor_PEFT.py",                   # stage 3
    "sharer_gates": "train_anchor_gate.py",                   # stage 4
    "lora_composition": "lora_composition.py",                # stage 5 (and its controls)
    "oppu": "OPPU.py",
    "eval_task": "eval/eval_task.py",
    "eval_all": "eval/eval_all.py",
    "ablation": "scripts/ablation.py",
    "study": "scripts/study.py",
}


def script(name: str) -> str:
    """The script's path relative to the repository root, as the commands run from there name it."""
    try:
        return SCRIPTS[name]
    except KeyError:
        raise KeyError(f"no top-level script {name!r}; known: {', '.join(SCRIPTS)}") from None


def script_path(name: str) -> Path:
    """The script's absolute path."""
    return REPO_ROOT / script(name)


def script_path_from_cwd(name: str) -> Path:
    """Relative to the working directory when the repository is (shorter commands), else absolute."""
    path = script_path(name)
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path
