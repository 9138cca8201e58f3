"""The demo's results table: task LoRA, OPPU and Per-Pcs on one task, with storage and time per target user."""
from __future__ import annotations

from pathlib import Path

from .data import Layout, read_json
from .errors import fail
from .metrics import evaluate_task
from .paths import COMPOSITION, OPPU, TASK_LORA
from .runner import last_per_user
from .tasks import get_task

VARIANTS = [("kNP", "no retrieval"), ("k1", "BM25 k=1"), ("k1-profile", "BM25 k=1 + profile")]


def _per_user_seconds(log_path: Path, key: str) -> float | None:
    """Mean of one timing over the users of a per-user log (the last positive record of each user counts)."""
    last = last_per_user(log_path, key)
    return sum(last.values()) / len(last) if last else None


def _adapter_bytes(adapter_dir: Path) -> int | None:
    files = list(adapter_dir.glob("*")) if adapter_dir.is_dir() else []
    return sum(f.stat().st_size for f in files if f.is_file()) or None


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def results_table(task_name: str, data_dir="data", output_root=None) -> str:
    """Markdown table of every method x variant found under output/<task>/."""
    task = get_task(task_name)
    root = Path(output_root or Path("output") / task.name)
    if (root / task.name).is_dir() and not (root / TASK_LORA).is_dir():
        root = root / task.name        # given the parent dir (output/), as eval_all takes it
    golds = Layout(data_dir, task).load_golds()
    oppu_adapters = sorted((root / OPPU / "adapters").glob("user_*"))
    summary_path = root / COMPOSITION / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else None
    methods = [
        ("task LoRA (non-personalized)", root / TASK_LORA / "predictions", 0, None),
        ("OPPU", root / OPPU / "predictions",
         _adapter_bytes(oppu_adapters[0]) if oppu_adapters else None,
         _per_user_seconds(root / OPPU / "users_log.jsonl", "train_seconds")),
        ("Per-Pcs", root / COMPOSITION / "predictions",
         summary["mean"]["recipe_bytes"] if summary else None,
         summary["mean"]["assembly_seconds"] if summary else None),
    ]
    metric_names = None
    rows = []
    for method, pred_dir, storage, seconds in methods:
        for stem, label in VARIANTS:
            path = pred_dir / f"{stem}.json"
            if not path.is_file():
                continue
            scores = evaluate_task(golds, read_json(path), task)
            metric_names = metric_names or list(scores)
            rows.append((method, label, scores, storage, seconds))
    if not rows:
        fail(f"no prediction files under {root} (looked for {', '.join(str(m[1]) for m in methods)}); run the "
             f"stages first, or pass --output_root output/<task>")
    head = "| method | variant | " + " | ".join(metric_names) + " | storage / user | seconds / user |"
    lines = [f"# {task.name} ({task.lamp_id}): results", "", head, "|" + "---|" * (len(metric_names) + 4)]
    for method, label, scores, storage, seconds in rows:
        cells = " | ".join(f"{scores[m]:.4f}" for m in metric_names)
        secs = "-" if seconds is None else f"{seconds:.1f}"
        lines.append(f"| {method} | {label} | {cells} | {_fmt_bytes(storage)} | {secs} |")
    lines += ["", "storage / user: the task LoRA is shared by all users; OPPU stores a full LoRA per user; "
              "Per-Pcs stores a recipe (sharer ids and weights per piece). seconds / user: OPPU's training "
              "of the user's LoRA vs Per-Pcs's assembly (no gradient step); prediction time is the same for both."]
    return "\n".join(lines) + "\n"
