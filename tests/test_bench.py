"""bench/bench_gpu.py in its CPU smoke mode: it runs the four works end to end and reports positive numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.timeout(660)   # a hang guard: its steps are several benchmarks (~50 s idle, 380+ s under heavy load)
def test_gpu_session_script_runs_every_step_and_writes_its_files(tmp_path):
    """bench/gpu_session.sh is the one prepared call of a GPU session (its minutes are few): SMOKE=1 runs the
    same steps on the CPU with the tiny shape, and each must succeed and leave its file in $OUT."""
    import re
    import xml.etree.ElementTree as ET

    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SMOKE="1", OUT=str(out),
               PYTHON=sys.executable, TESTS="tests/test_all_tasks.py::test_task_runs_end_to_end[citation]")
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)   # 32.5 s idle + stage 5's ~10 s
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "session.log").read_text()
    steps = re.findall(r"== (\w+): rc=(\d+)", log)
    assert steps == [(name, "0") for name in ("bench", "cuda_tests", "stage5", "user_batches", "stage5_overhead_32",
                                              "bench_nockpt", "bench_static", "bench_compile")], log[-3000:]
    users = json.loads((out / "user_batches.json").read_text())["models"]["tiny"]
    assert users["batched"]["4"]["identical"] is True and users["batched"]["4"]["differing_predictions"] == 0
    assert re.search(r"overhead 32 items 20 \{'assembly_s': [0-9.]+, 'floor_s'", log), log[-3000:]
    stage5 = json.loads((out / "stage5.json").read_text())
    assert stage5["quick"] is True and set(STAGE5_USER_FIELDS) <= set(stage5["models"]["tiny"]["users"]["20"])
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


# bench/bench_stage5.py's per-user fields (issue 24): every part of stage 5's cost, its floor, OPPU, the tokens
STAGE5_USER_FIELDS = ("items", "examples", "mean_example_tokens", "build_s", "tokenize_s", "assembly_s",
                      "scoring_mixing_s", "floor_s", "prediction_s", "stage5_s", "batches", "tokens",
                      "assembly_over_floor", "assembly_over_floor_cpu", "scoring_mixing_share_cpu",
                      "lora_term_and_overhead_share_cpu", "build_share", "build_share_cpu", "oppu",
                      "oppu_over_assembly", "oppu_over_assembly_cpu", "oppu_user_over_perpcs_user",
                      "oppu_user_over_perpcs_user_cpu", "rss_mb_after", "cpu_s", "sampled")
STAGE5_OPPU_FIELDS = ("seconds", "cpu_seconds", "extrapolated", "steps_full", "steps_timed", "timed_s",
                      "padded_tokens_full", "padded_tokens_timed", "warmup_step", "epochs", "batch_size",
                      "grad_ckpt", "r", "target_modules")


def run_stage5_bench(tmp_path, *args) -> tuple:
    out = tmp_path / "stage5.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_stage5.py"), "--quick", "--threads", "1",
                           "--out", str(out), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=200)   # ~30 s on a loaded machine
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_stage5_bench_quick_reports_every_part(tmp_path):
    """bench/bench_stage5.py --quick: per user, every part of stage 5 measured, the floor on stage 5's own batches,
    OPPU at its published defaults, the real and padded tokens; one progress line per measurement."""
    from perpcs.method.composition import ComposeSettings
    from perpcs.stages.config import OPPUStage

    report, stdout = run_stage5_bench(tmp_path)
    assert list(report["models"]) == ["tiny"] and report["sizes"] == [10, 20]
    model = report["models"]["tiny"]
    assert model["sharers"] == report["sharers"] and model["pieces"] == 2 * 4   # 2 layers x q/k/v/o
    oppu_defaults = OPPUStage.__dataclass_fields__["train"].default_factory()
    batch = ComposeSettings().batch_size
    for n in report["sizes"]:
        row = model["users"][str(n)]
        assert set(STAGE5_USER_FIELDS) <= set(row), set(STAGE5_USER_FIELDS) - set(row)
        assert row["items"] == n and row["examples"] == 2 * n - 1   # each item, and again with its history after 1
        for key in ("build_s", "tokenize_s", "assembly_s", "floor_s", "prediction_s", "scoring_mixing_s"):
            assert row[key] > 0, key
        assert row["stage5_s"] == pytest.approx(row["build_s"] + row["tokenize_s"] + row["assembly_s"]
                                                + row["prediction_s"])
        assert row["scoring_mixing_hook"] == "Composer._summary + Composer._decide"
        # one scoring per piece per forward: the composer saw every batch of the user
        assert row["scoring_mixing_calls"] == model["pieces"] * row["batches"]
        assert row["batches"] == -(-row["examples"] // batch) and row["sampled"] is None
        tokens = row["tokens"]
        assert tokens["padded"] >= tokens["real"] >= row["examples"] and tokens["padded_over_real"] >= 1
        assert tokens["real"] == pytest.approx(row["examples"] * row["mean_example_tokens"])
        oppu = row["oppu"]
        assert set(STAGE5_OPPU_FIELDS) <= set(oppu)
        assert (oppu["epochs"], oppu["batch_size"], oppu["grad_ckpt"]) == (oppu_defaults.epochs,
                                                                           oppu_defaults.batch_size, True)
        assert oppu["steps_full"] == oppu_defaults.epochs * -(-row["examples"] // oppu_defaults.batch_size)
        assert oppu["extrapolated"] and oppu["steps_timed"] == report["oppu_steps_timed"] == 1
        assert oppu["padded_tokens_full"] > oppu["padded_tokens_timed"] > 0
        assert oppu["seconds"] == pytest.approx(oppu["timed_s"] * oppu["padded_tokens_full"]
                                                / oppu["padded_tokens_timed"])
        assert row["oppu_over_assembly"] == pytest.approx(oppu["seconds"] / row["assembly_s"])
        assert row["rss_mb_after"] > 10
    assert stdout.count("tiny 20 items:") >= 6   # progress: a line per measurement


def test_stage5_bench_samples_batches_and_scales_by_padded_tokens(tmp_path):
    report, _ = run_stage5_bench(tmp_path, "--max_batches", "1", "--sizes", "30")
    row = report["models"]["tiny"]["users"]["30"]
    sampled = row["sampled"]
    assert sampled["examples"] == 16 and sampled["batches"] == 1   # one batch of stage 5's size
    assert row["tokens"]["real"] == pytest.approx(row["examples"] * row["mean_example_tokens"])
    assert sampled["scale"] == pytest.approx(row["tokens"]["padded"] / sampled["padded"])
    assert row["assembly_s"] == pytest.approx(sampled["assembly_s"] * sampled["scale"])
    assert row["floor_s"] == pytest.approx(sampled["floor_s"] * sampled["scale"])
