"""Generation lengths: the demo and the scripts leave the number of new tokens to the task (perpcs/data/tasks.py)
unless the user sets one, and what a stage records about its predictions is the length it really used.

The demo runs with a fake interpreter that only logs its arguments, so no model runs here.
"""
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perpcs.data.tasks import TASKS, get_task
from perpcs.stages.config import GenerationConfig
from test_ablation import parse_with_script, run_task_commands

REPO = Path(__file__).resolve().parents[1]
PREDICTING = ("task_LoRA.py", "lora_composition.py", "OPPU.py")    # the stages that generate answers


def demo_commands(tmp_path, task="news_headline", env_extra=None) -> list:
    """argv (after the interpreter) of every python command scripts/demo.sh runs, from a copy of the script in an
    empty tree with an interpreter that logs its arguments and does nothing (but hands the demo's questions for its
    commands, `-m perpcs demo-flags`, to the real one)."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(REPO / "scripts" / "demo.sh", tmp_path / "scripts" / "demo.sh")
    log = tmp_path / "calls.log"
    fake_py = tmp_path / "fakepy"
    fake_py.write_text(f'#!/bin/sh\nif [ "$1 $2 $3" = "-m perpcs demo-flags" ]; then '
                       f'PYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} "$@"; fi\n'
                       f'for a in "$@"; do printf "%s\\037" "$a"; done >> {log}\necho >> {log}\n')
    fake_py.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "TASK": task, "PYTHON": str(fake_py), **(env_extra or {})}
    result = subprocess.run(["bash", str(tmp_path / "scripts/demo.sh")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [line.rstrip("\037").split("\037") for line in log.read_text().splitlines() if line]


def stage_argv(commands: list, script: str) -> list:
    found = [argv for argv in commands if argv[0] == script]
    assert found, f"the demo runs no {script}"
    return found[0][1:]


@pytest.mark.parametrize("task", ["news_headline", "movie_tagging"])
def test_demo_leaves_the_length_to_the_task(tmp_path, task):
    """No fixed --max_gen_len (it was 8, which cut headlines, titles and tweets): each predicting stage's flags
    give the task's own length, both in what it generates and in what it records."""
    commands = demo_commands(tmp_path, task)
    for script in PREDICTING:
        argv = stage_argv(commands, script)
        assert "--max_gen_len" not in argv, f"{script}: {shlex.join(argv)}"
        args = parse_with_script(REPO / script, argv)
        assert args.max_gen_len is None
        import cli_flags    # the stage scripts' flag -> config code (the repo root is on the path once they load)
        recorded = cli_flags.generation_config(args).recorded(get_task(task))
        assert recorded["max_gen_len"] == TASKS[task].max_gen_len


def test_demo_max_gen_len_sets_one_length_for_every_stage(tmp_path):
    commands = demo_commands(tmp_path, "news_headline", {"MAX_GEN_LEN": "12"})
    for script in PREDICTING:
        argv = stage_argv(commands, script)
        assert argv[argv.index("--max_gen_len") + 1] == "12"
        assert parse_with_script(REPO / script, argv).max_gen_len == 12


def test_run_task_leaves_the_length_to_the_task_unless_max_gen_len_says(tmp_path):
    result, commands = run_task_commands(tmp_path)
    assert result.returncode == 0, result.stderr
    stages = [argv for _, argv in commands if argv[1] in PREDICTING]
    assert len(stages) == 3 and not any("--max_gen_len" in argv for argv in stages)
    _, commands = run_task_commands(tmp_path, {"MAX_GEN_LEN": "30"})
    stages = [argv for _, argv in commands if argv[1] in PREDICTING]
    assert len(stages) == 3
    for argv in stages:
        assert parse_with_script(REPO / argv[1], argv[2:]).max_gen_len == 30


def test_ablation_passes_no_length_of_its_own(tmp_path):
    """scripts/ablation.py's stage 5 commands carry a length only when --compose_extra/--extra says so."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/ablation.py"),
         "--task_name", "news_headline", "--sweep", "topk", "--values", "1", "--dry_run", "--output_root",
         str(tmp_path / "out"), "--anchor_dir", str(tmp_path / "none"), "--python", "py"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    compose = [line for line in result.stdout.splitlines() if "lora_composition.py" in line]
    assert compose and "--max_gen_len" not in compose[0]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_recorded_length_is_the_tasks_unless_set(task):
    t = get_task(task)
    assert GenerationConfig().recorded(t)["max_gen_len"] == t.max_gen_len
    assert GenerationConfig(max_gen_len=7).recorded(t)["max_gen_len"] == 7


def test_task_lengths_fit_the_sample_answers(smollm2_dir):
    """Every gold answer of the generated sample fits in its task's length, in SmolLM2 tokens plus the end token
    (the bundled model's tokenizer); the demo's old fixed 8 did not fit the sample's headlines, titles, tweets."""
    from transformers import AutoTokenizer

    from perpcs.data.sample import generate

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    longest = {}
    for name, task in TASKS.items():
        files = generate(name, n_users=12, n_history=8, n_queries=2, seed=1)
        golds = [g["output"] for split in ("train", "dev") for g in files.get(f"{split}_outputs.json",
                                                                              {"golds": []})["golds"]]
        longest[name] = max(len(tokenizer(str(o), add_special_tokens=False)["input_ids"]) for o in golds)
        assert longest[name] + 1 <= task.max_gen_len, f"{name}: a sample answer of {longest[name]} tokens, " \
                                                       f"max_gen_len {task.max_gen_len}"
    assert all(longest[name] + 1 > 8 for name in ("news_headline", "scholarly_title", "tweet_paraphrase"))
