"""The held-out-seed study's tables, plot and summary (``scripts/study.py --collect``; experiments/study.py runs the
study and scores each sample's outputs into rows): read-only, from rows of numbers.

A row is one (task, seed, groups, setting, variant): the metric of Per-Pcs, the task LoRA, OPPU and the controls
on the no-retrieval (kNP) and BM25 k=1 (k1) predictions, the gap closed, and the routing diagnostics (routing
share, same top sharer, the gate-score split, the pooled vectors' spread and cosine). Rows are averaged over seeds
(mean and sd) per (task, groups, setting, variant); the summary says which variant is best and by how much, from
those means, and checks issue 25's targets against them.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from perpcs.data.layout import read_json
from perpcs.evaluation.figures import pyplot, save_png
from perpcs.evaluation.metrics import evaluate_task

PREDICTIONS = ("kNP", "k1")      # the prediction variants scored: no retrieval, BM25 k=1
CONTROL_COLUMNS = (("uniform", "uniform"), ("swapped", "swapped"), ("peft_merge", "peft merge"),
                   ("nearest_sharer", "nearest sharer"), ("random_sharer", "random sharer"))
TARGET_GAP, TARGET_ROUTING, TARGET_SAME = 0.8, 2.0, 0.6     # issue 25's bar (best variant, 5 groups, seeds 1-3)


def primary(task) -> tuple:
    """(metric key, higher is better) of the task's headline metric."""
    return {"classification": ("accuracy", True), "regression": ("MAE", False)}.get(task.metric, ("rouge-1", True))


def score(golds: dict, pred_dir: Path, variant: str, task) -> float | None:
    path = Path(pred_dir) / "predictions" / f"{variant}.json"
    if not path.is_file():
        return None
    key, _ = primary(task)
    return evaluate_task(golds, read_json(path), task, preds_name=str(path))[key]


def gap_closed(per_pcs, task_lora, oppu, higher: bool):
    """The share of the task LoRA -> OPPU gap that Per-Pcs closes (1 = as good as OPPU, 0 = no better than the
    task LoRA, < 0 worse); None when a number is missing or the gap is too small to divide by."""
    if None in (per_pcs, task_lora, oppu):
        return None
    gap = (oppu - task_lora) if higher else (task_lora - oppu)
    if gap <= 1e-9:
        return None
    return ((per_pcs - task_lora) if higher else (task_lora - per_pcs)) / gap


def better_by(a, b, higher: bool):
    """How much better a scores than b (positive: a is better, whichever way the metric points); None if missing."""
    if a is None or b is None:
        return None
    return (a - b) if higher else (b - a)


def spread(values: list) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(known), "sd": statistics.stdev(known) if len(known) > 1 else 0.0,
            "n": len(known)}


DIAGNOSTICS = {"routing": ("share", "blind"), "same_sharer": ("same", "chance"),
               "gate_scores": ("ratio", "same_by_user", "own_by_score", "own_by_user", "own_blind"),
               "pooled": ("spread", "cosine")}


