"""The demo's settings, in one place: scripts/demo.sh runs the commands this module writes
(``python -m perpcs demo-flags <step>``), and the held-out-seed study (experiments/study.py) builds its runs from
the same flags, so that the settings the study chooses are the ones the demo runs.

The method's settings (k=4 sharers, 20 sharer steps, 8 gate steps, top-1, recent_k=16) were chosen by the study
(seeds 1-3 with 3 and 5 latent groups; docs/study.md): no swept setting beat them on both movie_tagging and
product_rating. The demo's own sample (seed 0) took no part in that choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from perpcs.errors import fail
from perpcs.experiments.scripts import script

DEMO_SEED = 0      # the seed of the demo's sample (data/make_sample.py's default): never part of the study
# Each stage runs offline (the bundled model), and the tokenizers' threads do not fight torch's.
ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# fp32, not --cpu_bf16: bf16 autocast's kernels differ between CPUs (native AVX512-BF16, AMX, or emulated), and
# with them the assembled recipes and greedy answers, so a bf16 table is one CPU's; fp32 gave the same table under
# other CPU ISA limits here (docs/demo-and-results.md, "Numbers across machines"), at ~1.6x bf16's training cost.
COMMON = ["--device", "cpu"]
# --group_by_length: length-grouped batches, kept on for speed (opt-in since the published loops shuffle; the
# training stages' default is a seeded shuffle). The demo's settings were chosen with it on, and with it the
# demo's outputs stay what they were.
TRAIN = ["--no-grad_ckpt", "--max_seq_len", "512", "--group_by_length"]
# New tokens per answer: the task's own length (perpcs/data/tasks.py); generation stops at the end-of-answer token.
GEN = ["--k_list", "1", "--temperature", "0"]
SAMPLE_SIZE = {"n_users": 40, "n_history": 16, "n_queries": 4, "n_test": 4}
CONTROLS = ("uniform", "swapped", "peft_merge")              # user-blind rows from the same sharers and gates
RETRIEVAL_CONTROLS = ("nearest_sharer", "random_sharer")     # one sharer's whole LoRA per user


@dataclass(frozen=True)
class DemoSetting:
    """The method's settings the demo runs with and the study varies."""
    k: int = 4                 # sharers (stage 2 --k)
    sharer_steps: int = 20     # stage 3 --max_step
    gate_steps: int = 8        # stage 4 --max_step
    topk: int = 1              # stage 5 --topk
    recent_k: int = 16         # stage 5 --recent_k (history items the assembly reads)

    def tag(self) -> str:
        return f"k{self.k}-s{self.sharer_steps}-g{self.gate_steps}-top{self.topk}-r{self.recent_k}"


# ---- each step's own flags (no task, data or output dirs: the demo and the study add their own) ---------------

def sample_flags() -> list:
    return ["--n_users", str(SAMPLE_SIZE["n_users"]), "--n_history", str(SAMPLE_SIZE["n_history"]),
            "--n_queries", str(SAMPLE_SIZE["n_queries"])]


def prepare_flags() -> list:
    return ["--n_test", str(SAMPLE_SIZE["n_test"])]


def profile_flags() -> list:
    return ["--k", "3", "--max_gen_len", "16", "--batch_size", "20", "--device", "cpu"]


def task_lora_flags(gen: list = GEN) -> list:
    return [*COMMON, *TRAIN, *gen, "--epochs", "1", "--lr", "1e-3"]


def oppu_flags(gen: list = GEN) -> list:
    return [*COMMON, *TRAIN, *gen, "--epochs", "3", "--max_step", "20", "--batch_size", "4", "--lr", "5e-3"]


def sharer_selection_flags(s: DemoSetting) -> list:
    return ["--k", str(s.k), "--min_history", "5", "--device", "cpu"]


def sharer_lora_flags(s: DemoSetting) -> list:
    return [*COMMON, *TRAIN, "--max_step", str(s.sharer_steps), "--lr", "5e-3", "--batch_size", "4"]


def gate_flags(s: DemoSetting) -> list:
    return [*COMMON, *TRAIN, "--max_step", str(s.gate_steps), "--lr", "5e-3", "--batch_size", "4", "--recent_k", "16"]


def composition_flags(s: DemoSetting, gen: list = GEN) -> list:
    return [*COMMON, *gen, "--max_seq_len", "512", "--topk", str(s.topk), "--recent_k", str(s.recent_k)]


# ---- the demo's commands ----------------------------------------------------------------------------------------

def groups_file(task: str) -> str:
    """The sample's latent groups, beside data/<task>/ (no stage reads it): explain, routing share."""
    return f"data/sample_groups/{task}.json"


def demo_commands(step: str, task: str, max_gen_len: str | None = None) -> list:
    """The commands of one step of scripts/demo.sh, each the script and its flags (after the interpreter), in the
    order they run. ``max_gen_len`` (the demo's MAX_GEN_LEN) is passed on as given, for every generating step."""
    s = DemoSetting()
    gen = GEN + (["--max_gen_len", max_gen_len] if max_gen_len else [])
    raw = f"output/lamp_raw/{task}"
    named = ["--task_name", task]
    routing = ["--groups_file", groups_file(task)] if Path(groups_file(task)).is_file() else []
    commands = {
        "sample": lambda: [[script("make_sample"), *named, "--out_dir", raw, *sample_flags(),
                            "--groups_file", groups_file(task)],
                           [script("prepare_lamp"), *named, "--lamp_dir", raw, "--out_dir", "data", *prepare_flags()]],
        "profiles": lambda: [[script("gen_profile"), *named, *profile_flags()]],
        "task-lora": lambda: [[script("task_lora"), *named, *task_lora_flags(gen)]],
        "sharers": lambda: [[script("sharer_selection"), *named, *sharer_selection_flags(s)]],
        "sharer-loras": lambda: [[script("sharer_loras"), *named, *sharer_lora_flags(s)]],
        "gates": lambda: [[script("sharer_gates"), *named, *gate_flags(s)]],
        "compose": lambda: [[script("lora_composition"), *named, *composition_flags(s, gen), "--save_scores"]],
        "oppu": lambda: [[script("oppu"), *named, *oppu_flags(gen)]],
        "controls": lambda: [[script("lora_composition"), *named, *composition_flags(s, gen), "--control", control]
                             for control in CONTROLS],
        "retrieval": lambda: [[script("lora_composition"), *named, *COMMON, *gen, "--max_seq_len", "512",
                               "--control", control] for control in RETRIEVAL_CONTROLS],
        "base-only": lambda: [[script("task_lora"), *named, *COMMON, *gen, "--max_seq_len", "512", "--base_only"]],
        # routing share: with the sample's latent groups when they are there
        "report": lambda: [["-m", "perpcs", "report", *named, "--output_file", f"output/{task}/results.md",
                            *routing]],
        "explain": lambda: [["-m", "perpcs", "explain", *named, *routing]],
    }
    if step not in commands:
        fail(f"no demo step {step!r}; known: {', '.join(DEMO_STEPS)}")
    return commands[step]()


DEMO_STEPS = ("sample", "profiles", "task-lora", "sharers", "sharer-loras", "gates", "compose", "oppu", "controls",
              "retrieval", "base-only", "report", "explain")
