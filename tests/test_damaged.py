"""Damaged files named (issue 21): a truncated or unreadable safetensors file, gates that do not fit their sharer
LoRA, JSON that does not parse: each stage stops with one ``error: <file>: ...`` line, exit 2, before writing;
staging a kill left behind is removed by the next run (its own shard's users only); a resumed user's training rows
replace those of its killed attempt in train_log.jsonl."""
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_composition
import OPPU
import task_LoRA
import train_anchor_gate
from pipeline_fixture import TASK, cli_error, one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import run_stage as run


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def damaged_sharer(pipe, tmp_path, damage) -> tuple:
    """A copy of the sharer LoRAs with one sharer's file damaged; (copy, damaged file)."""
    anchors = Path(shutil.copytree(pipe.anchor_peft, tmp_path / "anchor_PEFT"))
    path, change = damage(anchors / f"user_{pipe.sharer_ids()[1]}")
    change(path)
    return anchors, path


def truncated_weights(adapter_dir: Path) -> tuple:
    return adapter_dir / "adapter_model.safetensors", truncate


def malformed_config(adapter_dir: Path) -> tuple:
    return adapter_dir / "adapter_config.json", lambda p: p.write_text(p.read_text()[:-20])


@pytest.mark.parametrize("damage", [truncated_weights, malformed_config])
@pytest.mark.parametrize("stage", ["gates", "composition"])
def test_a_damaged_sharer_lora_is_named_before_anything_is_written(stage, damage, pipe, tmp_path, capsys):
    anchors, path = damaged_sharer(pipe, tmp_path, damage)
    out = tmp_path / "out"
    if stage == "gates":
        err = cli_error(train_anchor_gate.main, pipe.gate_args(out, anchor_path=anchors), capsys)
    else:
        err = cli_error(lora_composition.main, pipe.compose_args(out, anchor_path=anchors), capsys)
    assert err.startswith(f"error: {path}: ")
    assert not out.exists()


def gates_copy(pipe, tmp_path) -> tuple:
    gates = Path(shutil.copytree(pipe.anchor_gate, tmp_path / "sharer_gates"))
    return gates, gates / f"user_{pipe.sharer_ids()[2]}" / "gates.safetensors"


