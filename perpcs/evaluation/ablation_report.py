"""What the ablation (perpcs/experiments/ablation.py) reads back from its runs: per-user storage and time of Per-Pcs
and OPPU, the cost curves drawn from them, and the plots (one PNG per sweep and one for the costs, each with a
``<name>.plotted.json`` beside it: the lines it draws and what it names as missing). Nothing here runs a stage.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from perpcs.atomic import write_json_atomic
from perpcs.data.layout import read_json
from perpcs.data.tasks import Task
from perpcs.evaluation.figures import pyplot, save_png
from perpcs.evaluation.results import METRIC_NAMES, TASK_METRICS, variant_order
from perpcs.method.storage import mean_adapter_bytes
from perpcs.paths import COMPOSITION, OPPU, SHARER_GATES, SHARER_LORAS
from perpcs.stages.common import last_per_user

SWEEP_TITLES = {"k": "number of sharers (k of history_anchor.py)", "strategy": "sharer selection strategy",
                "share_ratio": "share ratio (lora_composition.py --share_ratio)",
                "topk": "pieces mixed per position (lora_composition.py --topk)"}


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def per_user_costs(task_root: Path, composition_dir: Path | None = None) -> dict:
    """Per-target-user storage and time of Per-Pcs (from ``composition_dir``, default the pipeline's
    LoRA-Composition/) and OPPU, and the one-off cost of the sharers; storage as perpcs.storage defines it. A figure
    that was not measured is None, with the reason under "missing": one method's figure never stands in for
    another's."""
    task_root = Path(task_root)
    summary_path = Path(composition_dir or task_root / COMPOSITION) / "summary.json"
    summary = read_json(summary_path, "composition summary") if summary_path.is_file() else {}
    mean = summary.get("mean") or {}
    oppu_bytes, oppu_users = mean_adapter_bytes(task_root / OPPU / "adapters")
    sharer_seconds = [_mean(last_per_user(task_root / sub / "users_log.jsonl", "seconds").values())
                      for sub in (SHARER_LORAS, SHARER_GATES)]
    n_sharers = summary.get("n_sharers")
    costs = {
        "payload_bytes": mean.get("payload_bytes"),
        "recipe_bytes": mean.get("recipe_bytes"),
        "assembly_seconds": mean.get("assembly_seconds"),
        "oppu_adapter_bytes": oppu_bytes,
        "oppu_users": oppu_users,
        "oppu_train_seconds": _mean(last_per_user(task_root / OPPU / "users_log.jsonl",
                                                   "train_seconds").values()),
        "n_sharers": n_sharers,
        "sharer_pool_bytes": summary.get("sharer_pool_bytes"),
        "sharer_seconds": (n_sharers * sum(sharer_seconds)
                           if n_sharers and all(s is not None for s in sharer_seconds) else None),
    }
    in_summary = (f"not in {summary_path} (written by an older version: run stage 5 again)" if summary
                  else f"no {summary_path}")
    why = {"payload_bytes": in_summary, "recipe_bytes": in_summary, "assembly_seconds": in_summary,
           "sharer_pool_bytes": in_summary,
           "oppu_adapter_bytes": f"no complete adapter under {task_root / 'OPPU' / 'adapters'}",
           "oppu_train_seconds": f"no train_seconds in {task_root / 'OPPU' / 'users_log.jsonl'}",
           "sharer_seconds": f"no seconds in {task_root}/{{{SHARER_LORAS},{SHARER_GATES}}}/users_log.jsonl"
                             + ("" if n_sharers else f" or no n_sharers ({in_summary})")}
    costs["missing"] = {key: reason for key, reason in why.items() if costs[key] is None}
    return costs




