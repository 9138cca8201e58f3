"""Issue 21, items 1, 2 and 6: every stage folder holds one run, described by its run manifest.

A rerun with other settings, data or inputs is refused (exit 2, the fields named, the ways out); stage 5 refuses
gates trained on other sharer LoRAs than those in --anchor_dir; a second run on a folder in use exits 2 naming
the holder; the leaderboard run inherits the test run's settings and refuses to mix.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import lora_composition
import OPPU
import task_LoRA
import train_anchor_gate
import train_anchor_PEFT
from perpcs.stages.manifest import (MANIFEST_FILE, describe_differences, differences, folder_lock,
                                    user_data_sha256)
from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import ROOT, cli_error, file_digests, run_script, subprocess_env
from pipeline_fixture import run_stage as run


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def retrain(adapter_dir: Path) -> None:
    """What train_anchor_PEFT.py --overwrite with another seed leaves: other weights under the same name."""
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v + 0.01 for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ the manifest

def test_cpu_record_names_the_processor_its_bf16_flags_and_kernel_limits(monkeypatch):
    """What moves a bf16 CPU run's numbers (docs/reference.md "Numbers across machines") is in every manifest's
    record: the variables limiting the kernels' ISA when set (and only then), the bf16-relevant CPU flags."""
    from pathlib import Path as P

    import torch

    from perpcs.stages.manifest import CPU_KERNEL_ENV, cpu_numerics
    for key in CPU_KERNEL_ENV:
        monkeypatch.delenv(key, raising=False)
    assert cpu_numerics()["env"] == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    rec = cpu_numerics()
    assert rec["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx2"}
    assert rec["threads"] == torch.get_num_threads()
    cpuinfo = P("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
        assert rec["flags"] == [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni", "avx512f", "avx2")
                                if f in flags]
        assert rec["model"] in cpuinfo.read_text()


def test_every_stage_folder_records_settings_data_inputs_and_environment(pipe):
    import peft
    import torch
    import transformers
    sharers = pipe.sharer_ids()
    for folder, stage in ((pipe.anchor_peft, "sharer_loras"), (pipe.anchor_gate, "sharer_gates"),
                          (pipe.composition, "composition"), (pipe.task_lora, "task_lora_predictions")):
        m = manifest(folder)
        assert m["stage"] == stage and m["format"] == "perpcs-run/1"
        assert m["numerics"] == {"device_type": "cpu", "dtype": "float32"}
        rec = m["recorded"]
        assert (rec["torch"], rec["transformers"], rec["peft"]) == (torch.__version__, transformers.__version__,
                                                                 peft.__version__)
        assert rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert rec["cpu"]["threads"] == torch.get_num_threads() and rec["cpu"]["model"]
        assert rec["command"][0].endswith(".py") and "--output_dir" in rec["command"]
    assert set(manifest(pipe.anchor_peft)["data"]) == set(sharers)
    assert manifest(pipe.anchor_peft)["settings"]["train"]["max_step"] == 2
    assert set(manifest(pipe.anchor_gate)["inputs"]["sharer_adapters"]) == set(sharers)
    comp = manifest(pipe.composition)
    assert set(comp["data"]) == set(pipe.test_ids())
    assert comp["settings"]["compose"]["topk"] == 2 and comp["settings"]["max_seq_len"] == 256
    assert set(comp["inputs"]["gates"]) == set(sharers)
    # each per-user output says what it was made from
    uid = pipe.test_ids()[0]
    recipe = json.loads((pipe.composition / "recipes" / f"user_{uid}.json").read_text())
    assert recipe["inputs"]["sharer_adapters"] == comp["inputs"]["sharer_adapters"]
    assert recipe["inputs"]["gates"] == comp["inputs"]["gates"] and "history_sha256" in recipe["inputs"]
    preds = json.loads((pipe.composition / "user_predictions" / f"user_{uid}.json").read_text())
    assert preds["made_from"]["user_data_sha256"] == comp["data"][uid]
    source = json.loads((pipe.anchor_peft / f"user_{sharers[0]}" / "source.json").read_text())
    assert source["user_data_sha256"] == manifest(pipe.anchor_peft)["data"][sharers[0]]


def test_recorded_dtype_follows_cpu_bf16(pipe, tmp_path, capsys):
    out_dir = tmp_path / "gate"
    run(train_anchor_gate.main, pipe.gate_args(out_dir) + ["--cpu_bf16", "--max_step", "1"], capsys)
    assert manifest(out_dir)["numerics"] == {"device_type": "cpu", "dtype": "float32 + bfloat16 autocast"}
    err = cli_error(train_anchor_gate.main, pipe.gate_args(out_dir) + ["--max_step", "1"], capsys)
    assert "numerics.dtype" in err and "--overwrite" in err


def test_differences_name_the_leaves_and_digests_are_shortened():
    had = {"settings": {"train": {"lr": 2e-5, "seed": 0}}, "inputs": {"gates": {"u1": "a" * 64}}}
    wanted = {"settings": {"train": {"lr": 1e-3, "seed": 0}}, "inputs": {"gates": {"u1": "b" * 64}}}
    diffs = differences(had, wanted)
    assert [name for name, *_ in diffs] == ["inputs.gates.u1", "settings.train.lr"]
    text = describe_differences(diffs)
    assert "settings.train.lr 2e-05 -> 0.001" in text and "aaaaaaaaaaaa..." in text and "a" * 13 not in text


def test_user_data_digest_reads_what_a_stage_reads():
    user = {"user_id": "u1", "profile": [{"id": "1", "description": "x"}],
            "query": [{"id": "q", "input": "i", "gold": "g"}]}
    same = user_data_sha256(user, "p")
    assert user_data_sha256({**user, "query": [{"id": "q", "input": "i"}]}, "p") == same    # golds are not read
    assert user_data_sha256({**user, "profile": []}, "p") != same
    assert user_data_sha256(user, "other profile") != same
    assert user_data_sha256({**user, "query": [{"id": "q", "input": "j"}]}, "p") != same
    assert user_data_sha256({**user, "query": []}, "p", queries=False) == user_data_sha256(user, "p", queries=False)


# ------------------------------------------------------------------- finding 1: sharer LoRAs retrained after gates

def test_stage_5_refuses_gates_trained_on_other_sharer_loras(pipe, tmp_path, capsys):
    anchors = tmp_path / "LoRA"
    shutil.copytree(pipe.anchor_peft, anchors)
    changed = pipe.sharer_ids()[1]
    retrain(anchors / f"user_{changed}")
    fresh = tmp_path / "fresh"
    err = cli_error(lora_composition.main, pipe.compose_args(fresh, anchor_path=anchors), capsys)
    assert f"gates of sharer {changed}" in err and "train_anchor_gate.py --overwrite" in err
    assert str(pipe.anchor_gate / f"user_{changed}" / "source.json") in err
    assert not (fresh / "recipes").exists() and not (fresh / "user_predictions").exists()
    # a half-finished folder: the users left are not assembled from the new LoRAs beside the old ones
    half = tmp_path / "half"
    shutil.copytree(pipe.composition, half)
    last = pipe.test_ids()[-1]
    (half / "recipes" / f"user_{last}.json").unlink()
    (half / "user_predictions" / f"user_{last}.json").unlink()
    shutil.rmtree(half / "predictions")
    before = file_digests(half)
    err = cli_error(lora_composition.main, pipe.compose_args(half, anchor_path=anchors), capsys)
    assert f"gates of sharer {changed}" in err
    assert file_digests(half) == before


def test_stage_4_resume_refuses_sharer_loras_trained_again(pipe, tmp_path, capsys):
    anchors, gates = tmp_path / "LoRA", tmp_path / "gate"
    shutil.copytree(pipe.anchor_peft, anchors)
    shutil.copytree(pipe.anchor_gate, gates)
    retrain(anchors / f"user_{pipe.sharer_ids()[0]}")
    before = file_digests(gates)
    err = cli_error(train_anchor_gate.main, pipe.gate_args(gates, anchor_path=anchors), capsys)
    assert f"inputs.sharer_adapters.{pipe.sharer_ids()[0]}" in err and "--overwrite" in err
    assert file_digests(gates) == before


# -------------------------------------------------------------- finding 3: resume with other settings or data

@pytest.mark.parametrize("flags, field", [(["--lr", "1e-3"], "settings.train.lr"),
                                          (["--max_step", "3"], "settings.train.max_step"),
                                          (["--lora_r", "4"], "settings.lora.r"),
                                          (["--max_seq_len", "200"], "settings.train.max_seq_len")])
def test_stage_3_resume_with_other_settings_is_refused(pipe, tmp_path, capsys, flags, field):
    out_dir = tmp_path / "LoRA"
    shutil.copytree(pipe.anchor_peft, out_dir)
    before = file_digests(out_dir)
    err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir) + flags, capsys)
    assert field in err and "--overwrite" in err and "--output_dir" in err and str(out_dir) in err
    assert file_digests(out_dir) == before


