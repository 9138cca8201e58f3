"""Real LaMP files, end to end (issue 22, item 5): LaMP_1 (citation) and LaMP_2N (news_categorize) as downloaded.

The data are real LaMP users in LaMP's download layout (``train/ dev/ test/``), read from ``../shared/lamp_real``
beside the checkout (or ``$PERPCS_LAMP_REAL``): CC BY-NC-SA 4.0, never copied into the repository (see its
SOURCES.md). Without that folder every test here is skipped, the reason printed.

Per task: data/prepare_lamp.py on the folder -> data/gen_profile.py -> stages 1-5 and OPPU on the tiny random
Llama (one step, short prompts) -> eval/eval_task.py on each method's predictions -> ``python -m perpcs
leaderboard`` (Per-Pcs, inheriting the test run's flags) for LaMP's test questions. The model is random: the
metrics' values mean nothing, their keys and the ids do.
"""
from __future__ import annotations

import json

import pytest

import lora_composition
import OPPU
import task_LoRA
import train_anchor_gate
import train_anchor_PEFT
from conftest import lamp_real_missing, require_lamp_real
from perpcs.data.layout import Layout, all_splits_users, user_id
from perpcs.data.tasks import get_task
from pipeline_fixture import DEVICE, load_script, one_thread, run_script, run_stage  # noqa: F401  (fixture)

# skipped before any fixture is built (the tiny model) when the data are absent
pytestmark = [pytest.mark.real_lamp, pytest.mark.skipif(bool(lamp_real_missing()), reason=lamp_real_missing())]

gen_profile = load_script("data/gen_profile.py")
eval_task = load_script("eval/eval_task.py")
history_anchor = load_script("anchor_selection/history_anchor.py")

# task, LaMP folder, --n_test, and what prepare must make of the folder: users per split (base, candidate, test,
# reserve) and the query ids of the test users and of the leaderboard users (LaMP's test questions)
CASES = {
    # 8 single-question users (user-based split: one question per author); the 2 longest histories are tested
    "citation": ("LaMP_1", 2, {"base": 3, "candidate": 2, "test": 2, "reserve": 1},
                 [["011"], ["002"]], [["020"], ["023"], ["021"], ["022"]]),
    # 7 questions -> 4 users: train 101-103 share a profile, so do dev 113-114; 100 and 112 stand alone
    "news_categorize": ("LaMP_2N", 2, {"base": 1, "candidate": 1, "test": 2, "reserve": 0},
                        [["101", "102", "103"], ["112"]], [["120", "121", "122", "123"]]),
}
SEQ = "256"      # above every stage's minimum for both tasks (the instruction's words + the answer)
GEN = ["--k_list", "1", "--temperature", "0", "--max_gen_len", "4"]
METHODS = {"task-base_LLM": "task LoRA", "LoRA-Composition": "Per-Pcs", "OPPU": "OPPU"}


def query_ids(users) -> list:
    return [[q["id"] for q in u["query"]] for u in users]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("task_name", sorted(CASES))
