"""Where every stage writes by default: the layout of the published commands (seed_commands.md), in one table.

    output/<task>/task-base_LLM/          stage 1: the task LoRA (+ baseline predictions)
    output/<task>/Anchor_PEFT/LoRA/       stage 3: user_<id>/ one LoRA per sharer
    output/<task>/Anchor_PEFT/gate/       stage 4: user_<id>/ gates per sharer
    output/<task>/LoRA-Composition/       stage 5: recipes, predictions, summary
    output/<task>/LoRA-Composition-control-<name>/   stage 5 --control <name>: a user-blind control
    output/<task>/base_LLM/               stage 1 --base_only: predictions of the base model without any LoRA
    output/<task>/OPPU/                   the OPPU baseline
    anchor_selection/<task>/              stage 2: anchor_user_idx.json (anchored at the repository)
"""
from __future__ import annotations

import re
from pathlib import Path

from perpcs.errors import fail

OUTPUT_ROOT = Path("./output")
TASK_LORA = "task-base_LLM"
SHARERS = "Anchor_PEFT"                  # the published parent of the sharers' LoRAs and gates
SHARER_LORAS = f"{SHARERS}/LoRA"
SHARER_GATES = f"{SHARERS}/gate"
COMPOSITION = "LoRA-Composition"         # ablation settings write LoRA-Composition-<tag>/ beside it
OPPU = "OPPU"
BASE_ONLY = "base_LLM"                   # stage 1 --base_only: the base model's predictions, no LoRA
# stage 5 --control: user-blind controls, then the PEFT-retrieval rows (one sharer's whole LoRA per user)
CONTROLS = ("uniform", "swapped", "peft_merge", "nearest_sharer", "random_sharer")


# User ids name files and folders (user_<id>/, user_<id>.json): an id is never a path. Real LaMP question ids are
# digits ("110"), ours "u" + one ("u110"), the sample's digits too; no '/', '\\', space or NUL, and no leading
# '.' (never '.', '..' or a hidden staging name) nor '-' (never read as a flag).
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ID_RULE = ("an id names files (user_<id>), so it must be 1 to 128 ASCII letters, digits, '_', '.' or '-', "
           "starting with a letter, digit or '_'")


def is_safe_id(uid) -> bool:
    return isinstance(uid, (str, int)) and not isinstance(uid, bool) and SAFE_ID.fullmatch(str(uid)) is not None


def safe_id(uid, what: str = "user id") -> str:
    """``uid`` as text, or an error naming it and the rule (the last line of defence: data loading checks first,
    naming the file and the user)."""
    if not is_safe_id(uid):
        fail(f"{what} {uid!r} cannot name a file: {ID_RULE}")
    return str(uid)


def user_file_name(uid, suffix: str = "") -> str:
    """``user_<id><suffix>``: the one way a user id becomes a file or folder name."""
    return f"user_{safe_id(uid)}{suffix}"


def control_dir_name(control: str) -> str:
    return f"{COMPOSITION}-control-{control}"
REPO_ROOT = Path(__file__).resolve().parents[1]
INDEX_FILE = "anchor_user_idx.json"          # stage 2's output, under anchor_selection/<task>/
EMB_FILE = "user_history_emb.npy"            # stage 2's embedding cache beside it
EMB_META_FILE = "user_history_emb.json"      # sidecar: what the embeddings were computed from
PUBLISHED_INDEX_NAME = "anchor_user_idx.pt"  # the published stage 2's pickle; ours is anchor_user_idx.json
GATE_SCORES_DIR = "gate_scores"              # stage 5 --save_scores: beside recipes/, read by explain and the study


def stage_dirs(task_name: str, root=OUTPUT_ROOT) -> dict:
    """The default output directory of every stage of one task (keys: task_lora, sharer_loras, sharer_gates,
    composition, oppu, base_only)."""
    task_root = Path(root) / task_name
    return {"base_only": task_root / BASE_ONLY, "task_lora": task_root / TASK_LORA, "sharer_loras": task_root / SHARER_LORAS,
            "sharer_gates": task_root / SHARER_GATES, "composition": task_root / COMPOSITION,
            "oppu": task_root / OPPU}


def default_selection_dir(task) -> Path:
    """``<repo>/anchor_selection/<task>``, whatever the working directory (stage 3 looks there)."""
    return REPO_ROOT / "anchor_selection" / task.name


def default_dirs(task_name: str) -> dict:
    """The stages' default outputs and stage 2's index."""
    return {**stage_dirs(task_name), "sharer_index": default_sharer_index(task_name)}


def default_sharer_index(task_name: str) -> Path:
    """Where stage 2 writes by default (anchored at the repo, as history_anchor.py runs from anywhere)."""
    return REPO_ROOT / "anchor_selection" / task_name / INDEX_FILE


def resolve_sharer_index(path, task_name: str) -> Path:
    """Stage 2's index file. The published step 4 names ./anchor_selection/most_active/anchor_user_idx.pt, a
    file nothing writes: a missing file of that name (or of ours) resolves to the index stage 2 wrote, with one
    line saying so; any other missing path is an error naming the file stage 2 writes."""
    written = default_sharer_index(task_name)
    if path is None:
        return written
    path = Path(path)
    if path.is_file():
        return path
    sibling = path.with_name(INDEX_FILE)
    if path.name in (PUBLISHED_INDEX_NAME, INDEX_FILE):
        for found in (sibling, written):
            if found.is_file():
                print(f"note: --anchor_idx_path {path} does not exist (the published commands name a file their "
                      f"stage 2 never writes); using {found}, written by anchor_selection/history_anchor.py")
                return found
    fail(f"--anchor_idx_path {path}: no such file; stage 2 (anchor_selection/history_anchor.py --task_name "
         f"{task_name}) writes {written}" + ("" if written.is_file() else ", which does not exist yet either"))


def resolve_sharer_lora_dir(path) -> Path:
    """The dir holding the sharers' user_<id>/ adapters. The published step 4 passes the parent Anchor_PEFT/ of
    the LoRA/ that step 3 wrote; output/<task>/ (holding Anchor_PEFT/LoRA/) is accepted too."""
    path = Path(path)
    if path.is_dir() and not any(path.glob("user_*")):
        for sub in ("LoRA", SHARER_LORAS):
            if (path / sub).is_dir():
                return path / sub
    return path


def split_output_dir(out_dir, test_split: str) -> Path:
    """Where a stage writes its predictions (and recipes, logs, summary) for ``test_split``: the stage's output dir
    for the test users, its ``leaderboard/`` subfolder for LaMP's test questions (nothing collides)."""
    return Path(out_dir) / "leaderboard" if test_split == "leaderboard" else Path(out_dir)