@pytest.mark.parametrize("flags, field", [(["--lr", "1e-3"], "settings.train.lr"),
                                          (["--max_step", "3"], "settings.train.max_step"),
                                          (["--recent_k", "3"], "settings.recent_k")])
def test_stage_4_resume_with_other_settings_is_refused(pipe, tmp_path, capsys, flags, field):
    out_dir = tmp_path / "gate"
    shutil.copytree(pipe.anchor_gate, out_dir)
    err = cli_error(train_anchor_gate.main, pipe.gate_args(out_dir) + flags, capsys)
    assert field in err and "--overwrite" in err


def test_oppu_resume_with_other_settings_is_refused_and_overwrite_replaces_the_run(pipe, tmp_path, capsys):
    out_dir = tmp_path / "OPPU"
    run(OPPU.main, pipe.oppu_args(out_dir), capsys)
    before = file_digests(out_dir)
    for flags, field in ((["--max_step", "5"], "settings.train.max_step"), (["--lr", "1e-2"], "settings.train.lr"),
                         (["--lora_r", "4"], "settings.lora.r"), (["--temperature", "0.5"], "temperature")):
        err = cli_error(OPPU.main, pipe.oppu_args(out_dir) + flags, capsys)
        assert field in err, (flags, err)
    assert file_digests(out_dir) == before
    out = run(OPPU.main, pipe.oppu_args(out_dir) + ["--lora_r", "4", "--overwrite"], capsys)
    assert "replaced" in out and manifest(out_dir)["settings"]["lora"]["r"] == 4
    uid = pipe.test_ids()[0]
    assert json.loads((out_dir / "adapters" / f"user_{uid}" / "adapter_config.json").read_text())["r"] == 4