def aggregate(rows: list) -> list:
    """Mean and spread over seeds per (task, n_groups, setting, variant)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["n_groups"], r["tag"], r.get("variant", "published")), []).append(r)
    out = []
    for (task, n_groups, tag, variant), rs in sorted(groups.items()):
        agg = {"task": task, "n_groups": n_groups, "tag": tag, "variant": variant, "setting": rs[0]["setting"],
               "base": rs[0]["base"], "metric": rs[0]["metric"], "higher_is_better": rs[0]["higher_is_better"],
               "seeds": sorted(r["seed"] for r in rs)}
        for v in PREDICTIONS:
            names = sorted({k for r in rs for k in r[v]})
            agg[v] = {name: spread([r[v].get(name) for r in rs]) for name in names}
        for name, keys in DIAGNOSTICS.items():
            agg[name] = {k: spread([r.get(name, {}).get(k) for r in rs]) for k in keys}
        out.append(agg)
    return out


def fmt(s: dict, pct: bool = False) -> str:
    if not s or s["mean"] is None:
        return "-"
    if pct:
        return f"{s['mean']:.0%} ± {s['sd']:.0%}"
    return f"{s['mean']:.2f} ± {s['sd']:.2f}"


def _bracketed(s: dict, ref: dict, pct: bool = True) -> str:
    if s["mean"] is None:
        return "-"
    return f"{fmt(s, pct)} ({ref['mean']:.0%})" if ref["mean"] is not None else fmt(s, pct)


HEADER = ("| groups | variant | setting (k, sharer steps, gate steps, top-k, recent_k) | task LoRA | OPPU | Per-Pcs | "
          "gap closed | better than swapped by | routing | same top sharer | gate scores: user / offset | "
          "pooled spread | pooled cosine | own-group top-1: scores / user part | "
          + " | ".join(label for _, label in CONTROL_COLUMNS) + " | BM25 k=1: Per-Pcs / task LoRA |")
LEGEND = ("mean ± sd over seeds. No retrieval (kNP). variant: published (the paper's gates and score), center "
          "(lora_composition.py --score_calibration center), routing (train_anchor_gate.py --gate_objective "
          "routing), routing+center (both). gap closed: the share of the task LoRA -> OPPU gap Per-Pcs closes. "
          "better than swapped by: Per-Pcs minus the swapped-history control of the same variant (sign-adjusted: "
          "positive = Per-Pcs better), per seed, then mean ± sd. routing: recipe weight on sharers of the user's "
          "own group (user-blind mix of the same pool in brackets). same top sharer: the share of pieces where two "
          "target users' recipes have the same dominant sharer, mean over pairs of users (chance in brackets); near "
          "100% the routing depends on the piece, not on the user. gate scores (lora_composition.py "
          "--save_scores): user / offset, the spread of the user x sharer part of the scores over that of the "
          "per-sharer offset; pooled spread, the users' pooled vectors (what the scores are made from) around "
          "their mean, RMS of ||v_u - mean|| / ||mean||, and pooled cosine, their mean pairwise cosine, both "
          "averaged over pieces; own-group top-1, how often a user's top sharer is of its own group, ranked by the "
          "scores / by the user part alone (a user-blind pick in brackets). The user-blind controls (uniform, "
          "peft merge, nearest / random sharer) do not read the gates' scores: run once per sample and setting, "
          "shown beside every variant; swapped runs per variant.")


def table_row(a: dict) -> str:
    s, k, r1 = a["setting"], a["kNP"], a["k1"]
    label = (f"{s['k']}, {s['sharer_steps']}, {s['gate_steps']}, {s['topk']}, {s['recent_k']}"
             + (" (base)" if a["base"] else ""))
    gs = a["gate_scores"]
    own = ("-" if gs["own_by_score"]["mean"] is None else
           f"{gs['own_by_score']['mean']:.0%} / {gs['own_by_user']['mean']:.0%} ({gs['own_blind']['mean']:.0%})")
    ctrl = [fmt(k.get(f"control {c}", {})) if f"control {c}" in k else "" for c, _ in CONTROL_COLUMNS]
    return (f"| {a['n_groups']} | {a['variant']} | {label} | {fmt(k['task LoRA'])} | {fmt(k['OPPU'])} | "
            f"{fmt(k['Per-Pcs'])} | {fmt(k['gap_closed'], True)} | {fmt(k.get('vs_swapped', {}))} | "
            f"{_bracketed(a['routing']['share'], a['routing']['blind'])} | "
            f"{_bracketed(a['same_sharer']['same'], a['same_sharer']['chance'])} | {fmt(gs['ratio'])} | "
            f"{fmt(a['pooled']['spread'], True)} | {'-' if a['pooled']['cosine']['mean'] is None else fmt(a['pooled']['cosine'])} | "
            f"{own} | {' | '.join(ctrl)} | {fmt(r1['Per-Pcs'])} / {fmt(r1['task LoRA'])} |")


def study_table(agg: list, tasks: list, intro: str) -> str:
    lines = ["# Held-out-seed study", "", intro + " " + LEGEND, ""]
    for task in tasks:
        rows = [a for a in agg if a["task"] == task]
        if not rows:
            continue
        metric = rows[0]["metric"] + (" ↑" if rows[0]["higher_is_better"] else " ↓")
        lines += [f"## {task} ({metric})", "", HEADER, "|---" * HEADER.count(" | ") + "|---|"]
        lines += [table_row(a) for a in rows]
        lines.append("")
    return "\n".join(lines) + "\n"


def summary(agg: list, tasks: list) -> dict | None:
    """Which (variant, setting) closes the most of the gap, mean over the tasks of its mean over seeds, at the
    largest group count with rows of every task (5 in the study); its margin over the published base row per task
    (with the spreads), and issue 25's targets checked against its means. None without such rows."""
    counts = sorted({a["n_groups"] for a in agg}, reverse=True)
    for g in counts:
        cells: dict = {}
        for a in agg:
            if a["n_groups"] == g and a["kNP"]["gap_closed"]["mean"] is not None:
                cells.setdefault((a["variant"], a["tag"]), {})[a["task"]] = a
        complete = {key: by_task for key, by_task in cells.items() if all(t in by_task for t in tasks)}
        if complete:
            break
    else:
        return None
    ranked = sorted(complete.items(), key=lambda kv: -statistics.fmean(
        kv[1][t]["kNP"]["gap_closed"]["mean"] for t in tasks))
    (variant, tag), best = ranked[0]
    published = next((by_task for (v, _), by_task in complete.items() if v == "published"
                      and all(by_task[t]["base"] for t in tasks)), None)
    per_task = {}
    for t in tasks:
        a = best[t]
        k = a["kNP"]
        routing, blind = a["routing"]["share"]["mean"], a["routing"]["blind"]["mean"]
        same = a["same_sharer"]["same"]["mean"]
        vs = k.get("vs_swapped", {"mean": None, "sd": None})
        per_task[t] = {
            "gap_closed": k["gap_closed"], "vs_swapped": vs,
            "published_gap_closed": published[t]["kNP"]["gap_closed"] if published else None,
            "targets": {"beats swapped by more than the seed spread":
                        None if vs["mean"] is None else vs["mean"] > vs["sd"],
                        "routing share at least twice the user-blind reference":
                        None if routing is None or blind is None else routing >= TARGET_ROUTING * blind,
                        "same top sharer at most 60% of pieces": None if same is None else same <= TARGET_SAME,
                        "closes at least 80% of the gap": k["gap_closed"]["mean"] >= TARGET_GAP}}
    return {"n_groups": g, "variant": variant, "tag": tag, "tasks": per_task,
            "ranking": [{"variant": v, "tag": tg, "mean_gap_closed": statistics.fmean(
                by_task[t]["kNP"]["gap_closed"]["mean"] for t in tasks)} for (v, tg), by_task in ranked]}


