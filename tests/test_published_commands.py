"""The authors' numbered commands (tests/data/seed_commands.md, a copy of shared/reference/seed_commands.md) run as
written in a temporary copy of the repository: the model path swapped for the bundled SmolLM2, step counts and
sizes appended as flags, and the evaluation placeholders filled in. Each block runs as its own bash script, from
the copy's root (block 2 changes into anchor_selection/ itself, as written)."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_fixture import sample_layout, subprocess_env

REPO = Path(__file__).resolve().parents[1]
SEED_COMMANDS = Path(__file__).resolve().parent / "data" / "seed_commands.md"
SEED_COMMANDS_SHA256 = "4321aeaf9902e3baf3e5ef08fbc159d91c81c2e6a946fbc247deaf54ced13f95"
TASK = "movie_tagging"
pytestmark = pytest.mark.slow

# appended to each script's command: small steps and sizes, greedy short answers (the flags come last, so they
# override the published values where both give one)
APPENDED = {
    "task_LoRA.py": "--max_step 2 --batch_size 2 --max_seq_len 256 --no-grad_ckpt --k_list 1 --temperature 0 "
                    "--max_gen_len 4",
    "history_anchor.py": "--k 3 --min_history 2",
    "train_anchor_PEFT.py": "--max_step 2 --batch_size 2 --max_seq_len 256 --no-grad_ckpt",
    "train_anchor_gate.py": "--max_step 2 --batch_size 2 --max_seq_len 256 --no-grad_ckpt",
    "lora_composition.py": "--max_seq_len 256 --k_list 1 --temperature 0 --max_gen_len 4",
}
PLACEHOLDERS = {
    "{PATH_TO_LABEL_JSON_FILE}": f"./data/{TASK}/test_100/golds.json",
    "{PATH_TO_PREDICTION_JSON_FILE}": f"./output/{TASK}/LoRA-Composition/predictions/k1-profile.json",
    "{TASK_ID}": "LaMP_2M",
    "{RESULT_JSON_PATH}": f"./output/{TASK}/LoRA-Composition/metrics/k1-profile.json",
}


def published_blocks() -> list:
    """[(title, bash text)] of the six numbered blocks (1-5 and the evaluation), verbatim from the file."""
    text = SEED_COMMANDS.read_text(encoding="utf-8")
    script = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    blocks, title, lines = [], None, []
    for line in script.splitlines():
        if line.startswith("# "):
            if title:
                blocks.append((title, "\n".join(lines).strip() + "\n"))
            title, lines = line[2:], []
        elif title:
            lines.append(line)
    blocks.append((title, "\n".join(lines).strip() + "\n"))
    return blocks


def adapted(block: str) -> str:
    """The block with the model path swapped, flags appended to each python command and placeholders filled."""
    block = block.replace("./llama_download/Llama-2-7b", "smollm2")
    for placeholder, value in PLACEHOLDERS.items():
        block = block.replace(placeholder, value)
    commands = re.split(r"(?<!\\)\n", block)   # a command ends at a newline that is not continued
    out = []
    for command in commands:
        script = re.search(r"python \S*?([A-Za-z_]+\.py)", command)
        if script and script.group(1) in APPENDED:
            command = command.rstrip() + " " + APPENDED[script.group(1)]
        out.append(command)
    return "\n".join(out)


def test_the_copy_is_the_reference_file():
    assert hashlib.sha256(SEED_COMMANDS.read_bytes()).hexdigest() == SEED_COMMANDS_SHA256
    shared = REPO.parent / "shared" / "reference" / "seed_commands.md"
    if shared.is_file():   # a checkout beside shared/: compare with the file itself
        assert shared.read_bytes() == SEED_COMMANDS.read_bytes()


def test_blocks_are_parsed_verbatim():
    blocks = published_blocks()
    assert [t.split(".")[0] for t, _ in blocks[:5]] == ["1", "2", "3", "4", "5"] and blocks[5][0].startswith("Eval")
    assert "--gate_dir ./output/movie_tagging/Anchor_PEFT/gate" in blocks[4][1]
    assert "--anchor_idx_path ./anchor_selection/most_active/anchor_user_idx.pt" in blocks[3][1]
    # what the test changes: the model path, appended flags, placeholders; the published text stays
    four = adapted(blocks[3][1])
    assert "--llama_model_path smollm2 \\\n--tokenizer_path smollm2" in four
    assert four.rstrip().endswith("--output_dir ./output/movie_tagging/Anchor_PEFT/gate " + APPENDED["train_anchor_gate.py"])


def repo_copy(root: Path) -> Path:
    """The repository's code (no outputs, data, tests or caches) under root/repo."""
    skip = {".git", ".venv", "output", "tests", ".cache", "__pycache__", ".pytest_cache", "bench", "llama_download"}

    def ignore(directory, names):
        here = Path(directory)
        ignored = {n for n in names if n in skip}
        if here.name in ("data", "anchor_selection"):   # generated per-task dirs
            ignored |= {n for n in names if (here / n).is_dir()}
        return ignored

    target = root / "repo"
    shutil.copytree(REPO, target, ignore=ignore)
    return target


