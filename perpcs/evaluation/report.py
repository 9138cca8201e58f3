"""The demo's results table: task LoRA, OPPU and Per-Pcs on one task, with storage and time per target user."""
from __future__ import annotations

from pathlib import Path

from perpcs.data.layout import Layout, read_json
from perpcs.data.tasks import get_task
from perpcs.errors import fail
from perpcs.evaluation.metrics import evaluate_task
from perpcs.method.storage import format_bytes, mean_adapter_bytes
from perpcs.paths import COMPOSITION, OPPU, TASK_LORA
from perpcs.stages.base import last_per_user

VARIANTS = [("kNP", "no retrieval"), ("k1", "BM25 k=1"), ("k1-profile", "BM25 k=1 + profile")]


def _per_user_seconds(log_path: Path, key: str) -> float | None:
    """Mean of one timing over the users of a per-user log (the last positive record of each user counts)."""
    last = last_per_user(log_path, key)
    return sum(last.values()) / len(last) if last else None


def results_table(task_name: str, data_dir="data", output_root=None, groups_file=None) -> str:
    """Markdown table of every method x variant found under output/<task>/ (with groups_file, the sample's latent
    groups: the routing share of Per-Pcs's recipes under it)."""
    task = get_task(task_name)
    root = Path(output_root or Path("output") / task.name)
    if (root / task.name).is_dir() and not (root / TASK_LORA).is_dir():
        root = root / task.name        # given the parent dir (output/), as eval_all takes it
    golds = Layout(data_dir, task).load_golds()
    summary_path = root / COMPOSITION / "summary.json"
    mean = (read_json(summary_path, "composition summary").get("mean") or {}) if summary_path.is_file() else {}
    # (method, predictions dir, storage / user, recipe file / user, seconds / user); None: not measured
    methods = [
        ("task LoRA (non-personalized)", root / TASK_LORA / "predictions", 0, None, None),
        ("OPPU", root / OPPU / "predictions", mean_adapter_bytes(root / OPPU / "adapters")[0], None,
         _per_user_seconds(root / OPPU / "users_log.jsonl", "train_seconds")),
        ("Per-Pcs", root / COMPOSITION / "predictions", mean.get("payload_bytes"), mean.get("recipe_bytes"),
         mean.get("assembly_seconds")),
    ]
    metric_names = None
    rows = []
    for method, pred_dir, storage, recipe_file, seconds in methods:
        for stem, label in VARIANTS:
            path = pred_dir / f"{stem}.json"
            if not path.is_file():
                continue
            scores = evaluate_task(golds, read_json(path), task)
            metric_names = metric_names or list(scores)
            rows.append((method, label, scores, storage, recipe_file, seconds))
    if not rows:
        fail(f"no prediction files under {root} (looked for {', '.join(str(m[1]) for m in methods)}); run the "
             f"stages first, or pass --output_root output/<task>")
    head = ("| method | variant | " + " | ".join(metric_names)
            + " | storage / user | recipe file / user | seconds / user |")
    lines = [f"# {task.name} ({task.lamp_id}): results", "", head, "|" + "---|" * (len(metric_names) + 5)]
    for method, label, scores, storage, recipe_file, seconds in rows:
        cells = " | ".join(f"{scores[m]:.4f}" for m in metric_names)
        secs = "-" if seconds is None else f"{seconds:.1f}"
        lines.append(f"| {method} | {label} | {cells} | {format_bytes(storage)} | {format_bytes(recipe_file)} "
                     f"| {secs} |")
    lines += ["", "storage / user: the task LoRA is shared by all users (0 per user); OPPU: the LoRA it trained "
              "for the user (adapter_model.safetensors + adapter_config.json, mean over its users); Per-Pcs: the "
              "recipe's payload, the sharer ids and the weight of each sharer in each piece (what re-materialises "
              "the LoRA from the sharer LoRAs, which all users share). recipe file / user: Per-Pcs's whole recipe "
              "file, payload plus bookkeeping (settings, batches, seed). seconds / user: OPPU's training of the "
              "user's LoRA vs Per-Pcs's assembly (no gradient step); prediction time is the same for both. "
              "-: not measured (no run, or a summary.json of an older version: run stage 5 again)."]
    if groups_file:
        from perpcs.evaluation.explain import routing_lines
        routed = routing_lines(root / COMPOSITION / "recipes", groups_file)
        lines += [""] + routed if routed else []
    return "\n".join(lines) + "\n"
