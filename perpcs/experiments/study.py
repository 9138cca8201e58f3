"""The held-out-seed study (``scripts/study.py``): does Per-Pcs personalize on samples the demo never saw?

For every task, sample seed and number of latent user groups, the study generates a LaMP-format sample
(``data/make_sample.py``, with its groups side file), prepares it, and runs the demo's pipeline on it, each
sample in its own folder ``<root>/<task>/seed<s>-groups<g>/`` (data, outputs, logs):

    profiles, stage 1 (task LoRA), OPPU                                          once per sample
    stage 2 (k sharers), stage 3 (sharer LoRAs, S steps), stage 4 (gates, G steps),
    stage 5 (top-k, recent_k)                                                    per setting
    the user-blind controls (uniform mix, swapped history, peft merge)          for the base setting

A setting is (k, sharer steps, gate steps, top-k, recent_k); the sweep varies one of them at a time around the
base setting. Sharer LoRAs depend only on the sharer and its step count, gates on those LoRAs and the gate step
count, so settings share them through per-user resumable dirs (``sharers/steps<S>/LoRA``,
``sharers/steps<S>/gate<G>``). Every step whose output exists is skipped: an interrupted study continues.

Scored on the no-retrieval variant (``kNP``: personalization must come from the weights) and on BM25 k=1:
the metric, the share of the task LoRA -> OPPU gap that Per-Pcs closes, the routing share (recipe weight on
sharers of the user's own latent group, from the groups file no stage reads) next to its user-blind value, and
the controls. ``results.json`` holds every number; ``study.md`` and ``study.png`` the mean and spread over seeds.
The flags of every step are the demo's (experiments/demo.py), so that what the study chooses transfers to the demo.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from perpcs.atomic import write_bytes_atomic, write_json_atomic
from perpcs.data.layout import Layout, read_json
from perpcs.data.tasks import get_task
from perpcs.errors import fail
from perpcs.evaluation.figures import pyplot, save_png
from perpcs.evaluation.metrics import evaluate_task
from perpcs.experiments import demo
from perpcs.experiments.demo import CONTROLS, DEMO_SEED, SAMPLE_SIZE
from perpcs.experiments.runner import run_command
from perpcs.experiments.scripts import script
from perpcs.paths import GATE_SCORES_DIR, REPO_ROOT

VARIANTS = ("kNP", "k1")
StudySetting = demo.DemoSetting     # the study varies the demo's settings; the base setting is the demo's

SWEEPABLE = tuple(StudySetting.__dataclass_fields__)


@dataclass(frozen=True)
class Sample:
    task: str
    seed: int
    n_groups: int

    def name(self) -> str:
        return f"{self.task}/seed{self.seed}-groups{self.n_groups}"


@dataclass
class StudyConfig:
    tasks: list
    seeds: list
    n_groups: list
    root: Path = Path("output/study")
    base: StudySetting = StudySetting()
    sweeps: dict = field(default_factory=dict)      # {field name: [values other than the base's]}
    sweep_groups: list | None = None                # the group counts the sweeps run on (None: all)
    controls: tuple = CONTROLS
    python: str = sys.executable
    jobs: int = 1

    def settings(self, sample: Sample) -> list:
        out = [self.base]
        if self.sweep_groups is None or sample.n_groups in self.sweep_groups:
            for name, values in self.sweeps.items():
                out += [replace(self.base, **{name: v}) for v in values if getattr(self.base, name) != v]
        return list(dict.fromkeys(out))

    def samples(self) -> list:
        return [Sample(t, s, g) for t in self.tasks for g in self.n_groups for s in self.seeds]


@dataclass
class Step:
    name: str
    argv: list
    done: Path | None        # skipped when this file exists (None: always run; the stage itself resumes)


class SampleDirs:
    def __init__(self, root: Path, sample: Sample):
        self.root = Path(root) / sample.task / f"seed{sample.seed}-groups{sample.n_groups}"
        self.sample = sample

    raw = property(lambda self: self.root / "raw")
    data = property(lambda self: self.root / "data")
    groups = property(lambda self: self.root / "groups.json")
    out = property(lambda self: self.root / "output")
    logs = property(lambda self: self.root / "logs")
    task_lora = property(lambda self: self.out / "task-base_LLM")
    oppu = property(lambda self: self.out / "OPPU")

    def anchors(self, s: StudySetting) -> Path:
        return self.root / "anchors" / f"k{s.k}"

    def sharer_loras(self, s: StudySetting) -> Path:
        return self.root / "sharers" / f"steps{s.sharer_steps}" / "LoRA"

    def gates(self, s: StudySetting) -> Path:
        return self.root / "sharers" / f"steps{s.sharer_steps}" / f"gate{s.gate_steps}"

    def composition(self, s: StudySetting, control: str | None = None) -> Path:
        return self.out / "compose" / (s.tag() + (f"-control-{control}" if control else ""))


def check_config(cfg: StudyConfig) -> None:
    if DEMO_SEED in cfg.seeds:
        fail(f"--seeds: {DEMO_SEED} is the demo's own sample (scripts/demo.sh); the study chooses the demo's "
             f"settings, so it must not look at that sample: use other seeds")
    for name in cfg.sweeps:
        if name not in SWEEPABLE:
            fail(f"unknown sweep {name!r}; use one of {', '.join(SWEEPABLE)}")
    for t in cfg.tasks:
        get_task(t)


def sample_steps(cfg: StudyConfig, d: SampleDirs) -> list:
    s, task = d.sample, d.sample.task
    py = cfg.python
    data = ["--task_name", task, "--data_dir", str(d.data)]
    layout = Layout(d.data, get_task(task))
    return [
        Step("sample", [py, script("make_sample"), "--task_name", task, "--out_dir", str(d.raw), *demo.sample_flags(),
                        "--seed", str(s.seed), "--n_groups", str(s.n_groups), "--groups_file", str(d.groups)],
             d.groups),
        Step("prepare", [py, script("prepare_lamp"), "--task_name", task, "--lamp_dir", str(d.raw),
                         "--out_dir", str(d.data), *demo.prepare_flags()], layout.golds),
        Step("profiles", [py, script("gen_profile"), *data, *demo.profile_flags()], layout.profiles),
        Step("task LoRA", [py, script("task_lora"), *data, *demo.task_lora_flags(), "--output_dir", str(d.task_lora)],
             d.task_lora / "predictions" / "kNP.json"),
        Step("OPPU", [py, script("oppu"), *data, *demo.oppu_flags(), "--lora_ckpt", str(d.task_lora),
                      "--output_dir", str(d.oppu)], d.oppu / "predictions" / "kNP.json"),
    ]


# stages 3 and 4 write summary.json when every sharer is done (perpcs.data.truncation.finish_per_user_stage):
# a restarted study skips them instead of starting a process to find nothing to do
DONE = "summary.json"


def setting_steps(cfg: StudyConfig, d: SampleDirs, s: StudySetting, controls=()) -> list:
    task, py = d.sample.task, cfg.python
    data = ["--task_name", task, "--data_dir", str(d.data)]
    index = d.anchors(s) / "anchor_user_idx.json"
    shared = [*data, "--lora_ckpt", str(d.task_lora), "--anchor_idx_path", str(index)]
    compose = [py, script("lora_composition"), *shared, *demo.composition_flags(s),
               "--anchor_dir", str(d.sharer_loras(s)), "--gate_dir", str(d.gates(s))]
    steps = [
        Step(f"sharers k={s.k}", [py, script("sharer_selection"), "--task_name", task,
                                  "--candidate_path", str(Layout(d.data, get_task(task)).candidate_users),
                                  "--output_dir", str(d.anchors(s)), *demo.sharer_selection_flags(s)], index),
        Step(f"sharer LoRAs ({s.sharer_steps} steps)", [py, script("sharer_loras"), *shared, *demo.sharer_lora_flags(s),
                                                         "--output_dir", str(d.sharer_loras(s))],
             d.sharer_loras(s) / DONE),
        Step(f"gates ({s.gate_steps} steps)", [py, script("sharer_gates"), *shared, *demo.gate_flags(s),
                                               "--anchor_path", str(d.sharer_loras(s)), "--output_dir", str(d.gates(s))],
             d.gates(s) / DONE),
        Step(f"Per-Pcs {s.tag()}", [*compose, "--save_scores", "--output_dir", str(d.composition(s))],
             d.composition(s) / "predictions" / "kNP.json"),
    ]
    for control in controls:
        out = d.composition(s, control)
        steps.append(Step(f"control {control}", [*compose, "--control", control, "--output_dir", str(out)],
                          out / "predictions" / "kNP.json"))
    return steps


def plan(cfg: StudyConfig) -> list:
    """[(phase, {sample: [steps]})]: first every sample's baselines and base setting (with the controls), then the
    sweeps, so that an interrupted study has the base rows of every sample."""
    base, sweeps = {}, {}
    for sample in cfg.samples():
        d = SampleDirs(cfg.root, sample)
        settings = cfg.settings(sample)
        base[sample] = _once(sample_steps(cfg, d) + setting_steps(cfg, d, settings[0], cfg.controls))
        done_in_base = {tuple(st.argv) for st in base[sample]}
        sweeps[sample] = [st for st in _once([st for setting in settings[1:] for st in setting_steps(cfg, d, setting)])
                          if tuple(st.argv) not in done_in_base]
    return [("base setting", base), ("sweeps", sweeps)]


def _once(steps: list) -> list:
    """Settings share stage 2-4 runs (the same k, the same sharer / gate steps): each command runs once."""
    return list({tuple(step.argv): step for step in steps}.values())


def _run_sample(sample: Sample, steps: list, root: Path, env: dict, dry_run: bool, t0: float) -> list:
    d = SampleDirs(root, sample)
    failed = []
    for n, step in enumerate(steps):
        if step.done is not None and Path(step.done).is_file():
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
    check_config(cfg)
    steps = plan(cfg)
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
        return {}
    summary = collect(cfg)
    if failed:
        print("failed steps: " + "; ".join(f"{s} {n} (log {log})" for s, n, log in failed))
    return summary


# ---------------------------------------------------------------------------------------------- scoring

def _primary(task) -> tuple:
    """(metric key, higher is better) of the task's headline metric."""
    return {"classification": ("accuracy", True), "regression": ("MAE", False)}.get(task.metric, ("rouge-1", True))


