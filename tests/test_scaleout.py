"""Scale-out on the CPU with 2 processes (gloo): data-parallel stage 1 and torchrun-sharded stage 3 give the
same results as one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline_fixture import sample_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout")
    sample_layout("movie_tagging", root, n_users=14, n_history=6, n_queries=2, n_test=2)
    return root / "data"


def run(cmd, **env):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    out = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]


def stage1_args(model_dir, data_dir, out):
    return ["task_LoRA.py", "--task_name", "movie_tagging", "--llama_model_path", str(model_dir), "--device", "cpu",
            "--data_dir", str(data_dir), "--output_dir", str(out), "--max_step", "3", "--batch_size", "4",
            "--lora_dropout", "0", "--max_seq_len", "256", "--k_list", "1", "--temperature", "0",
            "--max_gen_len", "3", "--lr", "1e-2"]


def test_data_parallel_stage1_equals_one_process(tiny_model_dir, data_dir, tmp_path):
    run([sys.executable] + stage1_args(tiny_model_dir, data_dir, tmp_path / "one"))
    run(torchrun(2) + stage1_args(tiny_model_dir, data_dir, tmp_path / "two"))
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    moved = [k for k in one if "lora_B" in k and one[k].abs().max() > 0]
    assert moved                                   # training changed the adapter
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-5)   # float sum order differs
    logs = {run: [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
            for run in ("one", "two")}
    assert [x["step"] for x in logs["two"]] == [1, 2, 3]      # only rank 0 logs, same number of steps
    assert [x["lr"] for x in logs["two"]] == [x["lr"] for x in logs["one"]]   # one schedule: L = global batches
    # the two ranks split each batch: together they saw exactly the tokens one process saw, not twice as many
    assert [x["tokens"] for x in logs["two"]] == [x["tokens"] for x in logs["one"]]
    assert (tmp_path / "two" / "predictions" / "k1.json").is_file()


def test_torchrun_sharded_sharer_loras_equal_one_process(tiny_model_dir, data_dir, tmp_path):
    task_lora = tmp_path / "task"
    run([sys.executable] + stage1_args(tiny_model_dir, data_dir, task_lora))
    candidates = json.loads((data_dir / "movie_tagging" / "user_anchor_candidate.json").read_text())
    index = {"task": "movie_tagging", "strategy": "most_active", "k": 3, "seed": 0, "indices": [0, 1, 2],
             "user_ids": [candidates[i]["user_id"] for i in range(3)], "clusters": None}
    (tmp_path / "idx.json").write_text(json.dumps(index))

    def stage3(out):
        return ["train_anchor_PEFT.py", "--task_name", "movie_tagging", "--llama_model_path", str(tiny_model_dir),
                "--device", "cpu", "--data_dir", str(data_dir), "--lora_ckpt", str(task_lora), "--anchor_idx_path",
                str(tmp_path / "idx.json"), "--output_dir", str(out), "--max_step", "2", "--max_seq_len", "256",
                "--lr", "1e-2"]

    run([sys.executable] + stage3(tmp_path / "one"))
    run(torchrun(2) + stage3(tmp_path / "two"))     # WORLD_SIZE / RANK split the sharers
    for uid in index["user_ids"]:
        a = (tmp_path / "one" / f"user_{uid}" / "adapter_model.safetensors").read_bytes()
        b = (tmp_path / "two" / f"user_{uid}" / "adapter_model.safetensors").read_bytes()
        assert a == b, uid
    logs = [json.loads(x) for x in (tmp_path / "two" / "users_log.jsonl").read_text().splitlines()]
    assert sorted(r["user_id"] for r in logs) == sorted(index["user_ids"])   # each sharer trained once


def test_collectives_move_cpu_tensors_to_the_gpu_under_nccl(monkeypatch):
    """NCCL reduces GPU tensors only: the loss/token counts built on the CPU must go to this rank's GPU
    (this machine has no GPU and no NCCL, so the backend and the current device are faked)."""
    import torch.distributed as dist

    from perpcs.training import _collective_device

    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _collective_device(torch.zeros(2)) == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert _collective_device(torch.zeros(2)) == torch.device("cpu")