def test_stage_5_resume_after_a_history_was_cut_is_refused(pipe, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(pipe.data, data)
    users_file = data / "movie_tagging" / "test_100" / "user_test_100.json"
    users = json.loads(users_file.read_text())
    users[1]["profile"] = users[1]["profile"][:3]
    users_file.write_text(json.dumps(users))
    out_dir = tmp_path / "comp"
    shutil.copytree(pipe.composition, out_dir)
    before = file_digests(out_dir)
    err = cli_error(lora_composition.main, pipe.compose_args(out_dir) + ["--data_dir", str(data)], capsys)
    assert f"data.{users[1]['user_id']}" in err and "--overwrite" in err
    assert file_digests(out_dir) == before


def test_cosmetic_flags_may_differ_on_resume(pipe, tmp_path, capsys):
    out_dir = tmp_path / "comp"
    shutil.copytree(pipe.composition, out_dir)
    out = run(lora_composition.main, pipe.compose_args(out_dir) + ["--gen_batch_size", "2", "--save_adapters"],
              capsys)
    assert "3 already done, 0 to do" in out


def test_stage_1_does_not_reuse_a_task_lora_trained_otherwise(pipe, tmp_path, capsys):
    out_dir = tmp_path / "task"
    shutil.copytree(pipe.task_lora, out_dir)
    err = cli_error(task_LoRA.main, pipe.task_lora_args(out_dir) + ["--lr", "1e-3"], capsys)
    assert "task LoRA made from other inputs or settings" in err and "--overwrite" in err and "--infer" in err
    out = run(task_LoRA.main, pipe.task_lora_args(out_dir), capsys)   # the same settings: reused
    assert "(already trained)" in out
    assert (out_dir / "adapter_model.safetensors").read_bytes() == \
        (pipe.task_lora / "adapter_model.safetensors").read_bytes()


# ------------------------------------------------------------------------------ finding 5: one run per folder

def hold_lock(folder: Path, num_shards=1, shard_id=0) -> subprocess.Popen:
    """Another process holding the run lock of ``folder`` until killed."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from perpcs.stages.manifest import folder_lock\n"
            "with folder_lock(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])):\n"
            "    print('held', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(folder), str(num_shards), str(shard_id)],
                            stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_folder_in_use_exits_2_naming_the_holder(pipe, tmp_path, capsys):
    out_dir = tmp_path / "comp"
    first = subprocess.Popen([sys.executable, str(ROOT / "lora_composition.py"), *pipe.compose_args(out_dir)],
                             cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        holder = out_dir / "run.holder.json"
        deadline = time.time() + 60
        while not holder.is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert holder.is_file(), first.communicate()
        err = cli_error(lora_composition.main, pipe.compose_args(out_dir) + ["--topk", "1"], capsys)
        assert "in use by another run" in err and f"pid {first.pid}" in err and "lora_composition.py" in err
        out, errs = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0, errs
    assert not holder.exists()                                   # released at the end
    assert file_digests(out_dir / "recipes") == file_digests(pipe.composition / "recipes")
    assert manifest(out_dir)["settings"]["compose"]["topk"] == 2


def test_shards_of_one_run_share_a_folder_other_runs_do_not(tmp_path):
    from perpcs.errors import PerpcsError
    holder = hold_lock(tmp_path, 2, 0)
    try:
        with folder_lock(tmp_path, 2, 1):        # the other shard of the same sharded run
            pass
        for shards in ((1, 0), (2, 0), (3, 1)):  # unsharded, the same shard, another sharding
            with pytest.raises(PerpcsError, match=f"pid {holder.pid}"):
                with folder_lock(tmp_path, *shards):
                    pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path, 1, 0):            # a killed holder blocks nothing
        pass


def test_unsharded_stage_3_twice_on_one_folder(pipe, tmp_path, capsys):
    out_dir = tmp_path / "LoRA"
    holder = hold_lock(out_dir)
    try:
        err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert "in use by another run" in err
    assert not any(out_dir.glob("user_*"))


# ----------------------------------------------------------------- item 6: the leaderboard run inherits settings

def test_leaderboard_inherits_the_test_run_and_refuses_to_mix(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from test_leaderboard import MOVIE, official_layout

    from perpcs.__main__ import main
    from perpcs.atomic import write_json_atomic
    from perpcs.data.layout import Layout, all_splits_users, user_id
    from perpcs.data.prepare import prepare_lamp
    from perpcs.errors import PerpcsError
    made = official_layout(tmp_path, n_users=8, n_board=2)
    prepare_lamp("LaMP_2M", made["lamp"], tmp_path / "data", n_test=2, verbose=False)
    layout = Layout(tmp_path / "data", MOVIE)
    write_json_atomic(layout.profiles, {user_id(u): f"profile of {user_id(u)}" for u in all_splits_users(layout)})
    monkeypatch.chdir(tmp_path)
    for var, value in (("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"), ("TQDM_DISABLE", "1")):
        monkeypatch.setenv(var, value)
    stage_dir = tmp_path / "output" / "movie_tagging" / "task-base_LLM"
    with pytest.raises(PerpcsError, match="run that stage on the test split first"):
        main(["leaderboard", "--task_name", "movie_tagging", "--method", "task-lora"])
    # the test run, with settings far from the defaults
    run_script("task_LoRA.py", ["--task_name", "movie_tagging", "--llama_model_path", str(tiny_model_dir),
                                "--device", "cpu", "--max_step", "1", "--max_seq_len", "256", "--k_list", "1",
                                "--temperature", "0", "--max_gen_len", "3", "--data_dir", "data"], cwd=tmp_path)
    main(["leaderboard", "--task_name", "movie_tagging", "--method", "task-lora", "--variant", "k1"])
    board_run = manifest(stage_dir / "leaderboard")
    assert board_run["settings"] == manifest(stage_dir)["settings"]
    assert board_run["settings"]["generation"]["max_gen_len"] == 3
    assert board_run["inputs"] == manifest(stage_dir)["inputs"]
    assert set(board_run["data"]) == {user_id(u) for u in layout.load_split("leaderboard")}
    # other settings after --: run, then refused as a mix
    with pytest.raises(PerpcsError, match=r"settings.generation.max_gen_len 3 -> 5"):
        main(["leaderboard", "--task_name", "movie_tagging", "--method", "task-lora", "--variant", "k1",
              "--rerun", "--", "--max_gen_len", "5"])