def _score(golds: dict, pred_dir: Path, variant: str, task) -> float | None:
    path = pred_dir / "predictions" / f"{variant}.json"
    if not path.is_file():
        return None
    key, _ = _primary(task)
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


def score_sample(cfg: StudyConfig, sample: Sample) -> list:
    """One row per setting of the sample (none if the sample's baselines are missing)."""
    from perpcs.evaluation.explain import agreement, load_recipes, read_groups, routing
    from perpcs.evaluation.gate_scores import decompose, load_gate_scores
    task = get_task(sample.task)
    d = SampleDirs(cfg.root, sample)
    if not Layout(d.data, task).golds.is_file():
        return []
    golds = Layout(d.data, task).load_golds()
    key, higher = _primary(task)
    base = {v: {"task LoRA": _score(golds, d.task_lora, v, task), "OPPU": _score(golds, d.oppu, v, task)}
            for v in VARIANTS}
    rows = []
    for i, setting in enumerate(cfg.settings(sample)):
        comp = d.composition(setting)
        per_pcs = {v: _score(golds, comp, v, task) for v in VARIANTS}
        if per_pcs["kNP"] is None:
            continue
        row = {"task": sample.task, "seed": sample.seed, "n_groups": sample.n_groups, "setting": asdict(setting),
               "tag": setting.tag(), "base": i == 0, "metric": key, "higher_is_better": higher}
        for v in VARIANTS:
            row[v] = {**base[v], "Per-Pcs": per_pcs[v],
                      "gap_closed": gap_closed(per_pcs[v], base[v]["task LoRA"], base[v]["OPPU"], higher)}
            if i == 0:
                for control in cfg.controls:
                    row[v][f"control {control}"] = _score(golds, d.composition(setting, control), v, task)
        recipes_dir = comp / "recipes"
        if recipes_dir.is_dir() and any(recipes_dir.glob("user_*.json")):
            recipes = load_recipes(recipes_dir=recipes_dir)
            agree = agreement(recipes)
            if agree:
                row["same_sharer"] = {"same": agree["mean_same"], "chance": agree["mean_chance"]}
            groups = read_groups(d.groups) if d.groups.is_file() else None
            if groups:
                r = routing(recipes, groups, d.groups)
                row["routing"] = {"share": r["mean_share"], "blind": r["mean_blind"],
                                  "balanced": r["balanced_blind"]}
            if (comp / GATE_SCORES_DIR).is_dir():   # --save_scores: where the choices come from
                split = decompose(load_gate_scores(comp / GATE_SCORES_DIR, {str(rec.get("user_id"))
                                                                            for _, rec in recipes}), groups)
                if split:
                    by_score, by_user = split["ranked_by"]["scores"], split["ranked_by"]["user-relative"]
                    row["gate_scores"] = {"ratio": split["ratio"], "same_by_user": by_user["same_top"],
                                          "own_by_score": by_score.get("own_group_top"),
                                          "own_by_user": by_user.get("own_group_top"),
                                          "own_blind": split.get("own_group_blind")}
        rows.append(row)
    return rows


