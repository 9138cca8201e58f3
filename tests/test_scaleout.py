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
    out = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=200)   # < 240 s guard
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]


def stage1_args(model_dir, data_dir, out):
    return ["task_LoRA.py", "--task_name", "movie_tagging", "--llama_model_path", str(model_dir), "--device", "cpu",
            "--data_dir", str(data_dir), "--output_dir", str(out), "--max_step", "3", "--batch_size", "4",
            "--lora_dropout", "0", "--max_seq_len", "256", "--k_list", "1", "--temperature", "0",
            "--max_gen_len", "3", "--lr", "1e-2"]


# 12 base queries. Batches of 4 split 2/2 over the ranks. Batches of 11 give an 11-query batch split 6/5 and a
# 1-query batch that leaves rank 1 nothing (its empty-slice forward); with --accum_iter 3 each epoch is one short
# window of 2 micro-steps: the first under no_sync, the second reduces, then the short window's rescale.
@pytest.mark.parametrize("extra, steps", [([], 3), (["--batch_size", "11", "--accum_iter", "3", "--max_step", "2"], 2)],
                         ids=["even", "empty-slice-accum"])
def test_data_parallel_stage1_equals_one_process(tiny_model_dir, data_dir, tmp_path, extra, steps):
    """DDP (gloo, gradient checkpointing on, the default) trains what one process trains on the same global
    batches. Not bit-exact: each rank pads its slice to its own width and sums its own rows' gradients before
    the all-reduce adds the two partial sums, so float32 sums run in another order (~1e-7 relative per step);
    Adam's m / sqrt(v) then passes such differences on, relatively larger where a gradient is near 0. Measured
    after 3 steps at lr 1e-2: at most 3e-6 absolute (2.4e-4 relative) on weights up to ~1e-1."""
    run([sys.executable] + stage1_args(tiny_model_dir, data_dir, tmp_path / "one") + extra)
    run(torchrun(2) + stage1_args(tiny_model_dir, data_dir, tmp_path / "two") + extra)
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    moved = [k for k in one if "lora_B" in k and one[k].abs().max() > 0]
    assert moved                                   # training changed the adapter
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-5)   # float sum order differs
    logs = {run: [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
            for run in ("one", "two")}
    assert [x["step"] for x in logs["two"]] == list(range(1, steps + 1))   # only rank 0 logs, same number of steps
    assert [x["lr"] for x in logs["two"]] == [x["lr"] for x in logs["one"]]   # one schedule: L = global batches
    # the loss logged is the global batch's mean over answer tokens, as one process computes it
    assert [x["loss"] for x in logs["two"]] == pytest.approx([x["loss"] for x in logs["one"]], rel=1e-5)
    # the two ranks split each batch: together they saw exactly the tokens one process saw, not twice as many
    assert [x["tokens"] for x in logs["two"]] == [x["tokens"] for x in logs["one"]]
    assert (tmp_path / "two" / "predictions" / "k1.json").is_file()


def test_ddp_gradients_equal_one_process(tiny_model_dir, tmp_path):
    """The gradients every optimizer step uses, after DDP's reduction, are the ones one process computes on the
    same global batches (tests/ddp_grads.py: uneven slices, a rank with an empty slice, accumulation with a short
    window, gradient checkpointing): normalised by the global batch's answer tokens, not each rank's. DDP
    all-reduces once per optimizer step (no_sync on the other micro-steps), and both ranks step on equal
    gradients. Tolerance: float32 partial sums per rank (measured: 5e-8 absolute on gradients up to 0.15)."""
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
        launcher = [sys.executable] if n == 1 else torchrun(2)
        run(launcher + ["tests/ddp_grads.py", str(tiny_model_dir), str(tmp_path / str(n))])
    one = torch.load(tmp_path / "1" / "rank0.pt")
    ranks = [torch.load(tmp_path / "2" / f"rank{r}.pt") for r in (0, 1)]
    assert one["reductions"] == []                        # one process: no DDP
    assert one["stats"]["steps"] == len(one["steps"]) == 4
    for two in ranks:
        assert len(two["steps"]) == 4
        assert len(two["reductions"]) == 4                # 6 micro-steps; the tiny LoRA is one bucket
        assert two["stats"]["tokens"] == one["stats"]["tokens"]
        for step, (grads_one, grads_two) in enumerate(zip(one["steps"], two["steps"])):
            for g1, g2 in zip(grads_one, grads_two, strict=True):
                torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step + 1}: {m}")
    for g0, g1 in zip(sum(ranks[0]["steps"], []), sum(ranks[1]["steps"], [])):
        assert torch.equal(g0, g1)


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

    from perpcs.engine.training import _collective_device

    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _collective_device(torch.zeros(2)) == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert _collective_device(torch.zeros(2)) == torch.device("cpu")
