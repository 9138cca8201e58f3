"""The held-out-seed study (``scripts/study.py``): does Per-Pcs personalize on samples the demo never saw?

For every task, sample seed and number of latent user groups, the study generates a LaMP-format sample
(``data/make_sample.py``, with its groups side file), prepares it, and runs the demo's pipeline on it, each
sample in its own folder ``<root>/<task>/seed<s>-groups<g>/`` (data, outputs, logs):

    profiles, stage 1 (task LoRA), OPPU                                          once per sample
    stage 2 (k sharers), stage 3 (sharer LoRAs, S steps), stage 4 (gates, G steps),
    stage 5 (top-k, recent_k)                                          per setting and variant (study_plan.py)
    the controls (uniform, swapped, peft merge, PEFT retrieval)        for the base setting and the k sweep

A setting is (k, sharer steps, gate steps, top-k, recent_k); the k sweep sets k = groups x m, other sweeps vary one
setting at a time around the base setting; a variant is published, center, routing or routing+center (issue 25). Sharer LoRAs depend on the pool (k) and the step count, gates on those LoRAs and the gate step
count, so settings with the same k share them through per-user resumable dirs (``sharers/steps<S>/LoRA``,
``sharers/steps<S>/gate<G>``; another k than the base's: ``sharers/steps<S>-k<k>/...``, since stages 3 and 4
refuse to add sharers to a folder a smaller pool made). Every step whose output exists is skipped: an interrupted study continues.

Scored on the no-retrieval variant (``kNP``: personalization must come from the weights) and on BM25 k=1:
the metric, the share of the task LoRA -> OPPU gap that Per-Pcs closes, the routing share (recipe weight on
sharers of the user's own latent group, from the groups file no stage reads) next to its user-blind value, and
the controls, the pooled vectors' spread and cosine. ``results.json`` holds every number; ``study.md`` and
``study.png`` the mean and spread over seeds (evaluation/study_report.py), and which variant is best.
The flags of every step are the demo's (experiments/demo.py), so that what the study chooses transfers to the demo.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from perpcs.atomic import write_bytes_atomic, write_json_atomic
from perpcs.data.layout import Layout
from perpcs.data.tasks import get_task
from perpcs.errors import fail
from perpcs.evaluation.study_report import (PREDICTIONS, aggregate, better_by, gap_closed, plot_study, primary,
                                            score, study_table, summary, summary_text)
from perpcs.experiments import demo
from perpcs.experiments.demo import CONTROLS, DEMO_SEED, RETRIEVAL_CONTROLS, SAMPLE_SIZE
from perpcs.experiments.runner import run_command
from perpcs.experiments.study_plan import (GATE_FREE, SWEEPABLE, VARIANTS, Sample, SampleDirs, Step, StudyConfig,
                                           StudySetting, check_config, plan, step_kind)
from perpcs.paths import GATE_SCORES_DIR, REPO_ROOT

__all__ = ["CONTROLS", "RETRIEVAL_CONTROLS", "VARIANTS", "Sample", "SampleDirs", "Step", "StudyConfig",
           "StudySetting", "check_config", "collect", "gap_closed", "parse_sweeps", "plan", "run_study"]


def _run_sample(sample: Sample, steps: list, root: Path, env: dict, dry_run: bool, t0: float) -> list:
    d = SampleDirs(root, sample)
    failed = []
    for n, step in enumerate(steps):
        if step.is_done():
            continue
        print(f"[{time.perf_counter() - t0:7.0f}s] {sample.name()} {n + 1}/{len(steps)} {step.name}", flush=True)
        if dry_run:
            print("    " + " ".join(step.argv))
            continue
        d.logs.mkdir(parents=True, exist_ok=True)
        log = d.logs / (step.name.replace(" ", "_").replace("/", "_").replace("=", "") + ".log")
        rc = run_command(step.argv, cwd=REPO_ROOT, env=env, log=log)
        if rc != 0:
            print(f"    FAILED (exit {rc}); its output: {log}; the sample's later steps are skipped", flush=True)
            failed.append((sample.name(), step.name, str(log)))
            break
    return failed


def run_study(cfg: StudyConfig, dry_run: bool = False) -> dict:
    """Every step whose output is missing, sample by sample (``cfg.jobs`` side by side); with ``dry_run`` only
    printed (each command, then a count per kind of step, to estimate the cost), nothing run."""
    check_config(cfg)
    env = {**os.environ, **demo.ENV}
    if cfg.jobs > 1:      # samples run side by side: one thread each, not all of them fighting over every core
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    failed = []
    for phase, steps in plan(cfg):
        n_steps = sum(len(v) for v in steps.values())
        print(f"study, {phase}: {len(steps)} samples, {n_steps} steps (done ones are skipped), {cfg.jobs} at a "
              f"time -> {cfg.root}", flush=True)
        with ThreadPoolExecutor(max_workers=max(cfg.jobs, 1)) as pool:
            results = list(pool.map(lambda item: _run_sample(item[0], item[1], cfg.root, env, dry_run, t0),
                                    steps.items()))
        failed += [f for r in results for f in r]
    if dry_run:
        todo = [st for _, phase in plan(cfg) for steps in phase.values() for st in steps
                if not st.is_done()]
        print(f"dry run: {len(todo)} steps to run: " + ", ".join(
            f"{n} x {kind}" for kind, n in Counter(step_kind(st) for st in todo).items()))
        return {}
    summary = collect(cfg)
    if failed:
        print("failed steps: " + "; ".join(f"{s} {n} (log {log})" for s, n, log in failed))
    return summary


# ---------------------------------------------------------------------------------------------- scoring

def _diagnostics(row: dict, comp: Path, groups_path: Path) -> None:
    """Routing share, same top sharer, the gate-score split and the pooled vectors of one Per-Pcs run, into row."""
    from perpcs.evaluation.explain import agreement, load_recipes, read_groups, routing
    from perpcs.evaluation.gate_scores import decompose, load_gate_scores, load_pooled, pooled_spread
    recipes_dir = comp / "recipes"
    if not recipes_dir.is_dir() or not any(recipes_dir.glob("user_*.json")):
        return
    recipes = load_recipes(recipes_dir=recipes_dir)
    agree = agreement(recipes)
    if agree:
        row["same_sharer"] = {"same": agree["mean_same"], "chance": agree["mean_chance"]}
    groups = read_groups(groups_path) if groups_path.is_file() else None
    if groups:
        r = routing(recipes, groups, groups_path)
        row["routing"] = {"share": r["mean_share"], "blind": r["mean_blind"], "balanced": r["balanced_blind"]}
    if (comp / GATE_SCORES_DIR).is_dir():   # --save_scores: where the choices come from
        users = {str(rec.get("user_id")) for _, rec in recipes}
        split = decompose(load_gate_scores(comp / GATE_SCORES_DIR, users), groups)
        if split:
            by_score, by_user = split["ranked_by"]["scores"], split["ranked_by"]["user-relative"]
            row["gate_scores"] = {"ratio": split["ratio"], "same_by_user": by_user["same_top"],
                                  "own_by_score": by_score.get("own_group_top"),
                                  "own_by_user": by_user.get("own_group_top"), "own_blind": split.get("own_group_blind")}
        pooled = pooled_spread(load_pooled(comp / GATE_SCORES_DIR, users))
        if pooled:   # runs saved before stage 5 kept the pooled vectors have none
            row["pooled"] = {"spread": pooled["spread"], "cosine": pooled["cosine"]}


def score_sample(cfg: StudyConfig, sample: Sample) -> list:
    """One row per setting and variant of the sample that has Per-Pcs predictions (none if the sample's baselines
    are missing)."""
    task = get_task(sample.task)
    d = SampleDirs(cfg.root, sample)
    if not Layout(d.data, task).golds.is_file():
        return []
    golds = Layout(d.data, task).load_golds()
    key, higher = primary(task)
    base = {v: {"task LoRA": score(golds, d.task_lora, v, task), "OPPU": score(golds, d.oppu, v, task)}
            for v in PREDICTIONS}
    with_controls = cfg.control_settings(sample)
    rows = []
    for setting in cfg.settings(sample):
        for variant in cfg.variant_list():
            comp = d.composition(setting, variant)
            per_pcs = {v: score(golds, comp, v, task) for v in PREDICTIONS}
            if per_pcs["kNP"] is None:
                continue
            row = {"task": sample.task, "seed": sample.seed, "n_groups": sample.n_groups, "setting": asdict(setting),
                   "tag": setting.tag(), "variant": variant.name, "base": setting == cfg.base, "metric": key,
                   "higher_is_better": higher}
            for v in PREDICTIONS:
                row[v] = {**base[v], "Per-Pcs": per_pcs[v],
                          "gap_closed": gap_closed(per_pcs[v], base[v]["task LoRA"], base[v]["OPPU"], higher)}
                if setting in with_controls:   # the gate-free controls: one run per setting, beside every variant
                    for control in cfg.controls:
                        where = d.composition(setting, None if control in GATE_FREE else variant, control)
                        row[v][f"control {control}"] = score(golds, where, v, task)
                    row[v]["vs_swapped"] = better_by(per_pcs[v], row[v].get("control swapped"), higher)
            _diagnostics(row, comp, d.groups)
            rows.append(row)
    return rows


def collect(cfg: StudyConfig) -> dict:
    rows = [r for sample in cfg.samples() for r in score_sample(cfg, sample)]
    agg = aggregate(rows)
    best = summary(agg, cfg.tasks)
    result = {"config": {"tasks": cfg.tasks, "seeds": cfg.seeds, "n_groups": cfg.n_groups,
                         "base": asdict(cfg.base), "sweeps": cfg.sweeps, "sweep_groups": cfg.sweep_groups,
                         "variants": list(cfg.variants), "k_per_group": list(cfg.k_per_group),
                         "controls": list(cfg.controls), "sample": SAMPLE_SIZE},
              "rows": rows, "aggregate": agg, "summary": best}
    root = Path(cfg.root)
    write_json_atomic(root / "results.json", result)
    intro = (f"Seeds {', '.join(map(str, cfg.seeds))} (the demo's seed {DEMO_SEED} is not one), latent groups "
             f"{', '.join(map(str, cfg.n_groups))}; sample {SAMPLE_SIZE['n_users']} users x "
             f"{SAMPLE_SIZE['n_history']} history items, {SAMPLE_SIZE['n_test']} test users x "
             f"{SAMPLE_SIZE['n_queries']} queries;")
    table = study_table(agg, cfg.tasks, intro) + "\n" + summary_text(best)
    write_bytes_atomic(root / "study.md", table.encode("utf-8"))
    png = plot_study(agg, cfg.tasks, cfg.seeds, root / "study.png")
    print(table)
    print(f"-> {root / 'results.json'}, {root / 'study.md'}" + (f", {png}" if png else ""))
    return result


def parse_sweeps(items: list) -> dict:
    """``name=v1,v2`` items -> {name: [ints]}."""
    out = {}
    for item in items or []:
        name, _, values = item.partition("=")
        if name not in SWEEPABLE or not values:
            fail(f"--sweep {item!r}: expected NAME=V1,V2 with NAME one of {', '.join(SWEEPABLE)}")
        try:
            out[name] = [int(v) for v in values.split(",")]
        except ValueError:
            fail(f"--sweep {item!r}: the values must be integers")
    return out