def test_truncated_gates_are_named(pipe, tmp_path, capsys):
    gates, path = gates_copy(pipe, tmp_path)
    truncate(path)
    err = cli_error(lora_composition.main, pipe.compose_args(tmp_path / "out", gate_path=gates), capsys)
    assert err.startswith(f"error: {path}: not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def _shorter(gates: dict, piece: str) -> dict:
    return {**gates, piece: gates[piece][:-1].clone()}


def _renamed(gates: dict, piece: str) -> dict:
    return {**{k: v for k, v in gates.items() if k != piece}, piece.replace("q_proj", "x_proj"): gates[piece]}


def _extra(gates: dict, piece: str) -> dict:
    return {**gates, piece.replace("q_proj", "x_proj"): gates[piece].clone()}


@pytest.mark.parametrize("change, says", [(_shorter, "input is"), (_renamed, "miss 1 pieces"),
                                          (_extra, "its LoRA does not have")])
def test_gates_that_do_not_fit_their_sharer_lora_are_named(change, says, pipe, tmp_path, capsys):
    """Each gate vector is as long as its LoRA module's input (lora_A's d_in); its pieces are the LoRA's."""
    gates, path = gates_copy(pipe, tmp_path)
    tensors = load_file(str(path))
    piece = next(k for k in tensors if "q_proj" in k)
    save_file(change(tensors, piece), str(path))
    err = cli_error(lora_composition.main, pipe.compose_args(tmp_path / "out", gate_path=gates), capsys)
    assert err.startswith(f"error: {path}: ") and says in err
    assert not (tmp_path / "out").exists()


def test_a_malformed_gates_source_json_is_named(pipe, tmp_path, capsys):
    gates, path = gates_copy(pipe, tmp_path)
    source = path.parent / "source.json"
    source.write_text("{")
    err = cli_error(train_anchor_gate.main, pipe.gate_args(gates), capsys)
    assert err.startswith(f"error: {source}: not valid JSON")


def test_a_truncated_task_lora_is_named_on_resume(pipe, tmp_path, capsys):
    out = Path(shutil.copytree(pipe.task_lora, tmp_path / "task"))
    truncate(out / "adapter_model.safetensors")
    before = sorted(p.name for p in out.iterdir())
    err = cli_error(task_LoRA.main, pipe.task_lora_args(out), capsys)
    assert err.startswith(f"error: {out / 'adapter_model.safetensors'}: ")
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.fixture(scope="module")
def oppu_run(pipe, tmp_path_factory):
    """OPPU of the shared pipeline, uninterrupted (its adapters reloaded on resume)."""
    from perpcs.errors import run_cli
    out = tmp_path_factory.mktemp("oppu") / "OPPU"
    run_cli(lambda: OPPU.main(pipe.oppu_args(out)))
    return out


def oppu_killed_after_saving(pipe, oppu_run, tmp_path) -> tuple:
    """An OPPU output dir as a kill between saving the first user's adapter and its predictions leaves it."""
    out = Path(shutil.copytree(oppu_run, tmp_path / "OPPU"))
    uid = pipe.test_ids()[0]
    (out / "user_predictions" / f"user_{uid}.json").unlink()
    shutil.rmtree(out / "predictions")
    return out, out / "adapters" / f"user_{uid}"


@pytest.mark.parametrize("name, says", [("adapter_model.safetensors", "not a readable safetensors file"),
                                        ("source.json", "not valid JSON")])
def test_a_damaged_oppu_adapter_is_named_on_resume(name, says, pipe, oppu_run, tmp_path, capsys):
    out, adapter = oppu_killed_after_saving(pipe, oppu_run, tmp_path)
    truncate(adapter / name)
    err = cli_error(OPPU.main, pipe.oppu_args(out), capsys)
    assert err.startswith(f"error: {adapter / name}: {says}")


def test_export_names_a_truncated_adapter_and_writes_nothing(pipe, tmp_path, capsys):
    from perpcs.__main__ import main
    root = tmp_path / "out"
    for src, rel in ((pipe.task_lora, "task-base_LLM"), (pipe.anchor_peft, "Anchor_PEFT/LoRA")):
        shutil.copytree(src, root / rel)
    path = root / "Anchor_PEFT" / "LoRA" / f"user_{pipe.sharer_ids()[0]}" / "adapter_model.safetensors"
    truncate(path)
    err = cli_error(lambda argv: main(["export", *map(str, argv)]),
                    ["--task_name", TASK, "--output_dir", tmp_path / "d", "--output_root", root,
                     "--llama_model_path", pipe.model], capsys)
    assert err.startswith(f"error: {path}: ")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------- orphaned staging

def test_only_the_shards_own_orphaned_staging_is_removed(tmp_path, capsys):
    """Shards share the output folders: a process removes the staging of its own users only (another shard may be
    writing its user's right now), in the stage's folders only, and says how many it removed."""
    from perpcs.stages.common import run_per_user, staging_dirs
    users = [(str(u), {}) for u in (1, 2, 3, 12)]   # shard 0 of 2: users 1 and 3
    planted = {"mine": [tmp_path / ".user_1.k3j_x9.tmp", tmp_path / "adapters" / ".user_3.abc.tmp",
                        tmp_path / "user_predictions" / ".user_1.json.q1w2.tmp",
                        tmp_path / "recipes" / ".user_3.json.zz.tmp", tmp_path / "gate_scores" / ".user_1.json.a.tmp"],
               "kept": [tmp_path / ".user_2.k3j_x9.tmp", tmp_path / "adapters" / ".user_12.abc.tmp",
                        tmp_path / "user_predictions" / ".user_12.json.q1w2.tmp", tmp_path / "user_1",
                        tmp_path / "other" / ".user_1.abc.tmp", tmp_path / ".summary.json.ab.tmp"]}
    for path in planted["mine"] + planted["kept"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".json.q1w2.tmp") or path.name.startswith(".summary"):
            path.write_text('{"half')
        else:
            path.mkdir()
            (path / "adapter_model.safetensors").write_bytes(b"\0")
    result = run_per_user(users, lambda uid: True, None, "test stage", None, 2, 0, staging=staging_dirs(tmp_path))
    assert result == {"done": [], "skipped": ["1", "3"]}
    assert [p for p in planted["mine"] if p.exists()] == []
    assert all(p.exists() for p in planted["kept"])
    assert "test stage: removed 5 unfinished staging left by an interrupted run" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- train_log.jsonl

def test_a_retrained_user_leaves_one_set_of_rows_in_the_train_log(tiny_model_dir, tmp_path):
    """What a kill during a user's training, then the resume, does to train_log.jsonl: the killed attempt's rows
    (one torn in half) are replaced by the new attempt's; other users' rows (other shards') stay."""
    from peft import get_peft_model

    from perpcs.data.prompts import Example
    from perpcs.engine.training import TrainConfig, train
    from perpcs.models.loading import load_base_model
    from perpcs.models.lora import lora_config
    model, tok, device = load_base_model(str(tiny_model_dir), device="cpu")
    log = tmp_path / "train_log.jsonl"
    examples = [Example(f"Review: the {i} blender Score:", f" {i % 5 + 1}") for i in range(4)]
    cfg = TrainConfig(batch_size=1, max_step=3, grad_ckpt=False, max_seq_len=64)

    def train_user(desc):
        peft_model = get_peft_model(model, lora_config())
        try:
            train(peft_model, tok, examples, cfg, device, desc=desc, log_path=log, show_progress=False)
        finally:
            peft_model.unload()

    train_user("OPPU a")
    train_user("OPPU b")
    with open(log, "a") as f:   # user b's killed retry: two rows, the second torn by the kill
        f.write(json.dumps({"desc": "OPPU b", "step": 1}) + "\n" + '{"desc": "OPPU b", "st')
    train_user("OPPU b")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert Counter(r["desc"] for r in rows) == {"OPPU a": 3, "OPPU b": 3}
    assert [r["step"] for r in rows] == [1, 2, 3, 1, 2, 3]
