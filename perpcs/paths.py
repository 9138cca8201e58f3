"""Where every stage writes by default: the layout of the published commands (seed_commands.md), in one table.

    output/<task>/task-base_LLM/          stage 1: the task LoRA (+ baseline predictions)
    output/<task>/Anchor_PEFT/LoRA/       stage 3: user_<id>/ one LoRA per sharer
    output/<task>/Anchor_PEFT/gate/       stage 4: user_<id>/ gates per sharer
    output/<task>/LoRA-Composition/       stage 5: recipes, predictions, summary
    output/<task>/OPPU/                   the OPPU baseline
    anchor_selection/<task>/              stage 2: anchor_user_idx.json (anchored at the repository)
"""
from __future__ import annotations

from pathlib import Path

OUTPUT_ROOT = Path("./output")
TASK_LORA = "task-base_LLM"
SHARERS = "Anchor_PEFT"                  # the published parent of the sharers' LoRAs and gates
SHARER_LORAS = f"{SHARERS}/LoRA"
SHARER_GATES = f"{SHARERS}/gate"
COMPOSITION = "LoRA-Composition"         # ablation settings write LoRA-Composition-<tag>/ beside it
OPPU = "OPPU"


def stage_dirs(task_name: str, root=OUTPUT_ROOT) -> dict:
    """The default output directory of every stage of one task (keys: task_lora, anchor_peft, anchor_gate,
    composition, oppu)."""
    task_root = Path(root) / task_name
    return {"task_lora": task_root / TASK_LORA, "anchor_peft": task_root / SHARER_LORAS,
            "anchor_gate": task_root / SHARER_GATES, "composition": task_root / COMPOSITION,
            "oppu": task_root / OPPU}