def _spread(values: list) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(known), "sd": statistics.stdev(known) if len(known) > 1 else 0.0,
            "n": len(known)}


def aggregate(rows: list) -> list:
    """Mean and spread over seeds per (task, n_groups, setting)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["n_groups"], r["tag"]), []).append(r)
    out = []
    for (task, n_groups, tag), rs in sorted(groups.items()):
        agg = {"task": task, "n_groups": n_groups, "tag": tag, "setting": rs[0]["setting"], "base": rs[0]["base"],
               "metric": rs[0]["metric"], "higher_is_better": rs[0]["higher_is_better"],
               "seeds": sorted(r["seed"] for r in rs)}
        for v in VARIANTS:
            names = sorted({k for r in rs for k in r[v]})
            agg[v] = {name: _spread([r[v].get(name) for r in rs]) for name in names}
        agg["routing"] = {k: _spread([r.get("routing", {}).get(k) for r in rs]) for k in ("share", "blind")}
        agg["same_sharer"] = {k: _spread([r.get("same_sharer", {}).get(k) for r in rs]) for k in ("same", "chance")}
        agg["gate_scores"] = {k: _spread([r.get("gate_scores", {}).get(k) for r in rs])
                              for k in ("ratio", "same_by_user", "own_by_score", "own_by_user", "own_blind")}
        out.append(agg)
    return out


def _fmt(s: dict, pct: bool = False) -> str:
    if s["mean"] is None:
        return "-"
    if pct:
        return f"{s['mean']:.0%} ± {s['sd']:.0%}"
    return f"{s['mean']:.2f} ± {s['sd']:.2f}"


def study_table(agg: list, cfg: StudyConfig) -> str:
    lines = ["# Held-out-seed study", "",
             f"Seeds {', '.join(map(str, cfg.seeds))} (the demo's seed {DEMO_SEED} is not one), latent groups "
             f"{', '.join(map(str, cfg.n_groups))}; sample {SAMPLE_SIZE['n_users']} users x {SAMPLE_SIZE['n_history']} "
             f"history items, {SAMPLE_SIZE['n_test']} test users x {SAMPLE_SIZE['n_queries']} queries; mean ± sd over "
             f"seeds. No retrieval (kNP). gap closed: the share of the task LoRA -> OPPU gap Per-Pcs closes. "
             f"routing: recipe weight on sharers of the user's own group (user-blind mix of the same pool in "
             f"brackets). same top sharer: the share of pieces where two target users' recipes have the same "
             f"dominant sharer, mean over pairs of users (chance, each user's mix placed independently, in "
             f"brackets); near 100% the routing depends on the piece, not on the user. gate scores (with "
             f"lora_composition.py --save_scores): user / offset, the spread of the user x sharer part of the "
             f"scores over the spread of the per-sharer offset (the same for every user); own-group top-1, how "
             f"often a user's top sharer is of its own group, ranked by the scores / by the user part alone "
             f"(a user-blind pick in brackets).", ""]
    for task in cfg.tasks:
        rows = [a for a in agg if a["task"] == task]
        if not rows:
            continue
        metric = rows[0]["metric"] + (" ↑" if rows[0]["higher_is_better"] else " ↓")
        lines += [f"## {task} ({metric})", "",
                  "| groups | setting (k, sharer steps, gate steps, top-k, recent_k) | task LoRA | OPPU | Per-Pcs | "
                  "gap closed | routing | same top sharer | gate scores: user / offset | own-group top-1: scores / "
                  "user part | uniform | swapped | peft merge | BM25 k=1: Per-Pcs / task LoRA |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in rows:
            s = a["setting"]
            k = a["kNP"]
            label = (f"{s['k']}, {s['sharer_steps']}, {s['gate_steps']}, {s['topk']}, {s['recent_k']}"
                     + (" (base)" if a["base"] else ""))
            routing = ("-" if a["routing"]["share"]["mean"] is None else
                       f"{_fmt(a['routing']['share'], True)} ({a['routing']['blind']['mean']:.0%})")
            same = a.get("same_sharer", {})
            same = ("-" if not same or same["same"]["mean"] is None else
                    f"{_fmt(same['same'], True)} ({same['chance']['mean']:.0%})")
            gs = a.get("gate_scores", {})
            ratio = "-" if not gs or gs["ratio"]["mean"] is None else _fmt(gs["ratio"])
            own = ("-" if not gs or gs["own_by_score"]["mean"] is None else
                   f"{gs['own_by_score']['mean']:.0%} / {gs['own_by_user']['mean']:.0%} "
                   f"({gs['own_blind']['mean']:.0%})")
            ctrl = [(_fmt(k[f"control {c}"]) if f"control {c}" in k else "") for c in CONTROLS]
            r1 = a["k1"]
            lines.append(f"| {a['n_groups']} | {label} | {_fmt(k['task LoRA'])} | {_fmt(k['OPPU'])} | "
                         f"{_fmt(k['Per-Pcs'])} | {_fmt(k['gap_closed'], True)} | {routing} | {same} | {ratio} | "
                         f"{own} | {' | '.join(ctrl)} | "
                         f"{_fmt(r1['Per-Pcs'])} / {_fmt(r1['task LoRA'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_study(agg: list, cfg: StudyConfig, path: Path) -> Path | None:
    """Gap closed (no retrieval) per setting, mean and sd over seeds, one panel per task; a line per group count."""
    if not agg:
        return None
    plt = pyplot()
    tasks = [t for t in cfg.tasks if any(a["task"] == t for a in agg)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [a for a in agg if a["task"] == task]
        tags = list(dict.fromkeys(a["tag"] for a in sorted(rows, key=lambda a: (not a["base"], a["tag"]))))
        for j, g in enumerate(sorted({a["n_groups"] for a in rows})):
            pts = [(tags.index(a["tag"]), a["kNP"]["gap_closed"]) for a in rows if a["n_groups"] == g]
            pts = [(x, s) for x, s in pts if s["mean"] is not None]
            if pts:
                ax.errorbar([x + 0.12 * j for x, _ in pts], [s["mean"] for _, s in pts],
                            yerr=[s["sd"] for _, s in pts], fmt="o", capsize=3, label=f"{g} latent groups")
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(range(len(tags)))
        ax.set_xticklabels([t + (" (base)" if t == cfg.base.tag() else "") for t in tags], rotation=30,
                           ha="right", fontsize=8)
        ax.set_ylabel("share of the task LoRA -> OPPU gap closed")
        ax.set_title(f"{task}: Per-Pcs without retrieval\n(mean ± sd over seeds {', '.join(map(str, cfg.seeds))}; "
                     f"dashed: the target, half the gap)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_png(fig, path, 110)
    finally:
        plt.close(fig)


def collect(cfg: StudyConfig) -> dict:
    rows = [r for sample in cfg.samples() for r in score_sample(cfg, sample)]
    agg = aggregate(rows)
    summary = {"config": {"tasks": cfg.tasks, "seeds": cfg.seeds, "n_groups": cfg.n_groups,
                          "base": asdict(cfg.base), "sweeps": cfg.sweeps, "sweep_groups": cfg.sweep_groups,
                          "sample": SAMPLE_SIZE},
               "rows": rows, "aggregate": agg}
    root = Path(cfg.root)
    write_json_atomic(root / "results.json", summary)
    table = study_table(agg, cfg)
    write_bytes_atomic(root / "study.md", table.encode("utf-8"))
    png = plot_study(agg, cfg, root / "study.png")
    print(table)
    print(f"-> {root / 'results.json'}, {root / 'study.md'}" + (f", {png}" if png else ""))
    return summary


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
