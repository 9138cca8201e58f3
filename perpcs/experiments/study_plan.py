"""The held-out-seed study's runs (``scripts/study.py``): which commands, in which folders, in which order.

Per sample (task, seed, groups): the baselines once; then per setting (k, sharer steps, gate steps, top-k,
recent_k) and per *variant* of the method (issue 25):

    published        the paper's gates (stage 4) and score (stage 5): no extra flag
    center           stage 5 --score_calibration center
    routing          stage 4 --gate_objective routing (its own gates dir: the gates of a pool are trained together)
    routing+center   both

stages 2-4 (shared where their inputs are the same), Per-Pcs with --save_scores and the swapped-history control
(it assembles: per variant). The user-blind controls that read no gate score (uniform, peft merge, and the PEFT
retrieval rows nearest / random sharer) run once per sample and setting (on the gates of the first variant run:
their predictions do not depend on them) and are shown beside every variant. Controls run on the base setting and
on the k sweep's settings (k = groups x each of --k_per_group), whose pools differ.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from perpcs.data.layout import Layout, read_json
from perpcs.data.tasks import get_task
from perpcs.errors import fail
from perpcs.experiments import demo
from perpcs.experiments.demo import CONTROLS, DEMO_SEED
from perpcs.experiments.scripts import script
from perpcs.method.gates import GATES_FILE
from perpcs.models.lora import ADAPTER_WEIGHTS
from perpcs.paths import user_file_name

# stages 3 and 4 write summary.json when every sharer is done (perpcs.data.truncation.finish_per_user_stage):
# a restarted study skips them instead of starting a process to find nothing to do
DONE = "summary.json"
StudySetting = demo.DemoSetting     # the study varies the demo's settings; the base setting is the demo's
SWEEPABLE = tuple(StudySetting.__dataclass_fields__)
GATE_FREE = ("uniform", "peft_merge", "nearest_sharer", "random_sharer")   # controls that read no gate score


@dataclass(frozen=True)
class Variant:
    name: str
    gate_objective: str = "published"      # train_anchor_gate.py --gate_objective
    score_calibration: str = "none"        # lora_composition.py --score_calibration

    def gate_flags(self) -> list:   # the published variant passes no new flag: its commands are today's
        return [] if self.gate_objective == "published" else ["--gate_objective", self.gate_objective]

    def compose_flags(self) -> list:
        return [] if self.score_calibration == "none" else ["--score_calibration", self.score_calibration]

    def suffix(self) -> str:
        return "" if self.name == "published" else "-" + self.name.replace("+", "-")


VARIANTS = {v.name: v for v in (Variant("published"), Variant("center", score_calibration="center"),
                                Variant("routing", gate_objective="routing"),
                                Variant("routing+center", gate_objective="routing", score_calibration="center"))}
PUBLISHED = VARIANTS["published"]


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
    variants: tuple = ("published",)                # names of VARIANTS, run in VARIANTS' order
    k_per_group: tuple = ()                         # the k sweep: k = n_groups x each (on the sweep_groups)

    def variant_list(self) -> list:
        return [v for name, v in VARIANTS.items() if name in self.variants]

    def _sweeps_here(self, sample: Sample) -> bool:
        return self.sweep_groups is None or sample.n_groups in self.sweep_groups

    def k_settings(self, sample: Sample) -> list:
        """The k sweep's settings of a sample (k = groups x m), other than the base."""
        if not self._sweeps_here(sample):
            return []
        return [s for s in dict.fromkeys(replace(self.base, k=m * sample.n_groups) for m in self.k_per_group)
                if s != self.base]

    def control_settings(self, sample: Sample) -> list:
        return [self.base, *self.k_settings(sample)]

    def settings(self, sample: Sample) -> list:
        out = self.control_settings(sample)
        if self._sweeps_here(sample):
            for name, values in self.sweeps.items():
                out += [replace(self.base, **{name: v}) for v in values if getattr(self.base, name) != v]
        return list(dict.fromkeys(out))

    def samples(self) -> list:
        return [Sample(t, s, g) for t in self.tasks for g in self.n_groups for s in self.seeds]