def summary_text(s: dict | None) -> str:
    if s is None:
        return "## Which variant is best\n\nNo group count has Per-Pcs rows of every task yet.\n"
    lines = ["## Which variant is best", "",
             f"At {s['n_groups']} groups, ranked by the gap closed (mean over seeds, then over tasks): **{s['variant']}** "
             f"at {s['tag']}.", ""]
    for t, d in s["tasks"].items():
        pub = d["published_gap_closed"]
        margin = ("" if pub is None or pub["mean"] is None else
                  f"; the published base closes {fmt(pub, True)}, {d['gap_closed']['mean'] - pub['mean']:+.0%} points")
        lines.append(f"- {t}: gap closed {fmt(d['gap_closed'], True)}{margin}; better than swapped by "
                     f"{fmt(d['vs_swapped'])}. Targets: " + ", ".join(
                         f"{name} {'yes' if ok else 'no' if ok is not None else '(not measured)'}"
                         for name, ok in d["targets"].items()) + ".")
    lines += ["", "| variant | setting | gap closed, mean over tasks |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['tag']} | {r['mean_gap_closed']:.0%} |" for r in s["ranking"]]
    return "\n".join(lines) + "\n"


def plot_study(agg: list, tasks: list, seeds: list, path: Path) -> Path | None:
    """Gap closed (no retrieval) per variant and setting, mean and sd over seeds, one panel per task; a series per
    group count."""
    if not agg:
        return None
    plt = pyplot()
    tasks = [t for t in tasks if any(a["task"] == t for a in agg)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 5.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [a for a in agg if a["task"] == task]
        order = sorted(rows, key=lambda a: (a["variant"] != "published", a["variant"], not a["base"], a["tag"]))
        labels = list(dict.fromkeys(f"{a['variant']} {a['tag']}" + (" (base)" if a["base"] else "") for a in order))
        for j, g in enumerate(sorted({a["n_groups"] for a in rows})):
            pts = [(labels.index(f"{a['variant']} {a['tag']}" + (" (base)" if a["base"] else "")),
                    a["kNP"]["gap_closed"]) for a in rows if a["n_groups"] == g]
            pts = [(x, s) for x, s in pts if s["mean"] is not None]
            if pts:
                ax.errorbar([x + 0.12 * j for x, _ in pts], [s["mean"] for _, s in pts],
                            yerr=[s["sd"] for _, s in pts], fmt="o", capsize=3, label=f"{g} latent groups")
        ax.axhline(TARGET_GAP, color="grey", ls="--", lw=0.8)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("share of the task LoRA -> OPPU gap closed")
        ax.set_title(f"{task}: Per-Pcs without retrieval\n(mean ± sd over seeds {', '.join(map(str, seeds))}; "
                     f"dashed: the target, {TARGET_GAP:.0%} of the gap)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_png(fig, path, 110)
    finally:
        plt.close(fig)
