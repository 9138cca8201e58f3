"""bench/bench_gpu.py in its CPU smoke mode: it runs the four works end to end and reports positive numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_gpu.py"

# The main number(s) of each work, all of which must be measured and positive.
MAIN_METRICS = {
    "train": ("tokens_per_s", "s_per_step"),
    "gate": ("tokens_per_s", "s_per_step"),
    "compose": ("s_per_user", "pool_read_s"),
    "generate": ("s_per_batch", "new_tokens_per_s", "workload_s", "workload_new_tokens_per_s"),
}


def run_bench(*args, timeout=180) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_smoke_reports_all_four_works(tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench("--smoke", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["works"]) == set(MAIN_METRICS)
    for work, metrics in MAIN_METRICS.items():
        for metric in metrics:
            value = report["works"][work][metric]
            assert isinstance(value, (int, float)) and value > 0, f"{work}.{metric} = {value!r}"
    shape = report["shape"]
    train = report["works"]["train"]
    # every timed step holds the whole batch, all of its tokens counted
    assert train["tokens_per_step"] == shape["train_batch"] * shape["seq_len"]
    assert train["grad_ckpt"] is True
    assert report["works"]["compose"]["sharers"] == shape["sharers"]
    gen = report["works"]["generate"]
    # tokens/s is the new tokens actually produced over the measured time
    assert abs(gen["new_tokens_per_s"] * gen["s_per_batch"] - shape["gen_rows"] * shape["new_tokens"]) \
        <= 0.01 * shape["gen_rows"] * shape["new_tokens"]
    labels = [row["work"] for row in report["table"]]
    assert len(labels) == len(set(labels)) >= 8
    assert all(row["measured"] > 0 and row["original"] > 0 for row in report["table"])
    assert "composition s/target user" in done.stdout


def test_only_runs_the_chosen_work_and_rejects_unknown_ones(tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench("--smoke", "--only", "generate", "--gen_prompts", "3", "--gen_batch", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["works"]) == ["generate"]
    assert report["works"]["generate"]["workload_prompts"] == 3
    assert report["works"]["generate"]["workload_batch"] == 2

    bad = run_bench("--smoke", "--only", "train,fly")
    assert bad.returncode == 2
    assert "error:" in bad.stderr and "fly" in bad.stderr


def test_gpu_session_script_runs_every_step_and_writes_its_files(tmp_path):
    """bench/gpu_session.sh is the one prepared call of a GPU session (its minutes are few): SMOKE=1 runs the
    same steps on the CPU with the tiny shape, and each must succeed and leave its file in $OUT."""
    import re
    import xml.etree.ElementTree as ET

    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SMOKE="1", OUT=str(out),
               PYTHON=sys.executable, TESTS="tests/test_all_tasks.py::test_task_runs_end_to_end[citation]")
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=200)   # 32.5 s idle; under the 240 s guard
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "session.log").read_text()
    steps = re.findall(r"== (\w+): rc=(\d+)", log)
    assert steps == [(name, "0") for name in ("bench", "cuda_tests", "bench_nockpt", "bench_static",
                                              "bench_compile")], log[-3000:]
    assert json.loads((out / "gpu_nockpt.json").read_text())["works"]["train"]["grad_ckpt"] is False
    assert json.loads((out / "gpu_static.json").read_text())["works"]["generate"]["kv_cache"] == "static"
    assert json.loads((out / "gpu_compile.json").read_text())["compile"] is True
    assert set(json.loads((out / "gpu.json").read_text())["works"]) == set(MAIN_METRICS)
    suite = ET.parse(out / "cuda_tests.xml").getroot().iter("testsuite").__next__()
    assert int(suite.get("tests")) == 1 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    assert len(list(out.iterdir())) <= 8   # the device tool returns at most 8 files


def test_padding_ratio_by_hand_and_grouping_pads_less():
    sys.path.insert(0, str(REPO / "bench"))
    from bench_padding import padding_ratio

    # batch size 2, one epoch: every batch is as wide as its longest row
    assert padding_ratio([5, 5, 5, 5], 2, grouped=False, seeds=3) == 1.0
    lengths = [10, 1, 10, 1, 10, 1, 10, 1]
    grouped = padding_ratio(lengths, 2, grouped=True, seeds=3)
    assert grouped == 1.0                           # sorted within the window: 10s together, 1s together
    assert padding_ratio(lengths, 2, grouped=False, seeds=20) > 1.2   # random pairs mix 10s and 1s
    assert padding_ratio([3, 1], 2, grouped=False, seeds=1) == 6 / 4


def test_padding_bench_runs_on_sample_data(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from bench_padding import main

    report = main(["--tasks", "product_rating", "--json", str(tmp_path / "pad.json")])
    rows = report["tasks"]["product_rating"]
    assert set(rows) == {"stage 1", "sharers"}
    for row in rows.values():
        assert row["examples"] > 0 and row["min"] <= row["median"] <= row["max"]
        assert 1.0 <= row["grouped"] <= row["random"]
    assert json.loads((tmp_path / "pad.json").read_text())["tasks"] == report["tasks"]


def test_scale_bench_quick_measures_every_part(tmp_path):
    """bench/bench_scale.py --quick: every part runs in its own process and reports its time and peak RSS; the
    generated raw data goes through prepare_lamp into the users it was made of, and stage 5's RSS is sampled after
    every test user."""
    out = tmp_path / "scale.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_scale.py"), "--quick", "--json", str(out),
                           "--work_dir", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)   # ~10 s idle
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(out.read_text())
    parts, size = report["parts"], report["sizes"]
    prep = parts["prepare"]
    assert prep["questions"] == size["questions"] and prep["users"] == prep["questions"] // size["per_user"]
    assert (tmp_path / "work" / "raw" / "train_questions.json").is_file()
    for n in size["user_sizes"]:
        user = parts["user"][str(n)]
        assert user["items"] == n and user["examples"] == 2 * n - 1   # every item, and again with history after 1
        assert user["distinct_words"] > n                                # a vocabulary, not a handful of templates
    assert parts["variants"]["rows"] == size["variant_users"] * 4 * 8   # 4 queries per user, 8 variants
    stage5 = parts["stage5"]
    assert stage5["users"] == size["stage5_users"]
    assert [s["when"] for s in stage5["samples"]][-1] == f"after user {size['stage5_users']}"
    for row in [prep, *parts["user"].values(), parts["variants"], stage5]:
        assert row["seconds"] >= 0 and row["peak_rss_mb"] > 10
    assert "stage5: user 1/" in done.stdout   # long steps show progress


def test_scale_bench_rejects_unknown_parts():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_scale.py"), "--quick", "--only", "user,fly"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "fly" in done.stderr