@dataclass
class Step:
    name: str
    argv: list
    done: object             # a Path: skipped when it exists; a callable: when it returns True; None: always run

    def is_done(self) -> bool:
        if self.done is None:
            return False
        return self.done() if callable(self.done) else Path(self.done).is_file()


@dataclass(frozen=True)
class PoolDone:
    """Stage 3 or 4 over a sharer index is done when its summary.json is there and every sharer of the index has
    its file (summary.json alone would count a folder done whose run had fewer sharers)."""
    index: Path
    out_dir: Path
    file: str

    def __call__(self) -> bool:
        if not (self.out_dir / DONE).is_file() or not self.index.is_file():
            return False
        ids = read_json(self.index, "sharer index").get("user_ids", [])
        return all((self.out_dir / user_file_name(u) / self.file).is_file() for u in ids)


class SampleDirs:
    def __init__(self, root: Path, sample: Sample, base_k: int | None = None):
        self.root = Path(root) / sample.task / f"seed{sample.seed}-groups{sample.n_groups}"
        self.sample = sample
        self.base_k = base_k

    raw = property(lambda self: self.root / "raw")
    data = property(lambda self: self.root / "data")
    groups = property(lambda self: self.root / "groups.json")
    out = property(lambda self: self.root / "output")
    logs = property(lambda self: self.root / "logs")
    task_lora = property(lambda self: self.out / "task-base_LLM")
    oppu = property(lambda self: self.out / "OPPU")

    def anchors(self, s: StudySetting) -> Path:
        return self.root / "anchors" / f"k{s.k}"

    def pool(self, s: StudySetting) -> Path:
        """The sharers of setting s: one folder per pool (k) beside the base k's, since stage 3 and 4 refuse to add
        sharers to a folder another pool made (their manifest records the sharers and their data)."""
        other_k = self.base_k is not None and s.k != self.base_k
        return self.root / "sharers" / (f"steps{s.sharer_steps}" + (f"-k{s.k}" if other_k else ""))

    def sharer_loras(self, s: StudySetting) -> Path:
        return self.pool(s) / "LoRA"

    def gates(self, s: StudySetting, variant: Variant = PUBLISHED) -> Path:
        """In the pool's folder: published gates per sharer, routing gates (trained over the pool) in their own."""
        name = f"gate{s.gate_steps}" + ("" if variant.gate_objective == "published"
                                        else f"-{variant.gate_objective}-k{s.k}")
        return self.pool(s) / name

    def composition(self, s: StudySetting, variant: Variant | None = PUBLISHED, control: str | None = None) -> Path:
        """variant None: a gate-free control's run, the same for every variant."""
        return self.out / "compose" / (s.tag() + (variant.suffix() if variant else "")
                                       + (f"-control-{control}" if control else ""))


def check_config(cfg: StudyConfig) -> None:
    if DEMO_SEED in cfg.seeds:
        fail(f"--seeds: {DEMO_SEED} is the demo's own sample (scripts/demo.sh); the study chooses the demo's "
             f"settings, so it must not look at that sample: use other seeds")
    for name in cfg.sweeps:
        if name not in SWEEPABLE:
            fail(f"unknown sweep {name!r}; use one of {', '.join(SWEEPABLE)}")
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown or not cfg.variants:
        fail(f"--variants {' '.join(unknown)}: use one or more of {', '.join(VARIANTS)}")
    if any(m < 1 for m in cfg.k_per_group):
        fail(f"--k_per_group {cfg.k_per_group}: each must be at least 1 (k = groups x it)")
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


