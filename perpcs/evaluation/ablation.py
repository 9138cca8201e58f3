"""Ablation sweeps of one task (``scripts/ablation.py``): the paper's analyses of Per-Pcs.

A sweep varies one setting of the pipeline and holds the others at their base value:

    k            sharer count: ``history_anchor.py --k``              -> stages 2-5 again
    strategy     sharer selection: cluster | most_active | random     -> stages 2-5 again
    share_ratio  ``lora_composition.py --share_ratio``                -> stage 5 again
    topk         ``lora_composition.py --topk``                       -> stage 5 again

Every setting has its own stage 2 dir (``output/<task>/ablation/anchors/<strategy>-k<k>/``) and its own
composition dir (``output/<task>/LoRA-Composition-<tag>/``, which eval/eval_all.py lists as its own row). A
sharer's LoRA and gates depend only on the sharer (its history and a seed drawn from its id), never on which
other users were chosen, so stages 3 and 4 write into the pipeline's shared ``Anchor_PEFT/LoRA/`` and
``Anchor_PEFT/gate/`` dirs, where they are per-user resumable: a new sharer set trains only the sharers not
trained yet. The setting equal to the pipeline defaults of ``scripts/run_task.sh`` (k 50, cluster, share ratio 1,
top-k 3) *is* the pipeline run (``anchor_selection/<task>/``, ``LoRA-Composition/``), so it is reused as-is.
A step whose outputs exist is skipped, so an interrupted sweep continues where it stopped.

After the runs, every composition dir is scored, metric-vs-setting plots are drawn (one PNG per sweep), and
storage and time against the number of target users are drawn for Per-Pcs and OPPU from
``LoRA-Composition/summary.json``, ``OPPU/adapters/`` and ``OPPU/users_log.jsonl`` (storage as perpcs.storage
defines it; a method whose figures are missing gets no curve, and the plot and results.json say so; when the base
setting did not run, Per-Pcs is drawn from the swept settings that did, labelled with their tag). A sweep point
without results keeps its place, marked "no results". Every plot has a ``<name>.plotted.json`` beside it: the
lines it draws and what it names as missing. All numbers go to ``output/<task>/ablation/results.json``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

from perpcs.atomic import write_json_atomic
from perpcs.data.layout import Layout, read_json
from perpcs.data.tasks import Task
from perpcs.errors import fail
from perpcs.evaluation.figures import pyplot, save_png
from perpcs.evaluation.results import METRIC_NAMES, TASK_METRICS, score_prediction_dir, variant_order
from perpcs.method.gates import GATES_FILE
from perpcs.method.storage import mean_adapter_bytes
from perpcs.paths import (COMPOSITION, EMB_FILE, EMB_META_FILE, INDEX_FILE, OPPU, REPO_ROOT, SHARER_GATES, SHARER_LORAS,
                          TASK_LORA, user_file_name)
from perpcs.stages.common import last_per_user
from perpcs.stages.sharer_selection import STRATEGIES

SWEEPS = ("k", "strategy", "share_ratio", "topk")
DEFAULT_VALUES = {"k": [10, 20, 30, 40, 50], "strategy": list(STRATEGIES),
                  "share_ratio": [0.2, 0.4, 0.6, 0.8, 1.0], "topk": [1, 2, 3, 4, 5]}
SWEEP_TITLES = {"k": "number of sharers (k of history_anchor.py)", "strategy": "sharer selection strategy",
                "share_ratio": "share ratio (lora_composition.py --share_ratio)",
                "topk": "pieces mixed per position (lora_composition.py --topk)"}
# Flags the ablation sets itself; in --extra they would silently fight the sweep.
RESERVED_FLAGS = {"--task_name", "--data_dir", "--candidate_path", "--k", "--strategy", "--output_dir",
                  "--lora_ckpt", "--anchor_path", "--gate_path", "--anchor_dir", "--gate_dir", "--task_lora",
                  "--anchor_idx_path", "--topk", "--share_ratio", "--shared_ratio"}
SCRIPTS = {"anchors": "anchor_selection/history_anchor.py", "sharer LoRAs": "train_anchor_PEFT.py",
           "gates": "train_anchor_gate.py", "composition": "lora_composition.py"}
EMBEDDING_FILES = (EMB_FILE, EMB_META_FILE)   # stage 2's cache (validated on reuse)


@dataclass(frozen=True)
class Setting:
    """One point of a sweep; the defaults are the pipeline's (scripts/run_task.sh)."""
    k: int = 50
    strategy: str = "cluster"
    share_ratio: float = 1.0
    topk: int = 3

    def tag(self) -> str:
        """The settings that differ from the pipeline's, e.g. 'random-k10'; '' for the pipeline itself."""
        parts = [self.strategy] if self.strategy != PIPELINE.strategy else []
        parts += [f"k{self.k}"] if self.k != PIPELINE.k else []
        parts += [f"share_ratio{self.share_ratio:g}"] if self.share_ratio != PIPELINE.share_ratio else []
        parts += [f"topk{self.topk}"] if self.topk != PIPELINE.topk else []
        return "-".join(parts)

    def same_sharers(self, other: "Setting") -> bool:
        return (self.strategy, self.k) == (other.strategy, other.k)


