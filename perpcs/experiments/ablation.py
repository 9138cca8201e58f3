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
lines it draws and what it names as missing (perpcs/evaluation/ablation_report.py reads and draws; this module
plans and runs). All numbers go to ``output/<task>/ablation/results.json``.
"""
from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from perpcs.atomic import write_json_atomic
from perpcs.data.layout import Layout, read_json
from perpcs.data.tasks import Task
from perpcs.errors import fail
from perpcs.evaluation.ablation_report import (cost_curves, merge_results, per_user_costs, plot_results,
                                               user_grid)
from perpcs.evaluation.results import score_prediction_dir
from perpcs.experiments.runner import check_flags, run_command
from perpcs.experiments.scripts import script_path_from_cwd
from perpcs.method.gates import GATES_FILE
from perpcs.paths import (COMPOSITION, EMB_FILE, EMB_META_FILE, INDEX_FILE, REPO_ROOT, SHARER_GATES, SHARER_LORAS,
                          TASK_LORA, user_file_name)
from perpcs.method.clustering import STRATEGIES

SWEEPS = ("k", "strategy", "share_ratio", "topk")
DEFAULT_VALUES = {"k": [10, 20, 30, 40, 50], "strategy": list(STRATEGIES),
                  "share_ratio": [0.2, 0.4, 0.6, 0.8, 1.0], "topk": [1, 2, 3, 4, 5]}
# Flags the ablation sets itself; in --extra they would silently fight the sweep.
RESERVED_FLAGS = {"--task_name", "--data_dir", "--candidate_path", "--k", "--strategy", "--output_dir",
                  "--lora_ckpt", "--anchor_path", "--gate_path", "--anchor_dir", "--gate_dir", "--task_lora",
                  "--anchor_idx_path", "--topk", "--share_ratio", "--shared_ratio"}
# the ablation's stages -> their scripts (experiments/scripts.py)
STAGE_SCRIPTS = {"anchors": "sharer_selection", "sharer LoRAs": "sharer_loras", "gates": "sharer_gates",
                 "composition": "lora_composition"}
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
    stage: str                          # a key of STAGE_SCRIPTS
    argv: list
    is_done: Callable[[], bool]
    prepare: Callable[[], str | None] | None = None   # runs first; returns what it did (for the log)

    def command(self) -> str:
        return shlex.join(str(a) for a in self.argv)


def script_path(stage: str) -> Path:
    """The stage script, relative to the working directory when the repo is (shorter commands)."""
    return script_path_from_cwd(STAGE_SCRIPTS[stage])


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

def check_plan(steps: list) -> None:
    for step in steps:
        check_flags(step.argv[1], step.argv[2:])


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


# ---- the whole ablation -----------------------------------------------------------------------------

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