def setting_steps(cfg: StudyConfig, d: SampleDirs, s: StudySetting, controls=(), variant: Variant = PUBLISHED,
                  gate_free: bool = True) -> list:
    """Stages 2-5 of one setting and variant, then ``controls``: swapped with the variant's flags, the gate-free
    ones (when ``gate_free``) into the variant-free dirs."""
    task, py = d.sample.task, cfg.python
    data = ["--task_name", task, "--data_dir", str(d.data)]
    index = d.anchors(s) / "anchor_user_idx.json"
    shared = [*data, "--lora_ckpt", str(d.task_lora), "--anchor_idx_path", str(index)]
    gates = d.gates(s, variant)
    compose = [py, script("lora_composition"), *shared, *demo.composition_flags(s)]
    dirs = ["--anchor_dir", str(d.sharer_loras(s)), "--gate_dir", str(gates)]
    tag = "" if variant is PUBLISHED else f" {variant.name}"
    where = "" if s == cfg.base else f" {s.tag()}"
    pool = "" if s.k == cfg.base.k else f" for k={s.k}"   # one log file per run: the pool is in the name
    gate_name = (f"gates ({s.gate_steps} steps){pool}" if variant.gate_objective == "published"
                 else f"gates ({s.gate_steps} steps, {variant.gate_objective}, k={s.k})")
    steps = [
        Step(f"sharers k={s.k}", [py, script("sharer_selection"), "--task_name", task,
                                  "--candidate_path", str(Layout(d.data, get_task(task)).candidate_users),
                                  "--output_dir", str(d.anchors(s)), *demo.sharer_selection_flags(s)], index),
        Step(f"sharer LoRAs ({s.sharer_steps} steps){pool}", [py, script("sharer_loras"), *shared, *demo.sharer_lora_flags(s),
                                                         "--output_dir", str(d.sharer_loras(s))],
             PoolDone(index, d.sharer_loras(s), ADAPTER_WEIGHTS)),
        Step(gate_name, [py, script("sharer_gates"), *shared, *demo.gate_flags(s), *variant.gate_flags(),
                         "--anchor_path", str(d.sharer_loras(s)), "--output_dir", str(gates)],
             PoolDone(index, gates, GATES_FILE)),
        Step(f"Per-Pcs {s.tag()}{tag}", [*compose, *variant.compose_flags(), *dirs, "--save_scores",
                                         "--output_dir", str(d.composition(s, variant))],
             d.composition(s, variant) / "predictions" / "kNP.json"),
    ]
    for control in controls:
        if control in GATE_FREE:
            if not gate_free:
                continue
            out = d.composition(s, None, control)
            argv = [*compose, *dirs, "--control", control, "--output_dir", str(out)]
            name = f"control {control}{where}"
        else:   # swapped assembles (another user's history): the variant's gates and score
            out = d.composition(s, variant, control)
            argv = [*compose, *variant.compose_flags(), *dirs, "--control", control, "--output_dir", str(out)]
            name = f"control {control}{where}{tag}"
        steps.append(Step(name, argv, out / "predictions" / "kNP.json"))
    return steps


def plan(cfg: StudyConfig) -> list:
    """[(phase, {sample: [steps]})]: first every sample's baselines and base setting (every variant, with the
    controls), then the sweeps (the k sweep with its controls, the other settings without), so that an interrupted
    study has the base rows of every sample."""
    base, sweeps = {}, {}
    variants = cfg.variant_list()
    for sample in cfg.samples():
        d = SampleDirs(cfg.root, sample, cfg.base.k)
        with_controls = cfg.control_settings(sample)

        def steps_of(setting):
            controls = cfg.controls if setting in with_controls else ()
            return [st for i, v in enumerate(variants)
                    for st in setting_steps(cfg, d, setting, controls, v, gate_free=i == 0)]
        settings = cfg.settings(sample)
        base[sample] = _once(sample_steps(cfg, d) + steps_of(settings[0]))
        done_in_base = {tuple(st.argv) for st in base[sample]}
        sweeps[sample] = [st for st in _once([st for setting in settings[1:] for st in steps_of(setting)])
                          if tuple(st.argv) not in done_in_base]
    return [("base setting", base), ("sweeps", sweeps)]


def _once(steps: list) -> list:
    """Settings share stage 2-4 runs (the same k, the same sharer / gate steps): each command runs once."""
    return list({tuple(step.argv): step for step in steps}.values())


def step_kind(step: Step) -> str:
    """The step's kind, for the dry run's count (its name without the setting and variant)."""
    for kind in ("sharers", "sharer LoRAs", "gates", "Per-Pcs", "control"):
        if step.name.startswith(kind):
            return kind + (f" {step.name.split()[1]}" if kind == "control" else
                           " (routing)" if kind == "gates" and "routing" in step.name else "")
    return step.name