PIPELINE = Setting()


def parse_value(sweep: str, text: str) -> object:
    """A sweep value from the command line, checked."""
    if sweep == "strategy":
        if text not in STRATEGIES:
            fail(f"--values for the strategy sweep: {text!r} is not one of {', '.join(STRATEGIES)}")
        return text
    try:
        value = float(text) if sweep == "share_ratio" else int(text)
    except ValueError:
        fail(f"--values for the {sweep} sweep: {text!r} is not a{' number' if sweep == 'share_ratio' else 'n integer'}")
    if sweep == "share_ratio" and not 0 < value <= 1:
        fail(f"--values for the share_ratio sweep: {value} is not in (0, 1]")
    if sweep != "share_ratio" and value < 1:
        fail(f"--values for the {sweep} sweep: {value} must be at least 1")
    return value


def sweep_values(sweep: str, values=None) -> dict:
    """{sweep name: [values]} for one sweep or for all (which takes each sweep's defaults)."""
    if sweep == "all":
        if values:
            fail("--values needs a single --sweep (k, strategy, share_ratio or topk), not all")
        return {name: list(DEFAULT_VALUES[name]) for name in SWEEPS}
    if sweep not in SWEEPS:
        fail(f"unknown sweep {sweep!r}; use one of {', '.join(SWEEPS)} or all")
    return {sweep: [parse_value(sweep, str(v)) for v in (values or DEFAULT_VALUES[sweep])]}


@dataclass
class AblationConfig:
    task: Task
    output_root: Path = Path("output")
    data_dir: Path = Path("data")
    anchor_root: Path | None = None    # the pipeline's stage 2 dir; default <repo>/anchor_selection/<task>
    python: str = sys.executable
    extra: list = field(default_factory=list)          # flags for stages 3, 4 and 5
    anchor_extra: list = field(default_factory=list)   # flags for stage 2 only
    peft_extra: list = field(default_factory=list)     # stage 3 only
    gate_extra: list = field(default_factory=list)     # stage 4 only
    compose_extra: list = field(default_factory=list)  # stage 5 only
    base: Setting = PIPELINE

    @property
    def task_root(self) -> Path:
        return Path(self.output_root) / self.task.name

    @property
    def ablation_root(self) -> Path:
        return self.task_root / "ablation"

    @property
    def task_lora(self) -> Path:
        return self.task_root / TASK_LORA

    @property
    def sharer_lora_dir(self) -> Path:
        return self.task_root / SHARER_LORAS

    @property
    def gate_dir(self) -> Path:
        return self.task_root / SHARER_GATES

    @property
    def pipeline_selection_dir(self) -> Path:
        return Path(self.anchor_root or REPO_ROOT / "anchor_selection" / self.task.name)

    def reuses_pipeline(self, setting: Setting) -> bool:
        """The pipeline's sharers serve this setting: same k and strategy, and its stage 2 index exists and
        was written for them (the demo, say, writes one for k 4)."""
        index_path = self.pipeline_selection_dir / INDEX_FILE
        if not setting.same_sharers(PIPELINE) or not index_path.is_file():
            return False
        index = read_json(index_path, "sharer index file")
        return isinstance(index, dict) and (index.get("k"), index.get("strategy")) == (setting.k, setting.strategy)

    def anchor_dir(self, setting: Setting) -> Path:
        if self.reuses_pipeline(setting):
            return self.pipeline_selection_dir
        return self.ablation_root / "anchors" / f"{setting.strategy}-k{setting.k}"

    def composition_dir(self, setting: Setting) -> Path:
        """LoRA-Composition/ (the pipeline's) for the pipeline setting, else LoRA-Composition-<tag>."""
        tag = setting.tag()
        if not tag and not self.reuses_pipeline(setting):
            tag = f"{setting.strategy}-k{setting.k}"
        return self.task_root / (f"{COMPOSITION}-{tag}" if tag else COMPOSITION)

    def check_extra_flags(self) -> None:
        for name in ("extra", "anchor_extra", "peft_extra", "gate_extra", "compose_extra"):
            for flag in getattr(self, name):
                if flag.split("=")[0] in RESERVED_FLAGS:
                    fail(f"--{name} must not set {flag.split('=')[0]}: the ablation sets it for every run "
                         f"(use --sweep / --values / --base_* for the settings, --output_root for the dirs)")