def test_real_lamp_end_to_end(task_name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    folder, n_test, counts, test_ids, board_ids = CASES[task_name]
    lamp_dir = require_lamp_real(folder)
    task = get_task(task_name)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data, out = tmp_path / "data", tmp_path / "output" / task_name

    # --- prepare: the download layout as it is, by its LaMP id
    prep = run_script("data/prepare_lamp.py", ["--task_name", folder, "--lamp_dir", lamp_dir, "--out_dir", data,
                                               "--n_test", n_test])
    layout = Layout(data, task)
    splits = {s: layout.load_split(s, need_gold=s != "leaderboard")
              for s in ("base", "candidate", "test", "reserve", "leaderboard")}
    assert {s: len(splits[s]) for s in counts} == counts, prep.stdout
    assert query_ids(splits["test"]) == test_ids
    assert query_ids(splits["leaderboard"]) == board_ids
    raw_test = [q["id"] for q in json.loads((lamp_dir / "test" / "test_questions.json").read_text())]
    assert sorted(i for ids in board_ids for i in ids) == sorted(raw_test)
    golds = {g["id"]: g["output"] for g in layout.load_golds()["golds"]}
    assert sorted(golds) == sorted(i for ids in test_ids for i in ids)
    assert set(golds.values()) <= set(task.labels)
    # every history item carries the fields the prompts read (citation: the abstract as `citation`)
    for user in all_splits_users(layout):
        assert user["profile"] and all(set(task.history_fields) <= set(it) for it in user["profile"])

    # --- profiles: the real script, tiny settings
    run_stage(gen_profile.main, ["--task_name", task_name, "--data_dir", str(data), "--model_path", str(tiny_model_dir),
                                 "--device", DEVICE, "--k", "2", "--max_gen_len", "4", "--max_seq_len", SEQ,
                                 "--batch_size", "4"], capsys)
    profiles = json.loads(layout.profiles.read_text())
    assert set(profiles) == {user_id(u) for u in all_splits_users(layout)}

    # --- stages 1-5 and OPPU
    common = ["--task_name", task_name, "--llama_model_path", str(tiny_model_dir), "--device", DEVICE,
              "--data_dir", str(data), "--max_seq_len", SEQ]
    task_lora, anchor = out / "task-base_LLM", out / "anchor" / "anchor_user_idx.json"
    sharers, gates = out / "Anchor_PEFT" / "LoRA", out / "Anchor_PEFT" / "gate"
    run_stage(task_LoRA.main, common + ["--output_dir", str(task_lora), "--max_step", "1", *GEN], capsys)
    run_stage(history_anchor.main, ["--task_name", task_name, "--candidate_path", str(layout.candidate_users),
                                    "--output_dir", str(anchor.parent), "--k", "1", "--strategy", "most_active",
                                    "--min_history", "1"], capsys)
    assert len(json.loads(anchor.read_text())["user_ids"]) == 1
    sharer_flags = ["--lora_ckpt", str(task_lora), "--anchor_idx_path", str(anchor), "--max_step", "1"]
    run_stage(train_anchor_PEFT.main, common + sharer_flags + ["--output_dir", str(sharers)], capsys)
    run_stage(train_anchor_gate.main, common + sharer_flags + ["--anchor_path", str(sharers),
                                                               "--output_dir", str(gates)], capsys)
    run_stage(lora_composition.main, common + ["--lora_ckpt", str(task_lora), "--anchor_idx_path", str(anchor),
                                               "--anchor_dir", str(sharers), "--gate_dir", str(gates),
                                               "--output_dir", str(out / "LoRA-Composition"), "--topk", "1",
                                               *GEN], capsys)
    run_stage(OPPU.main, common + ["--lora_ckpt", str(task_lora), "--output_dir", str(out / "OPPU"),
                                   "--max_step", "1", *GEN], capsys)

    # --- every test query predicted by every method, and scored
    for method in METHODS:
        preds_path = out / method / "predictions" / "k1-profile.json"
        preds = json.loads(preds_path.read_text())
        assert preds["task"] == task.lamp_id
        assert sorted(p["id"] for p in preds["golds"]) == sorted(golds), method
        assert all(isinstance(p["output"], str) for p in preds["golds"])
        # a random model may write nothing: --allow_empty only then (the refusal is tested in test_pipeline)
        empty = not any(p["output"].strip() for p in preds["golds"])
        metrics = eval_task.main(["--task_name", task.lamp_id, "--data_dir", str(data), "--preds_json",
                                  str(preds_path), "--output_file", str(tmp_path / f"{method}.json")]
                                 + (["--allow_empty"] if empty else []))
        assert set(metrics) == {"accuracy", "f1"} and all(0 <= v <= 1 for v in metrics.values()), method
        assert json.loads((tmp_path / f"{method}.json").read_text()) == metrics

    # --- the leaderboard file for LaMP's test questions: Per-Pcs with the test run's flags (from its manifest)
    from perpcs.__main__ import main as perpcs_main
    monkeypatch.chdir(tmp_path)
    perpcs_main(["leaderboard", "--task_name", task_name, "--method", "per-pcs", "--variant", "k1-profile",
                 "--data_dir", str(data), "--output_root", str(out)])
    board = json.loads((out / "leaderboard" / "per-pcs-k1-profile" / f"{task.lamp_id.rstrip('MN')}.json")
                       .read_text())
    assert board["task"] == task.lamp_id.rstrip("MN")
    assert [e["id"] for e in board["golds"]] == [i for ids in board_ids for i in ids]
    assert sorted(e["id"] for e in board["golds"]) == sorted(raw_test)
    assert all(set(e) == {"id", "output"} and isinstance(e["output"], str) for e in board["golds"])
