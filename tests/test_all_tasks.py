"""Every one of the seven tasks through stage 1, the sharer stages and stage 5 on the tiny model, scored by
eval_task (the published code crashed on three of its six tasks)."""
import json

import pytest

import lora_composition
import task_LoRA
import train_anchor_gate
import train_anchor_PEFT
from perpcs.evaluation.metrics import evaluate_files
from perpcs.data.tasks import TASKS, get_task
from pipeline_fixture import DEVICE, one_thread, sample_layout  # noqa: F401  (one_thread: a fixture)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_runs_end_to_end(name, tiny_model_dir, tmp_path):
    task = get_task(name)
    layout = sample_layout(name, tmp_path, n_users=10, n_history=4, n_queries=1, n_test=2)
    candidates = layout.load_split("candidate")
    (tmp_path / "idx.json").write_text(json.dumps({
        "task": name, "strategy": "most_active", "k": 2, "seed": 0, "indices": [0, 1],
        "user_ids": [candidates[0]["user_id"], candidates[1]["user_id"]], "clusters": None}))
    common = ["--task_name", name, "--llama_model_path", str(tiny_model_dir), "--device", DEVICE,
              "--data_dir", str(tmp_path / "data"), "--max_seq_len", "256"]
    gen = ["--k_list", "1", "--temperature", "0", "--max_gen_len", "3"]
    out = tmp_path / "out"
    task_LoRA.main(common + gen + ["--max_step", "1", "--output_dir", str(out / "task")])
    sharer = common + ["--lora_ckpt", str(out / "task"), "--anchor_idx_path", str(tmp_path / "idx.json"),
                       "--max_step", "1"]
    train_anchor_PEFT.main(sharer + ["--output_dir", str(out / "peft")])
    train_anchor_gate.main(sharer + ["--anchor_path", str(out / "peft"), "--output_dir", str(out / "gate")])
    lora_composition.main(common + gen + ["--lora_ckpt", str(out / "task"), "--anchor_idx_path",
                                          str(tmp_path / "idx.json"), "--anchor_path", str(out / "peft"),
                                          "--gate_path", str(out / "gate"), "--topk", "1",
                                          "--output_dir", str(out / "compose")])
    for method in ("task", "compose"):
        for stem in ("kNP", "k1", "kNP-profile", "k1-profile"):
            scores = evaluate_files(layout.golds, out / method / "predictions" / f"{stem}.json", name)
            assert set(scores) == {"classification": {"accuracy", "f1"}, "regression": {"MAE", "RMSE"},
                                   "generation": {"rouge-1", "rouge-L"}}[task.metric]