# ---- the plan ---------------------------------------------------------------------------------------

@dataclass
class Step:
    stage: str                          # a key of SCRIPTS
    argv: list
    is_done: Callable[[], bool]
    prepare: Callable[[], str | None] | None = None   # runs first; returns what it did (for the log)

    def command(self) -> str:
        return shlex.join(str(a) for a in self.argv)


def script_path(stage: str) -> Path:
    """The stage script, relative to the working directory when the repo is (shorter commands)."""
    path = REPO_ROOT / SCRIPTS[stage]
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def sharer_ids(index_path: Path, setting: Setting | None = None) -> list | None:
    """The sharers of a stage 2 index, or None while it does not exist. With ``setting``, an index written
    for another k or strategy is an error (it would be silently reused)."""
    if not index_path.is_file():
        return None
    index = read_json(index_path, "sharer index file")
    if not isinstance(index, dict) or not isinstance(index.get("user_ids"), list):
        fail(f"{index_path}: expected the 'user_ids' list of a stage 2 index")
    if setting is not None and (index.get("k"), index.get("strategy")) != (setting.k, setting.strategy):
        fail(f"{index_path} was written for k {index.get('k')} / {index.get('strategy')}, but this run needs "
             f"k {setting.k} / {setting.strategy}; move it away (or delete it) and run again")
    return [str(u) for u in index["user_ids"]]


def _all_sharers_have(index_path: Path, root: Path, relative: str) -> bool:
    ids = sharer_ids(index_path)
    return ids is not None and all((root / user_file_name(uid) / relative).is_file() for uid in ids)


def _copy_embeddings(source_dir: Path, target_dir: Path) -> str | None:
    """Seed a new stage 2 dir with the pipeline's embedding cache: same candidates, same encoder (stage 2
    checks the cache's recorded candidate hash and encoder, and re-embeds if they differ)."""
    sources = [source_dir / name for name in EMBEDDING_FILES]
    if not all(p.is_file() for p in sources) or (target_dir / EMBEDDING_FILES[0]).is_file():
        return None
    target_dir.mkdir(parents=True, exist_ok=True)
    for path in sources:
        shutil.copyfile(path, target_dir / path.name)
    return f"copied the candidate embeddings of {source_dir} to {target_dir}"


def pipeline_encoder(pipeline_selection_dir: Path, anchor_extra: list) -> list:
    """``--encoder <the pipeline's>``: a sweep's sharers are embedded with the encoder the pipeline's were (the
    paper's DeBERTa in run_task.sh), not with stage 2's default; --anchor_extra "--encoder ..." wins."""
    index_path = Path(pipeline_selection_dir) / INDEX_FILE
    if "--encoder" in anchor_extra or not index_path.is_file():
        return []
    index = read_json(index_path, "sharer index file")
    encoder = index.get("encoder") if isinstance(index, dict) else None
    return ["--encoder", str(encoder)] if encoder else []