def user_grid(max_users: int, points: int = 10) -> list:
    step = max(1, max_users // points)
    return sorted({1, max_users, *range(step, max_users + 1, step)})


# curve -> the per-user figure and the fixed figure (or None) it is drawn from
STORAGE_CURVES = {"Per-Pcs (sharer ids + weights)": ("payload_bytes", None),
                  "Per-Pcs recipe files (with bookkeeping)": ("recipe_bytes", None),
                  "Per-Pcs + sharer LoRAs": ("payload_bytes", "sharer_pool_bytes"),
                  "OPPU (one LoRA per user)": ("oppu_adapter_bytes", None)}
TIME_CURVES = {"Per-Pcs (assembly)": ("assembly_seconds", None),
               "Per-Pcs + sharer training": ("assembly_seconds", "sharer_seconds"),
               "OPPU (training)": ("oppu_train_seconds", None)}


def cost_curves(costs: dict, users: list, fallback: dict | None = None) -> dict:
    """Storage (bytes) and time (seconds) for n target users: linear in n, at each method's per-user cost;
    the Per-Pcs '+ sharers' curves add the one-off sharer LoRAs (storage) and their training (time). A curve
    whose figures were not measured is left out and named under "missing" with the reason.

    ``fallback``: {setting tag: per_user_costs of that setting}, the swept settings that did run; a Per-Pcs curve
    the base setting cannot draw is drawn from each of them instead, labelled '<curve> [<tag>]', so a partial
    sweep without the base setting still shows Per-Pcs (and says that the base setting is missing)."""
    reasons = costs.get("missing") or {}
    missing = []
    substitutes = {}

    def absent_keys(figures: dict, per_user, fixed) -> list:
        return [key for key in (per_user, fixed) if key is not None and figures.get(key) is None]

    def curves(spec: dict) -> dict:
        out = {}
        for label, (per_user, fixed) in spec.items():
            absent = absent_keys(costs, per_user, fixed)
            if not absent:
                out[label] = [(costs[fixed] if fixed else 0.0) + n * costs[per_user] for n in users]
                continue
            drawn = []
            for tag, other in ((fallback or {}).items() if label.startswith("Per-Pcs") else ()):
                if not absent_keys(other, per_user, fixed):
                    out[f"{label} [{tag}]"] = [(other[fixed] if fixed else 0.0) + n * other[per_user] for n in users]
                    drawn.append(tag)
            instead = f" (drawn instead for the swept setting{'s' * (len(drawn) > 1)} {', '.join(drawn)})" \
                if drawn else ""
            missing.append(f"{label}: " + "; ".join(dict.fromkeys(reasons.get(k, f"no {k}") for k in absent)) + instead)
            if drawn:
                substitutes[label] = drawn
        return out

    storage, seconds = curves(STORAGE_CURVES), curves(TIME_CURVES)
    out = {"users": list(users), "per_user": costs, "storage_bytes": storage, "seconds": seconds,
           "missing": missing}
    if substitutes:
        out["drawn_from_swept_settings"] = substitutes
        out["per_user_swept"] = {tag: fallback[tag] for tag in sorted({t for ts in substitutes.values() for t in ts})}
    return out


# ---- plots ------------------------------------------------------------------------------------------

def _save_png(fig, path: Path, missing: list = ()) -> Path:
    """The PNG, and beside it ``<name>.plotted.json``: what the figure really draws (read back from its axes) and
    what it names as missing, so a reader (or a test) can check a plot without looking at pixels."""
    save_png(fig, path, 120, bbox_inches="tight")
    write_json_atomic(Path(path).with_suffix(".plotted.json"), figure_record(fig, missing))
    return Path(path)


def figure_record(fig, missing: list = ()) -> dict:
    """{title, panels: [{title, lines: {label: [[x, y], ...]}, missing_marks: [x]}], missing, notes} of a figure."""
    def number(v):
        v = float(v)
        return None if v != v else v     # NaN (a gap in a line) as null

    panels = []
    for ax in fig.axes:
        lines = {line.get_label(): [[number(x), number(y)] for x, y in zip(*line.get_data())]
                 for line in ax.get_lines() if not line.get_label().startswith("_")}
        marks = [number(x) for line in ax.get_lines() if line.get_label() == "_missing" for x in line.get_xdata()]
        panels.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "lines": lines,
                       "missing_marks": marks})
    return {"title": fig.get_suptitle(), "panels": panels, "missing": list(missing),
            "notes": [t.get_text() for t in fig.texts if t is not fig._suptitle]}   # fig.texts holds the suptitle


def _note_missing(fig, missing: list) -> None:
    """Say under the figure what is not drawn, rather than leave the reader to guess."""
    if missing:
        note = "\n".join(textwrap.fill(f"not drawn: {m}", 150) for m in missing)
        fig.text(0.01, -0.02, note, fontsize="x-small", va="top")


