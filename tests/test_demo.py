"""The demo's settings in one place (perpcs/experiments/demo.py): scripts/demo.sh runs the commands
``python -m perpcs demo-flags`` prints, every script accepts its flags, and the held-out-seed study runs the same
flags (so that what it chooses is what the demo runs). No model runs here."""
import subprocess
import sys
from pathlib import Path

import pytest

from perpcs.experiments.demo import DEMO_STEPS, DemoSetting, demo_commands
from perpcs.experiments.study import Sample, StudyConfig, StudySetting, plan
from test_ablation import parse_with_script

REPO = Path(__file__).resolve().parents[1]
TASK = "movie_tagging"


def contains(argv: list, part: list) -> bool:
    return any(argv[i:i + len(part)] == part for i in range(len(argv) - len(part) + 1))


def test_every_demo_command_parses_with_its_script():
    for step in DEMO_STEPS:
        for command in demo_commands(step, TASK, max_gen_len="12"):
            if command[0] != "-m":     # python -m perpcs report / explain: checked by test_flags
                parse_with_script(REPO / command[0], command[1:])   # exits (a failed test) on an unknown flag


def test_demo_flags_prints_each_command_of_a_step():
    out = subprocess.run([sys.executable, "-m", "perpcs", "demo-flags", "controls", "--task_name", TASK],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout.splitlines()
    assert [line.split()[-1] for line in out] == ["uniform", "swapped", "peft_merge"]
    env = subprocess.run([sys.executable, "-m", "perpcs", "demo-flags", "env"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split()
    assert "HF_HUB_OFFLINE=1" in env
    bad = subprocess.run([sys.executable, "-m", "perpcs", "demo-flags", "controls"], capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode != 0 and "--task_name" in bad.stderr


@pytest.mark.parametrize("step, study_step", [("task-lora", "task LoRA"), ("oppu", "OPPU"),
                                              ("sharers", "sharers k=4"), ("sharer-loras", "sharer LoRAs (20 steps)"),
                                              ("gates", "gates (8 steps)"), ("compose", "Per-Pcs k4-s20-g8-top1-r16"),
                                              ("profiles", "profiles")])
def test_the_study_runs_the_demos_flags(tmp_path, step, study_step):
    """The study's base setting is the demo's, and each of its runs carries the demo step's flags in one piece (the
    study adds its own data and output dirs around them)."""
    assert StudySetting() == DemoSetting()
    cfg = StudyConfig(tasks=[TASK], seeds=[1], n_groups=[3], root=tmp_path, python="py")
    steps = {s.name: s.argv for s in plan(cfg)[0][1][Sample(TASK, 1, 3)]}
    (demo,) = demo_commands(step, TASK)
    study = steps[study_step]
    assert study[1] == demo[0]
    flags = demo[3:]     # after the script and --task_name <task>
    if step == "compose":
        flags = flags[:-1]   # --save_scores comes after the study's sharer and gate dirs
    assert contains(study, flags), f"{study_step}: {study} lacks {flags}"
