"""The whole Per-Pcs pipeline on the tiny random Llama, built once per test session.

Sample data for movie_tagging (16 users: 7 base, 5 candidates, 3 test, 1 reserve; 8 history items and 2
queries each), a profile text per user, the stage 1 task LoRA and its predictions, 3 sharers (most active),
their LoRAs (stage 3), gates (stage 4) and the composition (stage 5). Tests read these outputs; a test that
changes or re-runs a stage copies what it needs into its own tmp dir first.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASK = "movie_tagging"
N_USERS, N_HISTORY, N_QUERIES, N_TEST = 16, 8, 2, 3
N_SHARERS = 3
# The stage runs' --device: the CPU here and in CI; PERPCS_TEST_DEVICE=cuda runs them on a GPU
# (bench/gpu_session.sh does, to check the CUDA code paths of every stage).
DEVICE = os.environ.get("PERPCS_TEST_DEVICE", "cpu")


@dataclass
class Pipeline:
    root: Path             # everything lives below this directory
    model: Path            # the tiny Llama (HF dir)
    data: Path             # --data_dir
    task_lora: Path        # stage 1 output dir (adapter + predictions/)
    anchor_idx: Path       # stage 2 anchor_user_idx.json
    anchor_peft: Path      # stage 3 output (user_<id>/ adapters)
    anchor_gate: Path      # stage 4 output (user_<id>/gates.safetensors)
    composition: Path      # stage 5 output (recipes, adapters, predictions, summary.json)
    logs: dict             # stage name -> captured stdout of the build run

    @property
    def layout(self):
        from perpcs.data.layout import Layout
        from perpcs.data.tasks import get_task
        return Layout(self.data, get_task(TASK))

    @property
    def golds(self) -> Path:
        return self.layout.golds

    def sharer_ids(self) -> list:
        return [str(u) for u in json.loads(self.anchor_idx.read_text())["user_ids"]]

    def test_ids(self) -> list:
        return [str(u["user_id"]) for u in json.loads(self.layout.test_users.read_text())]

    # flag lists of each stage: tests add or override flags (argparse keeps the last occurrence)
    def common(self) -> list:
        return ["--task_name", TASK, "--llama_model_path", str(self.model), "--device", DEVICE,
                "--data_dir", str(self.data)]

    def task_lora_args(self, output_dir) -> list:
        return self.common() + ["--output_dir", str(output_dir), "--max_step", "2", "--max_seq_len", "256",
                                "--k_list", "1", "--temperature", "0", "--max_gen_len", "4"]

    def sharer_args(self, output_dir) -> list:
        return self.common() + ["--lora_ckpt", str(self.task_lora / "lora_ckpt.pt"),
                                "--anchor_idx_path", str(self.anchor_idx), "--output_dir", str(output_dir),
                                "--max_step", "2", "--max_seq_len", "256"]

    def gate_args(self, output_dir, anchor_path=None) -> list:
        return self.common() + ["--lora_ckpt", str(self.task_lora), "--anchor_idx_path", str(self.anchor_idx),
                                "--anchor_path", str(anchor_path or self.anchor_peft),
                                "--output_dir", str(output_dir), "--max_step", "2", "--max_seq_len", "256"]

    def compose_args(self, output_dir, anchor_path=None, gate_path=None) -> list:
        return self.common() + ["--lora_ckpt", str(self.task_lora), "--anchor_idx_path", str(self.anchor_idx),
                                "--anchor_dir", str(anchor_path or self.anchor_peft),
                                "--gate_dir", str(gate_path or self.anchor_gate),
                                "--output_dir", str(output_dir), "--topk", "2", "--max_seq_len", "256",
                                "--k_list", "1", "--temperature", "0", "--max_gen_len", "4"]

    def oppu_args(self, output_dir) -> list:
        return self.common() + ["--lora_ckpt", str(self.task_lora), "--output_dir", str(output_dir),
                                "--max_step", "1", "--max_seq_len", "256", "--k_list", "1",
                                "--temperature", "0", "--max_gen_len", "4"]

    def profile_args(self, output_file) -> list:
        return ["--task_name", TASK, "--data_dir", str(self.data), "--model_path", str(self.model),
                "--device", DEVICE, "--k", "2", "--max_gen_len", "4", "--max_seq_len", "256",
                "--batch_size", "1", "--output_file", str(output_file)]


# ------------------------------------------------------------------------------------------------- helpers

def sample_layout(task_name: str, root: Path, n_users: int, n_history: int, n_queries: int, n_test: int,
                  seed: int = 0):
    """make_sample -> prepare_lamp under root/raw and root/data, plus the profile text "profile of <user id>"
    for every user; returns the task's Layout."""
    from perpcs.data.layout import Layout, all_splits_users, user_id
    from perpcs.atomic import write_json_atomic
    from perpcs.data.prepare import prepare_lamp
    from perpcs.data.sample import write_sample
    from perpcs.data.tasks import get_task

    write_sample(task_name, root / "raw", n_users, n_history, n_queries, seed=seed)
    prepare_lamp(task_name, root / "raw", root / "data", n_test=n_test, verbose=False)
    layout = Layout(root / "data", get_task(task_name))
    write_json_atomic(layout.profiles, {user_id(u): f"profile of {user_id(u)}" for u in all_splits_users(layout)})
    return layout