def plan_setting(config: AblationConfig, setting: Setting) -> list:
    """Stages 2-5 of one setting, with the dirs and flags they get."""
    task, py = config.task.name, config.python
    anchor_dir = config.anchor_dir(setting)
    index = anchor_dir / INDEX_FILE
    comp_dir = config.composition_dir(setting)
    common = ["--task_name", task, "--data_dir", str(config.data_dir)]
    model = common + list(config.extra) + ["--lora_ckpt", str(config.task_lora)]
    main_selection_dir = config.pipeline_selection_dir
    anchors = Step("anchors", [py, script_path("anchors"), "--task_name", task, "--candidate_path",
                               str(Layout(config.data_dir, config.task).candidate_users), "--k", str(setting.k),
                               "--strategy", setting.strategy, "--output_dir", str(anchor_dir),
                               *pipeline_encoder(main_selection_dir, config.anchor_extra), *config.anchor_extra],
                   lambda: sharer_ids(index, setting) is not None,
                   prepare=None if anchor_dir == main_selection_dir or setting.strategy != "cluster"
                   else lambda: _copy_embeddings(main_selection_dir, anchor_dir))
    sharers = Step("sharer LoRAs", [py, script_path("sharer LoRAs"), *model, *config.peft_extra,
                                    "--anchor_idx_path", str(index), "--output_dir", str(config.sharer_lora_dir)],
                   lambda: _all_sharers_have(index, config.sharer_lora_dir, "adapter_model.safetensors"))
    gates = Step("gates", [py, script_path("gates"), *model, *config.gate_extra, "--anchor_path",
                           str(config.sharer_lora_dir), "--anchor_idx_path", str(index),
                           "--output_dir", str(config.gate_dir)],
                 lambda: _all_sharers_have(index, config.gate_dir, GATES_FILE))
    compose = Step("composition", [py, script_path("composition"), *model, *config.compose_extra,
                                   "--anchor_dir", str(config.sharer_lora_dir), "--gate_dir", str(config.gate_dir),
                                   "--anchor_idx_path", str(index), "--topk", str(setting.topk),
                                   "--share_ratio", f"{setting.share_ratio:g}", "--output_dir", str(comp_dir)],
                   # always run: stage 5 skips finished users itself, loads no model when all are done, and
                   # refuses recipes made with other settings, which a file check here could not see
                   lambda: False)
    return [anchors, sharers, gates, compose]


def plan(config: AblationConfig, sweeps: dict) -> tuple:
    """(points, steps): points = [(sweep, value, setting)], steps = the stage runs they need, each once."""
    points, steps, seen = [], [], set()
    for sweep, values in sweeps.items():
        for value in values:
            setting = replace(config.base, **{sweep: value})
            points.append((sweep, value, setting))
            for step in plan_setting(config, setting):
                if step.command() not in seen:     # a setting shared by two sweeps runs once
                    seen.add(step.command())
                    steps.append(step)
    return points, steps


# ---- checking and running ---------------------------------------------------------------------------