def plot_sweep(task: Task, sweep: str, points: list, path: Path) -> Path:
    """One panel per metric, one line per test-time variant, metric against the swept setting."""
    plt = pyplot()
    values = [p["value"] for p in points]
    numeric = all(isinstance(v, (int, float)) for v in values)
    xs = values if numeric else list(range(len(values)))
    variants = sorted({v for p in points for v in p["scores"]}, key=variant_order)
    metrics = TASK_METRICS[task.metric]
    missing = [f"{SWEEP_TITLES[sweep].split(' (')[0]} {p['value']}: {p.get('missing') or 'no scores'}"
               for p in points if not p["scores"]]
    missing += [f"{variant} at {p['value']}: no {variant}.json in {p.get('run_dir', 'the run')}/predictions"
                for variant in variants for p in points if p["scores"] and variant not in p["scores"]]
    empty_xs = [x for x, p in zip(xs, points) if not p["scores"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for variant in variants:
            ys = [p["scores"].get(variant, {}).get(metric, float("nan")) for p in points]
            ax.plot(xs, ys, marker="o", label=variant)
        if empty_xs:    # a setting without results keeps its tick, crossed out at the bottom of the panel
            ax.plot(empty_xs, [0] * len(empty_xs), "x", color="red", markersize=10, clip_on=False,
                    transform=ax.get_xaxis_transform(), label="_missing")
            for x in empty_xs:
                ax.annotate("no results", (x, 0.02), xycoords=("data", "axes fraction"), ha="center",
                            fontsize="x-small", color="red")
        name, higher = METRIC_NAMES[metric]
        ax.set_title(f"{task.lamp_id.replace('_', '-')} {name} ({'higher' if higher else 'lower'} is better)")
        ax.set_xlabel(SWEEP_TITLES[sweep])
        ax.set_ylabel(name)
        ax.set_xticks(xs, [str(v) for v in values])
        ax.grid(alpha=0.3)
    if variants:
        axes[0][-1].legend(title="variant", fontsize="small")
    fig.suptitle(f"Per-Pcs on {task.name}: {SWEEP_TITLES[sweep]}")
    _note_missing(fig, missing)
    try:
        return _save_png(fig, path, missing)
    finally:
        plt.close(fig)


STORAGE_UNITS = [(2**30, "GB"), (2**20, "MB"), (2**10, "KB"), (1, "bytes")]
TIME_UNITS = [(3600, "hours"), (60, "minutes"), (1, "seconds")]


def _unit(curves: dict, units: list) -> tuple:
    """The largest unit in which the biggest value is at least 1 (so a CPU demo is not all zeros)."""
    top = max((max(ys) for ys in curves.values() if ys), default=0)
    return next(((size, name) for size, name in units if top >= size), units[-1])


def plot_costs(task: Task, curves: dict, path: Path) -> Path:
    """Storage and time for n target users, Per-Pcs against OPPU."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, units, what in ((left, "storage_bytes", STORAGE_UNITS, "storage"),
                                 (right, "seconds", TIME_UNITS, "time")):
        size, unit = _unit(curves[key], units)
        scale = 1 / size
        ax.set_ylabel(f"{what} ({unit})")
        for label, ys in curves[key].items():
            style = "--" if "+ sharer" in label else ":" if "bookkeeping" in label else "-"
            ax.plot(curves["users"], [y * scale for y in ys], style, marker=".", label=label)
        ax.set_xlabel("number of target users")
        ax.grid(alpha=0.3)
        if curves[key]:
            ax.legend(fontsize="small")
    left.set_title("storage")
    right.set_title("time")
    title = f"{task.name}: cost of personalizing n users"
    if curves.get("drawn_from_swept_settings"):
        title += "\n(the base setting has no Per-Pcs figures: Per-Pcs drawn from the swept settings in [ ])"
    fig.suptitle(title, y=1.06 if "\n" in title else 0.98)   # two lines: above the panel titles
    _note_missing(fig, curves.get("missing") or [])
    try:
        return _save_png(fig, path, curves.get("missing") or [])
    finally:
        plt.close(fig)


def plot_results(task: Task, results: dict, out_dir: Path) -> list:
    """A PNG per sweep in ``results["sweeps"]`` and one for ``results["costs"]``."""
    paths = [plot_sweep(task, sweep, points, Path(out_dir) / f"{sweep}.png")
             for sweep, points in results.get("sweeps", {}).items() if points]
    costs = results.get("costs") or {}
    if costs.get("storage_bytes") or costs.get("seconds"):
        paths.append(plot_costs(task, results["costs"], Path(out_dir) / "costs.png"))
    return paths


def merge_results(path: Path, task: Task, sweeps: dict, costs: dict) -> dict:
    """The previous results.json with these sweeps replaced (so sweeps run one at a time accumulate)."""
    old = read_json(path, "ablation results") if Path(path).is_file() else {}
    merged_sweeps = {**(old.get("sweeps") or {}), **sweeps}
    return {"task": task.name, "lamp_id": task.lamp_id, "sweeps": merged_sweeps, "costs": costs}