def script(name: str) -> Path:
    return ROOT / name


def load_script(relpath: str):
    """Import a script that lives outside a package (eval/eval_task.py, data/gen_profile.py, ...)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(relpath.replace("/", "_").removesuffix(".py"), ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subprocess_env() -> dict:
    # one thread: the test machine has 2 busy cores, and oversubscribed torch threads run ~10x slower
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                TQDM_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@contextmanager
def single_thread():
    """Torch on one thread while the tests run (same numerics as the OMP_NUM_THREADS=1 subprocesses)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_script(name: str, argv: list, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    """Run a stage script as its own process (``python <script> ...``) from the repo root."""
    proc = subprocess.run([sys.executable, str(script(name)), *map(str, argv)], cwd=cwd or ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=200)   # < 240 s guard
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (outputs must be byte-identical, safetensors headers included)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_digests(root: Path, pattern: str = "**/*") -> dict:
    """{relative path: digest} of the plain files below root whose path has no hidden part (staging)."""
    out = {}
    for path in sorted(Path(root).glob(pattern)):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = file_digest(path)
    return out


def adapter_digests(root: Path) -> dict:
    """Digests of every user_<id>/ output file (adapters, configs, gates) below root."""
    return {k: v for k, v in file_digests(root).items() if k.startswith("user_")}


def log_users(log_path: Path) -> list:
    """User ids in a users_log.jsonl, in order (one line per finished user)."""
    if not Path(log_path).is_file():
        return []
    return [json.loads(line)["user_id"] for line in Path(log_path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------- the build

_SHARED: dict = {}


def shared_pipeline(tmp_path_factory, tiny_model_dir) -> Pipeline:
    """Build the pipeline once per session (both test modules use it; none may change its files)."""
    if "pipeline" not in _SHARED:
        _SHARED["pipeline"] = build_pipeline(tmp_path_factory.mktemp("pipeline"), Path(tiny_model_dir))
    return _SHARED["pipeline"]


def build_pipeline(root: Path, model: Path) -> Pipeline:
    import io
    from contextlib import redirect_stdout

    sys.path.insert(0, str(ROOT))
    import lora_composition
    import task_LoRA
    import train_anchor_gate
    import train_anchor_PEFT
    from perpcs.stages.sharer_selection import run_sharer_selection

    p = Pipeline(root=root, model=model, data=root / "data", task_lora=root / "task-base_LLM",
                 anchor_idx=root / "anchor" / "anchor_user_idx.json", anchor_peft=root / "Anchor_PEFT" / "LoRA",
                 anchor_gate=root / "Anchor_PEFT" / "gate", composition=root / "LoRA-Composition", logs={})
    sample_layout(TASK, root, N_USERS, N_HISTORY, N_QUERIES, N_TEST)
    stages = [
        ("task_lora", lambda: task_LoRA.main(p.task_lora_args(p.task_lora))),
        ("anchors", lambda: run_sharer_selection(TASK, candidate_path=p.layout.candidate_users,
                                                 output_dir=p.anchor_idx.parent, k=N_SHARERS,
                                                 strategy="most_active", min_history=2)),
        ("sharers", lambda: train_anchor_PEFT.main(p.sharer_args(p.anchor_peft))),
        ("gates", lambda: train_anchor_gate.main(p.gate_args(p.anchor_gate))),
        ("composition", lambda: lora_composition.main(p.compose_args(p.composition) + ["--save_adapters"])),
    ]
    for name, run in stages:
        buf = io.StringIO()
        with redirect_stdout(buf), single_thread():
            run()
        p.logs[name] = buf.getvalue()
    return p


# ----------------------------------------------------------------------------------------- shared by the tests

@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_model_dir):
    return shared_pipeline(tmp_path_factory, tiny_model_dir)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def run_stage(main, argv, capsys) -> str:
    """A stage's main in this process, through run_cli as its script runs it; returns its stdout."""
    from perpcs.errors import run_cli
    capsys.readouterr()
    try:
        run_cli(lambda: main(argv))
    except SystemExit as err:
        raise AssertionError(f"exit {err.code}: {capsys.readouterr().err[-2000:]}") from None
    return capsys.readouterr().out



def cli_error(main, argv, capsys) -> str:
    """Run a stage that must refuse: exit code 2 and a one-line ``error:`` message, which is returned."""
    from perpcs.errors import run_cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    last = err.strip().splitlines()[-1]           # after any progress bars: the one error line
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last