@lru_cache(maxsize=None)
def load_script(path: Path):
    """Import a stage script as a module (its parse_args is what the command line must satisfy)."""
    spec = importlib.util.spec_from_file_location(f"_perpcs_script_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_flags(script: Path, args: list) -> None:
    """Parse ``args`` with the script's own parser; a flag it does not know is an error before any run."""
    module = load_script(Path(script).resolve())
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            module.parse_args([str(a) for a in args])
    except SystemExit as err:
        if err.code:
            lines = captured.getvalue().strip().splitlines()
            reason = lines[-1].split("error: ", 1)[-1] if lines else f"exit code {err.code}"
            fail(f"{script} rejects the flags {shlex.join(map(str, args))}: {reason}")


def check_plan(steps: list) -> None:
    for step in steps:
        check_flags(step.argv[1], step.argv[2:])


def run_command(argv: list) -> int:
    return subprocess.run([str(a) for a in argv]).returncode


def run_steps(steps: list, dry_run: bool = False, runner: Callable = run_command) -> list:
    """Run the steps that are not done yet, in order; returns the commands run (or printed)."""
    ran = []
    for step in steps:
        if step.is_done():
            print(f"# done, skipped ({step.stage}): {step.command()}")
            continue
        if dry_run:
            print(step.command())
            ran.append(step.command())
            continue
        note = step.prepare() if step.prepare else None
        if note:
            print(f"# {note}")
        print(f"+ {step.command()}", flush=True)
        code = runner(step.argv)
        if code != 0:
            fail(f"{step.stage} stopped with exit code {code}; fix it and run the ablation again "
                 f"(finished runs are kept): {step.command()}")
        ran.append(step.command())
    return ran


# ---- results ----------------------------------------------------------------------------------------

def evaluate_points(config: AblationConfig, points: list) -> dict:
    """{sweep: [{value, setting, run_dir, scores: {variant: metrics}}]} from the composition dirs."""
    golds = None
    results = {}
    for sweep, value, setting in points:
        pred_dir = config.composition_dir(setting) / "predictions"
        scores = {}
        if pred_dir.is_dir():
            golds = golds or Layout(config.data_dir, config.task).load_golds()
            scores = score_prediction_dir(pred_dir, golds, config.task)
        point = {"value": value, "setting": asdict(setting), "run_dir": str(config.composition_dir(setting)),
                 "scores": scores}
        if not scores:   # the plot marks the point as missing, with this reason
            point["missing"] = f"no predictions in {pred_dir}" if pred_dir.is_dir() else f"no {pred_dir}"
        results.setdefault(sweep, []).append(point)
    return results


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


def swept_costs(config: AblationConfig, points: list) -> dict:
    """{setting tag: per_user_costs} of every swept setting other than the base whose stage 5 left a summary
    (cost_curves draws from them what the base setting cannot)."""
    base_dir = config.composition_dir(config.base)
    out = {}
    for _, _, setting in points:
        run_dir = config.composition_dir(setting)
        if run_dir != base_dir and (run_dir / "summary.json").is_file():
            out.setdefault(run_dir.name.removeprefix(f"{COMPOSITION}-"), per_user_costs(config.task_root, run_dir))
    return out


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


# ---- the whole ablation -----------------------------------------------------------------------------

def merge_results(path: Path, task: Task, sweeps: dict, costs: dict) -> dict:
    """The previous results.json with these sweeps replaced (so sweeps run one at a time accumulate)."""
    old = read_json(path, "ablation results") if Path(path).is_file() else {}
    merged_sweeps = {**(old.get("sweeps") or {}), **sweeps}
    return {"task": task.name, "lamp_id": task.lamp_id, "sweeps": merged_sweeps, "costs": costs}


def run_ablation(config: AblationConfig, sweeps: dict, dry_run: bool = False, max_users: int = 100,
                 runner: Callable = run_command) -> dict | None:
    """Plan, check every command's flags, run what is missing, then score, plot and write results.json."""
    config.check_extra_flags()
    points, steps = plan(config, sweeps)
    check_plan(steps)
    if not (config.task_lora / "adapter_model.safetensors").is_file():
        message = f"no task LoRA in {config.task_lora}: run stage 1 first (task_LoRA.py --task_name {config.task.name})"
        if not dry_run:
            fail(message)
        print(f"# note: {message}")
    run_steps(steps, dry_run, runner)
    if dry_run:
        return None
    costs = cost_curves(per_user_costs(config.task_root, config.composition_dir(config.base)), user_grid(max_users),
                        swept_costs(config, points))
    results = merge_results(config.ablation_root / "results.json", config.task,
                            evaluate_points(config, points), costs)
    results["plots"] = [str(p) for p in plot_results(config.task, results, config.ablation_root)]
    write_json_atomic(config.ablation_root / "results.json", results)
    for missing in costs["missing"]:
        print(f"# cost curve not drawn: {missing}")
    print(f"results: {config.ablation_root / 'results.json'}; plots: {', '.join(results['plots'])}")
    return results


def split_flags(text: str | None) -> list:
    return shlex.split(text) if text else []