# Idle 2-core machine: 97 s for all the blocks (OMP_NUM_THREADS=1); the guard is 5x that.
@pytest.mark.timeout(500)
def test_published_commands_run_as_written(tmp_path, smollm2_dir):
    from perpcs.data.layout import read_json
    from perpcs.evaluation.metrics import evaluate_task
    from perpcs.data.tasks import get_task

    repo = repo_copy(tmp_path)
    sample_layout(TASK, repo, n_users=14, n_history=6, n_queries=2, n_test=2, seed=3)
    bin_dir = tmp_path / "bin"     # `python` in the commands is this interpreter
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')   # a venv's python: exec
    (bin_dir / "python").chmod(0o755)                                                     # it, not a symlink
    env = {**subprocess_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PERPCS_CACHE": os.environ.get("PERPCS_CACHE", str(Path.home() / ".cache" / "perpcs"))}
    logs = {}
    for title, block in published_blocks():
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", adapted(block)], cwd=repo, env=env,
                                capture_output=True, text=True, timeout=400)   # one block; all took 97 s
        logs[title] = result.stdout + result.stderr
        assert result.returncode == 0, f"block {title!r} failed:\n{adapted(block)}\n{logs[title][-4000:]}"

    out = repo / "output" / TASK
    index = read_json(repo / "anchor_selection" / TASK / "anchor_user_idx.json")
    sharers = [str(u) for u in index["user_ids"]]
    assert sorted(p.name for p in (out / "Anchor_PEFT/LoRA").glob("user_*")) == sorted(f"user_{u}" for u in sharers)
    for uid in sharers:
        assert (out / f"Anchor_PEFT/gate/user_{uid}/gates.safetensors").is_file()
    # step 4's index file does not exist: it resolved to stage 2's, and said so
    assert "most_active/anchor_user_idx.pt does not exist" in logs[published_blocks()[3][0]]
    assert not (repo / "anchor_selection" / "most_active").exists()
    test_users = read_json(repo / "data" / TASK / "test_100" / "user_test_100.json")
    recipes = sorted(p.stem for p in (out / "LoRA-Composition/recipes").glob("*.json"))
    assert recipes == sorted(f"user_{u['user_id']}" for u in test_users)
    assert json.loads((out / "LoRA-Composition/recipes" / f"{recipes[0]}.json").read_text())["settings"]["topk"] == 3
    # the evaluation block scored the composed predictions: the metrics equal the LaMP metrics of those files
    golds = read_json(repo / PLACEHOLDERS["{PATH_TO_LABEL_JSON_FILE}"])
    preds = read_json(repo / PLACEHOLDERS["{PATH_TO_PREDICTION_JSON_FILE}"])
    assert len(preds["golds"]) == len(golds["golds"]) == 4
    metrics = read_json(repo / PLACEHOLDERS["{RESULT_JSON_PATH}"])
    assert metrics == pytest.approx(evaluate_task(golds, preds, get_task(TASK)))
