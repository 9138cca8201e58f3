"""The demo's results table: task LoRA, OPPU and Per-Pcs on one task, with storage and time per target user."""
from __future__ import annotations

from pathlib import Path

from perpcs.data.layout import Layout, read_json
from perpcs.data.tasks import get_task
from perpcs.errors import fail
from perpcs.evaluation.metrics import evaluate_task
from perpcs.method.storage import format_bytes, mean_adapter_bytes
from perpcs.paths import BASE_ONLY, COMPOSITION, OPPU, TASK_LORA, control_dir_name
from perpcs.stages.common import last_per_user

# user-blind controls of stage 5 (--control): Per-Pcs personalizes where it beats all three
CONTROL_LABELS = [("uniform", "control: uniform mix (user-blind)"),
                  ("swapped", "control: swapped history (another user's)"),
                  ("peft_merge", "control: peft merge (add_weighted_adapter, linear)")]
# PEFT-retrieval rows (stage 5 --control nearest_sharer / random_sharer): one sharer's whole LoRA per user; the
# paper's PEFT-retrieval baselines are unpublished, these are our definitions (docs/demo-and-results.md, "PEFT retrieval rows")
RETRIEVAL_LABELS = [("nearest_sharer", "PEFT retrieval (nearest sharer)"),
                    ("random_sharer", "PEFT retrieval (random sharer)")]
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
        ("base model (no LoRA)", root / BASE_ONLY / "predictions", 0, None, None),
        ("task LoRA (non-personalized)", root / TASK_LORA / "predictions", 0, None, None),
        ("OPPU", root / OPPU / "predictions", mean_adapter_bytes(root / OPPU / "adapters")[0], None,
         _per_user_seconds(root / OPPU / "users_log.jsonl", "train_seconds")),
        ("Per-Pcs", root / COMPOSITION / "predictions", mean.get("payload_bytes"), mean.get("recipe_bytes"),
         mean.get("assembly_seconds")),
    ]
    for control, label in CONTROL_LABELS + RETRIEVAL_LABELS:   # rows only for the controls that were run
        cdir = root / control_dir_name(control)
        csum = read_json(cdir / "summary.json", "control summary") if (cdir / "summary.json").is_file() else {}
        cmean = csum.get("mean") or {}
        storage = 0 if control == "peft_merge" else cmean.get("payload_bytes")   # one adapter shared by all users
        methods.append((label, cdir / "predictions", storage, cmean.get("recipe_bytes"),
                        cmean.get("assembly_seconds")))
    metric_names = None
    rows = []
    for method, pred_dir, storage, recipe_file, seconds in methods:
        for stem, label in VARIANTS:
            path = pred_dir / f"{stem}.json"
            if not path.is_file():
                continue
            scores = evaluate_task(golds, read_json(path), task, preds_name=str(path))
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
    if any(r[0].startswith("control: ") for r in rows) or any(r[0] == "base model (no LoRA)" for r in rows):
        lines += ["", "base model (no LoRA): the base model alone, where every method starts. control rows are "
                  "user-blind, from the same sharers (and gates) as Per-Pcs: uniform mix, every sharer 1/n in every "
                  "piece, the same LoRA for all users; swapped history, each user's LoRA assembled by Per-Pcs from "
                  "another test user's history; peft merge, peft's add_weighted_adapter of the sharer LoRAs "
                  "(linear, weights 1/n: n times the uniform mix's update), one LoRA for all users. Per-Pcs "
                  "personalizes where it beats all three."]
    if any(r[0] in dict(RETRIEVAL_LABELS).values() for r in rows):
        lines += ["", "PEFT retrieval rows (our definitions; the paper's are unpublished): each user gets one sharer's "
                  "whole LoRA (weight 1 on every piece of that sharer): nearest sharer, the sharer whose mean history "
                  "embedding (stage 2's encoder) has the highest cosine with the user's; random sharer, a sharer "
                  "drawn per user (seeded by --seed). storage / user: the one-sharer recipe's payload."]
    if groups_file:
        from perpcs.evaluation.explain import routing_lines
        routed = routing_lines(root / COMPOSITION / "recipes", groups_file)
        lines += [""] + routed if routed else []
    return "\n".join(lines) + "\n"
