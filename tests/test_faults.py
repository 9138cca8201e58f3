"""The fault suite (issue 8): kill -9 and resume, a full disk, a diverging loss, bad input, safety.

Every bad-input check goes through the scripts' own entry (``run_cli(main)``: exit code 2 and one
``error: ...`` line naming the culprit); a few run as real subprocesses. Kill tests start the stage as a
process, kill it after its first user is published, and finish the same command in this process.
"""
import ast
import errno
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import lora_composition
import OPPU
import task_LoRA
import train_anchor_gate
import train_anchor_PEFT
from perpcs.errors import PerpcsError
from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import run_stage as run
from pipeline_fixture import (ROOT, TASK, adapter_digests, cli_error, file_digests, load_script, log_users, run_script,
                              script, subprocess_env)

eval_task = load_script("eval/eval_task.py")
gen_profile = load_script("data/gen_profile.py")
history_anchor = load_script("anchor_selection/history_anchor.py")




def hidden_leftovers(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob(".*"))


# =========================================================================================== kill -9

def user_outputs(stage: str, out: Path) -> dict:
    """{path: digest} of the per-user outputs a stage has published (its notion of finished users)."""
    digests = file_digests(out)
    if stage == "profiles":
        return {"profiles": json.loads(out.read_text())} if out.is_file() else {}
    keep = {"sharers": ("user_",), "gates": ("user_",), "composition": ("recipes/", "user_predictions/",
                                                                       "adapters/"),
            "oppu": ("adapters/", "user_predictions/")}[stage]
    return {k: v for k, v in digests.items() if k.startswith(keep)}   # recipes hold no timing: bytes compare


def finished_users(stage: str, out: Path, ids: list) -> list:
    if stage == "sharers":
        return [u for u in ids if (out / f"user_{u}" / "adapter_model.safetensors").is_file()]
    if stage == "gates":
        return [u for u in ids if (out / f"user_{u}" / "gates.safetensors").is_file()]
    if stage == "composition":
        return [u for u in ids if (out / "recipes" / f"user_{u}.json").is_file()
                and (out / "user_predictions" / f"user_{u}.json").is_file()]
    if stage == "oppu":
        return [u for u in ids if (out / "user_predictions" / f"user_{u}.json").is_file()]
    return list(json.loads(out.read_text())) if out.is_file() else []


def plant_decoy(stage: str, out: Path, user: str, donor: str) -> None:
    """What a kill in the middle of publishing a user leaves: a hidden staging copy that looks complete."""
    if stage in ("sharers", "gates"):
        shutil.copytree(out / f"user_{donor}", out / f".user_{user}.killed.tmp")
    elif stage == "profiles":
        (out.parent / f".{out.name}.killed.tmp").write_text('{"half": "writ')
    else:
        (out / "user_predictions" / f".user_{user}.json.killed.tmp").write_text('{"k1": [["1", "com')
        if (out / "adapters" / f"user_{donor}").is_dir():   # OPPU, composition --save_adapters
            shutil.copytree(out / "adapters" / f"user_{donor}", out / "adapters" / f".user_{user}.killed.tmp")


def train_rows(out: Path) -> Counter:
    """Rows per training (desc: one per user) in a stage's train_log.jsonl."""
    log = out / "train_log.jsonl"
    return Counter(json.loads(line)["desc"] for line in log.read_text().splitlines()) if log.is_file() else Counter()


def done_names(done: list) -> set:
    """Names a finished user's outputs go by: user_<id>/ dirs and user_<id>.json files."""
    return {f"user_{u}" for u in done} | {f"user_{u}.json" for u in done}


def stage_cases(pipe, out: Path) -> dict:
    """stage -> (script, main, argv, user ids in order); a bit more work per user than elsewhere, so a kill
    after the first user lands while the stage is still running."""
    return {
        "sharers": ("train_anchor_PEFT.py", train_anchor_PEFT.main, pipe.sharer_args(out) + ["--max_step", "6"],
                    pipe.sharer_ids()),
        "gates": ("train_anchor_gate.py", train_anchor_gate.main, pipe.gate_args(out) + ["--max_step", "6"],
                  pipe.sharer_ids()),
        # 2 users per prediction batch: the kill lands while the last user's group is still being worked on
        "composition": ("lora_composition.py", lora_composition.main,
                        pipe.compose_args(out) + ["--max_gen_len", "16", "--save_adapters", "--users_per_batch", "2"],
                        pipe.test_ids()),
        "oppu": ("OPPU.py", OPPU.main, pipe.oppu_args(out) + ["--max_step", "3", "--users_per_batch", "2"],
                 pipe.test_ids()),
        "profiles": ("data/gen_profile.py", gen_profile.main,
                     pipe.profile_args(out) + ["--max_gen_len", "8"],
                     sorted(json.loads(pipe.layout.profiles.read_text()))),
    }


def start_and_kill(script_name: str, argv: list, out: Path, stage: str, ids: list, log: Path) -> float:
    """Start the stage as a process; SIGKILL it at a random moment after its first user is published."""
    delay = random.Random().uniform(0, 0.05)
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(script(script_name)), *argv], cwd=ROOT, env=subprocess_env(),
                                stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not finished_users(stage, out, ids):
                assert proc.poll() is None, f"{script_name} ended before any user finished:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no user finished in time"
                time.sleep(0.005)
            time.sleep(delay)
            assert proc.poll() is None, f"{script_name} finished before the kill (delay {delay:.3f} s)"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None and proc.returncode is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return delay


@pytest.mark.parametrize("stage", ["sharers", "gates", "composition", "oppu", "profiles"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(stage, pipe, tmp_path, capsys):
    base_out = tmp_path / ("base.json" if stage == "profiles" else "base")
    killed_out = tmp_path / ("killed.json" if stage == "profiles" else "killed")
    _, main, base_argv, ids = stage_cases(pipe, base_out)[stage]
    script_name, _, argv, _ = stage_cases(pipe, killed_out)[stage]
    run(main, base_argv, capsys)                                   # the uninterrupted reference
    reference = user_outputs(stage, base_out)

    delay = start_and_kill(script_name, argv, killed_out, stage, ids, tmp_path / "killed.log")
    done = finished_users(stage, killed_out, ids)
    assert 1 <= len(done) < len(ids), f"kill after {delay:.3f} s left {done}"
    published = user_outputs(stage, killed_out)
    if stage == "profiles":   # every profile the killed run published is complete and already final
        assert all(reference["profiles"][u] == t for u, t in published["profiles"].items())
    else:
        assert published and all(reference[k] == v for k, v in published.items()), "a published file differs"
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in killed_out.rglob("*")
              if p.is_file() and any(part in done_names(done) for part in p.relative_to(killed_out).parts)
              } if stage != "profiles" else {}
    todo = [u for u in ids if u not in done]
    plant_decoy(stage, killed_out, todo[0], done[0])

    out = run(main, argv, capsys)                                  # the same command, to completion
    if stage == "profiles":
        assert f"{len(done)} already in" in out and f"{len(todo)} to generate" in out
        assert killed_out.read_bytes() == base_out.read_bytes()
        return
    assert f"{len(done)} already done, {len(todo)} to do" in out
    assert "unfinished staging left by an interrupted run" in out
    assert hidden_leftovers(killed_out) == []                      # the decoy and the killed user's staging
    assert train_rows(killed_out) == train_rows(base_out)          # the killed user's steps once, not twice
    logged_before_kill = [u for u in log_users(killed_out / "users_log.jsonl") if u in done]
    assert log_users(killed_out / "users_log.jsonl") == logged_before_kill + todo    # nobody redone
    assert stamps and all((p.stat().st_ino, p.stat().st_mtime_ns) == st for p, st in stamps.items())
    assert user_outputs(stage, killed_out) == reference
    if stage in ("composition", "oppu"):
        assert file_digests(killed_out / "predictions") == file_digests(base_out / "predictions")


# =========================================================================================== disk full

def chmod_blocks_writes(directory: Path) -> bool:
    """False when running as root (chmod 0o555 does not stop root from writing)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o555)
    try:
        (directory / "probe").write_text("x")
    except PermissionError:
        return True
    finally:
        os.chmod(directory, 0o755)
    (directory / "probe").unlink()
    return False


def test_disk_full_while_saving_a_sharer_adapter(pipe, tmp_path, capsys, monkeypatch):
    import peft.peft_model
    out_dir = tmp_path / "anchor_PEFT"
    first, failing, _ = pipe.sharer_ids()
    if chmod_blocks_writes(out_dir):      # a real read-only dir once the first sharer is in
        shutil.copytree(pipe.anchor_peft / f"user_{first}", out_dir / f"user_{first}")
        os.chmod(out_dir, 0o555)
    else:                                 # root: a disk that fills up while the second adapter is written
        real_save = peft.peft_model.safe_save_file

        def full_disk(tensors, filename, metadata=None):
            if f"user_{failing}" in str(filename):
                Path(filename).write_bytes(b"\0" * 64)                     # half a file, then no space
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
            return real_save(tensors, filename, metadata=metadata)

        monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    try:
        err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir), capsys)
    finally:
        os.chmod(out_dir, 0o755)
        monkeypatch.undo()
    assert str(out_dir) in err and (failing in err or f"user_{failing}" in err)
    assert "intact" in err
    assert adapter_digests(out_dir) == {k: v for k, v in adapter_digests(pipe.anchor_peft).items()
                                        if k.startswith(f"user_{first}/")}           # earlier output intact
    assert hidden_leftovers(out_dir) == []                                           # no half adapter left
    out = run(train_anchor_PEFT.main, pipe.sharer_args(out_dir), capsys)             # space freed: resume
    assert "1 already done, 2 to do" in out
    assert adapter_digests(out_dir) == adapter_digests(pipe.anchor_peft)


@pytest.mark.parametrize("users_per_batch", ["1", "3"])
def test_disk_full_while_writing_a_recipe(pipe, tmp_path, capsys, monkeypatch, users_per_batch):
    """The first user's recipe stays; one user at a time, its predictions too; users predicted together lose the
    group's predictions not written yet (the first user's: its group had not been predicted), never a file."""
    out_dir = tmp_path / "composition"
    first, failing = pipe.test_ids()[:2]
    real_replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if Path(dst).name == f"user_{failing}.json" and Path(dst).parent.name == "recipes":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    err = cli_error(lora_composition.main, pipe.compose_args(out_dir) + ["--users_per_batch", users_per_batch],
                    capsys)
    monkeypatch.undo()
    assert str(out_dir / "recipes" / f"user_{failing}.json") in err and "No space left" in err
    assert sorted(p.name for p in (out_dir / "recipes").iterdir()) == [f"user_{first}.json"]   # no temp file
    predicted = [f"user_{first}.json"] if users_per_batch == "1" else []
    assert sorted(p.name for p in (out_dir / "user_predictions").glob("*")) == predicted
    assert log_users(out_dir / "users_log.jsonl") == [first] * len(predicted)
    assert (out_dir / "recipes" / f"user_{first}.json").read_bytes() == \
        (pipe.composition / "recipes" / f"user_{first}.json").read_bytes()


# =========================================================================================== diverging loss

def test_non_finite_loss_names_user_and_step_and_writes_nothing_for_that_user(pipe, tmp_path, capsys):
    out_dir = tmp_path / "anchor_PEFT"
    first, diverging, last = pipe.sharer_ids()
    shutil.copytree(pipe.anchor_peft / f"user_{first}", out_dir / f"user_{first}")     # finished earlier
    adopt(out_dir / f"user_{first}", pipe.sharer_args(out_dir) + ["--lr", "1e30"])   # by this very command
    err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir) + ["--lr", "1e30"], capsys)
    assert f"sharer {diverging}: non-finite loss" in err and "at step 2" in err
    assert sorted(p.name for p in out_dir.iterdir() if p.name.startswith("user_")) == [f"user_{first}"]
    assert hidden_leftovers(out_dir) == []
    assert log_users(out_dir / "users_log.jsonl") == []
    assert {k: v for k, v in adapter_digests(out_dir).items() if not k.endswith("source.json")} == \
        {k: v for k, v in adapter_digests(pipe.anchor_peft).items()
         if k.startswith(f"user_{first}/") and not k.endswith("source.json")}


def adopt(adapter_dir: Path, argv: list) -> None:
    """Make a copied sharer LoRA look finished by the stage-3 command ``argv`` (its source.json records the digest
    of the run's settings: a LoRA trained with other settings is refused, not resumed)."""
    from dataclasses import asdict

    import cli_flags as cli
    from perpcs.stages.common import as_json, lora_record
    from perpcs.stages.manifest import canonical_sha256
    args = train_anchor_PEFT.parse_args([str(a) for a in argv])
    settings = {"lora": lora_record(cli.lora_settings(args)), "train": asdict(cli.train_config(args))}
    source = adapter_dir / "source.json"
    source.write_text(json.dumps({**json.loads(source.read_text()),
                                  "settings_sha256": canonical_sha256(as_json(settings))}))


# =========================================================================================== bad input

@pytest.fixture()
def data_copy(pipe, tmp_path):
    """A private copy of the data dir to break."""
    return Path(shutil.copytree(pipe.data, tmp_path / "data"))


def with_data(argv: list, data_dir: Path) -> list:
    return argv + ["--data_dir", str(data_dir)]


def edit_users(path: Path, change) -> None:
    users = json.loads(path.read_text())
    change(users)
    path.write_text(json.dumps(users, indent=1))


def test_missing_data_file_exits_2_from_the_script(pipe, tmp_path):
    proc = run_script("task_LoRA.py", with_data(pipe.task_lora_args(tmp_path / "out"), tmp_path / "nothing"),
                      check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: users file not found: {tmp_path / 'nothing' / TASK / 'test_100' / 'user_test_100.json'}"
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def gen_profile_command(data_dir: Path) -> str:
    return f"python data/gen_profile.py --task_name {TASK} --data_dir {shlex.quote(str(data_dir))}"


def test_missing_profile_file_names_the_command_that_writes_it_from_the_script(pipe, data_copy, tmp_path):
    """Step 1 as published, on a data folder that gen_profile.py has not run on yet (issue 22 item 4)."""
    (data_copy / TASK / "profile-id2text.json").unlink()
    proc = run_script("task_LoRA.py", with_data(pipe.task_lora_args(tmp_path / "out"), data_copy), check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: profile file not found: {data_copy / TASK / 'profile-id2text.json'}; write it with: "
                    f"{gen_profile_command(data_copy)}")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["sharers", "gates", "composition", "oppu", "show-prompts"])
def test_missing_profile_file_names_the_command_in_every_stage_that_reads_it(stage, pipe, data_copy, tmp_path,
                                                                            capsys):
    from perpcs.__main__ import main as perpcs_main
    (data_copy / TASK / "profile-id2text.json").unlink()
    main, argv = {"sharers": (train_anchor_PEFT.main, pipe.sharer_args(tmp_path / "out")),
                  "gates": (train_anchor_gate.main, pipe.gate_args(tmp_path / "out")),
                  "composition": (lora_composition.main, pipe.compose_args(tmp_path / "out")),
                  "oppu": (OPPU.main, pipe.oppu_args(tmp_path / "out")),
                  "show-prompts": (perpcs_main, ["show-prompts", "--task_name", TASK, "--profile"])}[stage]
    err = cli_error(main, with_data(argv, data_copy), capsys)
    assert err.startswith(f"error: profile file not found: {data_copy / TASK / 'profile-id2text.json'}")
    assert err.endswith(f"write it with: {gen_profile_command(data_copy)}")
    assert not (tmp_path / "out").exists()          # refused before any work


def test_a_user_missing_from_the_profile_file_names_the_command(pipe, data_copy, tmp_path, capsys):
    path = data_copy / TASK / "profile-id2text.json"
    uid = json.loads((data_copy / TASK / "test_100" / "user_test_100.json").read_text())[0]["user_id"]
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != str(uid)}))
    err = cli_error(OPPU.main, with_data(pipe.oppu_args(tmp_path / "out"), data_copy), capsys)
    assert f"{path}: no profile text for user #0 (user_id {str(uid)!r})" in err
    assert gen_profile_command(data_copy) in err


def test_malformed_json_names_the_line_and_column(pipe, data_copy, tmp_path, capsys):
    path = data_copy / TASK / "test_100" / "user_test_100.json"
    text = json.dumps(json.loads(path.read_text()), indent=1)
    bad = text.index('"profile": [') + len('"profile": [')
    text = text[:bad] + "," + text[bad:]            # a stray comma
    path.write_text(text)
    line, column = text[:bad].count("\n") + 1, bad - text.rfind("\n", 0, bad)
    err = cli_error(task_LoRA.main, with_data(pipe.task_lora_args(tmp_path / "out"), data_copy), capsys)
    assert f"{path}: malformed JSON at line {line}, column {column}" in err


@pytest.mark.parametrize("field", ["user_id", "profile", "query"])
def test_user_without_a_field(field, pipe, data_copy, tmp_path, capsys):
    path = data_copy / TASK / "user_anchor_candidate.json"
    edit_users(path, lambda users: users[1].pop(field))
    err = cli_error(train_anchor_PEFT.main, with_data(pipe.sharer_args(tmp_path / "out"), data_copy), capsys)
    assert f"{path}: user #1" in err and f"missing field '{field}'" in err


def test_history_item_without_the_task_field(pipe, data_copy, tmp_path, capsys):
    path = data_copy / TASK / "user_anchor_candidate.json"
    edit_users(path, lambda users: users[0]["profile"][3].pop("tag"))
    uid = json.loads(path.read_text())[0]["user_id"]
    err = cli_error(train_anchor_gate.main, with_data(pipe.gate_args(tmp_path / "out"), data_copy), capsys)
    assert f"user #0 (user_id '{uid}'): profile item #3" in err and "missing field 'tag'" in err


def test_query_without_the_task_marker(pipe, data_copy, tmp_path, capsys):
    path = data_copy / TASK / "test_100" / "user_test_100.json"
    users = json.loads(path.read_text())
    qid = users[2]["query"][0]["id"]
    edit_users(path, lambda us: us[2]["query"][0].update(input="Tag this movie: a robot learns to love."))
    err = cli_error(task_LoRA.main, with_data(pipe.task_lora_args(tmp_path / "out"), data_copy)
                    + ["--infer", "--lora_ckpt", str(pipe.task_lora)], capsys)
    assert f"query {qid}: expected the marker '] description: '" in err


def test_golds_and_predictions_with_different_ids_exit_2_from_the_script(pipe, tmp_path):
    preds = json.loads((pipe.task_lora / "predictions" / "k1.json").read_text())
    dropped = preds["golds"].pop(0)["id"]
    preds["golds"].append({"id": "not-a-query", "output": "comedy"})
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "eval_task.py"), "--golds_json", str(pipe.golds),
                           "--preds_json", str(tmp_path / "preds.json"), "--task_name", TASK],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: gold and predicted ids differ")
    assert repr(dropped) in proc.stderr and "'not-a-query'" in proc.stderr


def test_unknown_task_name(pipe, tmp_path, capsys):
    argv = pipe.sharer_args(tmp_path / "out")
    argv[argv.index(TASK)] = "LaMP_9"
    err = cli_error(train_anchor_PEFT.main, argv, capsys)
    assert "unknown task 'LaMP_9'" in err and "movie_tagging" in err


def test_model_path_that_is_neither_hf_nor_meta(pipe, tmp_path, capsys):
    model_dir = tmp_path / "not_a_model"
    model_dir.mkdir()
    (model_dir / "README.txt").write_text("weights go here")
    argv = pipe.task_lora_args(tmp_path / "out") + ["--llama_model_path", str(model_dir)]
    err = cli_error(task_LoRA.main, argv, capsys)
    assert f"{model_dir}: no model files found (it holds README.txt)" in err and "Meta download" in err


def test_tokenizer_that_does_not_match_the_model(pipe, tmp_path, capsys):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(pipe.model))
    tok.add_tokens([f"<extra_{i}>" for i in range(8)])            # 8 ids the model has no embedding for
    tok.save_pretrained(str(tmp_path / "tok"))
    argv = pipe.sharer_args(tmp_path / "out") + ["--tokenizer_path", str(tmp_path / "tok")]
    err = cli_error(train_anchor_PEFT.main, argv, capsys)
    assert f"tokenizer {tmp_path / 'tok'} has {len(tok)} tokens but model {pipe.model} has only" in err


def _rank_4(adapter_dir: Path) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["r"] = config["lora_alpha"] = 4
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file({k: (v[:4] if ".lora_A." in k else v[:, :4]).contiguous() for k, v in tensors.items()},
              str(adapter_dir / "adapter_model.safetensors"))


def _q_and_v_only(adapter_dir: Path) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj"]
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "q_proj" in k or "v_proj" in k},
              str(adapter_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("change, field", [(_rank_4, "r"), (_q_and_v_only, "target_modules")])
def test_sharer_adapter_of_another_rank_or_modules(change, field, pipe, tmp_path, capsys):
    anchors = Path(shutil.copytree(pipe.anchor_peft, tmp_path / "anchor_PEFT"))
    odd = pipe.sharer_ids()[1]
    change(anchors / f"user_{odd}")
    err = cli_error(lora_composition.main, pipe.compose_args(tmp_path / "out", anchor_path=anchors), capsys)
    assert f"sharer '{odd}' ({anchors / f'user_{odd}'}) has {field} = " in err


def test_gates_missing_for_a_sharer(pipe, tmp_path, capsys):
    gates = Path(shutil.copytree(pipe.anchor_gate, tmp_path / "sharer_gates"))
    odd = pipe.sharer_ids()[2]
    (gates / f"user_{odd}" / "gates.safetensors").unlink()
    err = cli_error(lora_composition.main, pipe.compose_args(tmp_path / "out", gate_path=gates), capsys)
    assert f"gates not found for sharer '{odd}': {gates / f'user_{odd}' / 'gates.safetensors'}" in err


def test_topk_larger_than_the_pool(pipe, tmp_path, capsys):
    err = cli_error(lora_composition.main, pipe.compose_args(tmp_path / "out") + ["--topk", "4"], capsys)
    assert "--topk 4 is larger than the sharer pool (3 sharers)" in err


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.5"])
def test_share_ratio_outside_0_1(ratio, pipe, tmp_path, capsys):
    err = cli_error(lora_composition.main, pipe.compose_args(tmp_path / "out") + ["--share_ratio", ratio], capsys)
    assert f"--share_ratio must be in (0, 1], got {float(ratio)}" in err


@pytest.mark.parametrize("stage", ["composition", "oppu"])
def test_empty_history(stage, pipe, data_copy, tmp_path, capsys):
    path = data_copy / TASK / "test_100" / "user_test_100.json"
    edit_users(path, lambda users: users[1].update(profile=[]))
    uid = json.loads(path.read_text())[1]["user_id"]
    main, argv = {"composition": (lora_composition.main, pipe.compose_args(tmp_path / "out")),
                  "oppu": (OPPU.main, pipe.oppu_args(tmp_path / "out"))}[stage]
    err = cli_error(main, with_data(argv, data_copy), capsys)
    assert f"{path}: user #1 (user_id '{uid}'): empty history" in err    # file, user index and id
    assert not (tmp_path / "out").exists()          # refused before any work


def test_fewer_candidates_than_clusters(pipe, tmp_path, capsys, monkeypatch):
    candidates = pipe.layout.candidate_users
    monkeypatch.setattr(sys, "argv", ["history_anchor.py", "--task_name", TASK, "--candidate_path", str(candidates),
                                      "--output_dir", str(tmp_path / "anchor"), "--k", "10",
                                      "--encoder", str(pipe.model)])
    err = cli_error(lambda argv: history_anchor.main(), [], capsys)
    assert f"{candidates}: 5 candidates, fewer than the 10 clusters asked for (--k 10)" in err


# =========================================================================================== safety

SOURCE_DIRS = ["perpcs", "anchor_selection", "data", "eval", "bench", "scripts"]


def project_sources() -> list:
    files = sorted(ROOT.glob("*.py"))
    for d in SOURCE_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return [f for f in files if ".venv" not in f.parts]


def unsafe_calls(path: Path) -> list:
    """pickle imports, torch.load without weights_only=True, torch.save, trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        where = f"{path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") for n in names):
                found.append(f"{where}: imports a pickle module")
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and name == "load":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            if owner == "torch" and name == "save":
                found.append(f"{where}: torch.save writes a pickle")
            flag = kwargs.get("trust_remote_code")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"{where}: trust_remote_code not False")
    return found


def test_the_scanner_catches_unsafe_code(tmp_path):
    bad = tmp_path / "unsafe.py"
    bad.write_text("import pickle\nimport torch\nx = torch.load('f')\ny = torch.load('f', weights_only=False)\n"
                   "torch.save(x, 'f')\nAutoModel.from_pretrained('m', trust_remote_code=True)\n"
                   "z = torch.load('f', weights_only=True)\n")
    assert len(unsafe_calls(bad)) == 5


def test_no_pickle_no_unsafe_torch_load_no_remote_code():
    sources = project_sources()
    assert len(sources) > 20 and ROOT / "perpcs" / "models" / "meta.py" in sources
    problems = [p for f in sources for p in unsafe_calls(f)]
    assert problems == []
    for f in sources:     # plain text too: no pickle use through getattr or strings
        text = f.read_text(encoding="utf-8")
        assert "pickle.load" not in text and "trust_remote_code=True" not in text, f


def test_a_stage_runs_with_networking_disabled(pipe, tmp_path, capsys, monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError(errno.ENETUNREACH, "networking is disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    out_dir = tmp_path / "composition"
    run(lora_composition.main, pipe.compose_args(out_dir), capsys)
    assert attempts == []
    assert file_digests(out_dir / "predictions") == file_digests(pipe.composition / "predictions")


def test_rerun_with_other_composition_settings_refuses_to_reuse_old_recipes(pipe, tmp_path, capsys):
    """A sweep into one output dir (--topk 2, then --topk 1) must not report the --topk 2 recipes as --topk 1."""
    out_dir = tmp_path / "composition"
    shutil.copytree(pipe.composition, out_dir)
    before = adapter_digests(out_dir)
    err = cli_error(lora_composition.main, pipe.compose_args(out_dir) + ["--topk", "1"], capsys)
    assert "settings.compose.topk 2 -> 1" in err and "--overwrite" in err and "run_manifest.json" in err
    assert adapter_digests(out_dir) == before                                 # nothing touched
    (out_dir / "run_manifest.json").unlink()      # per-user outputs without their folder's record: checked one by one
    err = cli_error(lora_composition.main, pipe.compose_args(out_dir) + ["--topk", "1"], capsys)
    assert "topk 2 -> 1" in err and "--overwrite" in err and "recipes" in err
    assert adapter_digests(out_dir) == before


@pytest.mark.parametrize("flags", [["--k_list", "1", "2", "2"], ["--k_list", "0", "1"], ["--temperature", "-1"]])
def test_generation_flags_that_would_write_clashing_files_are_refused(flags, capsys):
    """--k_list 1 2 2 wrote every k2 prediction twice (eval then refused the ids); k0 duplicated kNP. (Refused while
    parsing, with the library's error: exit 2 under run_cli, like every numeric flag, tests/test_flags.py.)"""
    assert flags[0] in cli_error(lora_composition.parse_args, ["--task_name", TASK] + flags, capsys)


@pytest.mark.parametrize("stage", ["sharers", "gates", "composition", "oppu"])
def test_a_rerun_with_every_user_done_loads_no_model(stage, pipe, tmp_path, capsys, monkeypatch):
    """Resuming a finished stage (scripts/run_task.sh and the ablation call every stage again) must cost
    seconds, not a model load; the combined files are rewritten from the per-user ones."""
    if stage == "oppu":
        out_dir = tmp_path / "oppu"
        run(OPPU.main, pipe.oppu_args(out_dir), capsys)
        main, args = OPPU.main, pipe.oppu_args(out_dir)
    else:
        source = {"sharers": pipe.anchor_peft, "gates": pipe.anchor_gate, "composition": pipe.composition}[stage]
        out_dir = tmp_path / stage
        shutil.copytree(source, out_dir)
        main, args = {"sharers": (train_anchor_PEFT.main, pipe.sharer_args(out_dir)),
                      "gates": (train_anchor_gate.main, pipe.gate_args(out_dir)),
                      "composition": (lora_composition.main, pipe.compose_args(out_dir))}[stage]

    def no_model(*a, **k):
        raise AssertionError("loaded the model with nothing to do")

    for stage_module in ("common", "oppu", "lora_composition"):
        monkeypatch.setattr(f"perpcs.stages.{stage_module}.load_merged_base", no_model)
    before = adapter_digests(out_dir)
    combined = file_digests(out_dir / "predictions") if (out_dir / "predictions").is_dir() else None
    if combined:
        shutil.rmtree(out_dir / "predictions")
    out = run(main, args, capsys)
    assert "0 to do" in out and adapter_digests(out_dir) == before
    if combined:                                       # rebuilt from the per-user files, without a model
        assert file_digests(out_dir / "predictions") == combined


def test_rerun_with_other_generation_settings_refuses_old_predictions(pipe, tmp_path, capsys):
    out_dir = tmp_path / "composition"
    shutil.copytree(pipe.composition, out_dir)
    err = cli_error(lora_composition.main, pipe.compose_args(out_dir) + ["--max_gen_len", "6"], capsys)
    assert "settings.generation.max_gen_len 4 -> 6" in err and "--overwrite" in err
    (out_dir / "run_manifest.json").unlink()      # per-user outputs without their folder's record: checked one by one
    err = cli_error(lora_composition.main, pipe.compose_args(out_dir) + ["--max_gen_len", "6"], capsys)
    assert "max_gen_len 4 -> 6" in err and "user_predictions" in err and "--overwrite" in err


def test_combining_per_user_files_of_other_k_lists_is_refused(pipe, tmp_path, capsys):
    """Two users predicted with --k_list 1 and one with --k_list 1 2 (an older file without settings): the
    combined k2.json would cover one user only."""
    from perpcs.stages.target_users import combine_user_predictions
    from perpcs.data.layout import Layout
    from perpcs.data.tasks import get_task
    out_dir = tmp_path / "composition"
    shutil.copytree(pipe.composition, out_dir)
    first = out_dir / "user_predictions" / f"user_{pipe.test_ids()[0]}.json"
    data = json.loads(first.read_text())
    data["predictions"]["k2"] = data["predictions"]["k1"]
    first.write_text(json.dumps(data["predictions"]))           # the older format: variants only
    users = Layout(pipe.data, get_task(TASK)).load_split("test")
    with pytest.raises(PerpcsError, match="other --k_list"):
        combine_user_predictions(out_dir, get_task(TASK), users)


def test_a_read_only_output_dir_is_named_and_nothing_is_lost(pipe, tmp_path, capsys, monkeypatch):
    """Root ignores chmod here, so a read-only filesystem is simulated where the stage first writes."""
    import tempfile

    import perpcs.atomic
    out_dir = tmp_path / "anchor_PEFT"
    first = pipe.sharer_ids()[0]
    shutil.copytree(pipe.anchor_peft / f"user_{first}", out_dir / f"user_{first}")
    before = adapter_digests(out_dir)
    real_mkdtemp = tempfile.mkdtemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out_dir:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(perpcs.atomic.tempfile, "mkdtemp", read_only)
    err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir), capsys)
    assert f"cannot write into {out_dir}" in err and "Read-only file system" in err
    assert adapter_digests(out_dir) == before


def test_gates_of_a_retrained_sharer_lora_are_refused_until_overwrite(pipe, tmp_path, capsys):
    """Stage 3 rerun with --overwrite (other flags) changes a sharer's LoRA: stage 4 on the old gates' folder is
    refused naming that sharer (nothing silently redone); --overwrite trains every gate again, the unchanged
    sharers' to the same bytes."""
    peft_dir, gate_dir = tmp_path / "anchor_PEFT", tmp_path / "sharer_gates"
    shutil.copytree(pipe.anchor_peft, peft_dir)
    shutil.copytree(pipe.anchor_gate, gate_dir)
    changed, *others = pipe.sharer_ids()
    weights_file = peft_dir / f"user_{changed}" / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(weights_file)).items()}, str(weights_file),
              metadata={"format": "pt"})
    before = {uid: (gate_dir / f"user_{uid}" / "gates.safetensors").read_bytes() for uid in pipe.sharer_ids()}
    err = cli_error(train_anchor_gate.main, pipe.gate_args(gate_dir, anchor_path=peft_dir), capsys)
    assert f"inputs.sharer_adapters.{changed}" in err and "--overwrite" in err
    out = run(train_anchor_gate.main, pipe.gate_args(gate_dir, anchor_path=peft_dir) + ["--overwrite"], capsys)
    assert "0 already done, 3 to do" in out
    after = {uid: (gate_dir / f"user_{uid}" / "gates.safetensors").read_bytes() for uid in pipe.sharer_ids()}
    assert after[changed] != before[changed] and all(after[u] == before[u] for u in others)
    assert "0 to do" in run(train_anchor_gate.main, pipe.gate_args(gate_dir, anchor_path=peft_dir), capsys)


def test_rerun_with_another_sharer_selection_refuses_old_recipes(pipe, tmp_path, capsys):
    out_dir = tmp_path / "composition"
    shutil.copytree(pipe.composition, out_dir)
    index = json.loads(pipe.anchor_idx.read_text())
    index.update(indices=index["indices"][:2], user_ids=index["user_ids"][:2])
    (tmp_path / "idx.json").write_text(json.dumps(index))
    argv = pipe.compose_args(out_dir) + ["--anchor_idx_path", str(tmp_path / "idx.json"), "--topk", "2"]
    err = cli_error(lora_composition.main, argv, capsys)
    assert "inputs.sharers" in err and "--overwrite" in err
    (out_dir / "run_manifest.json").unlink()      # per-user outputs without their folder's record: checked one by one
    err = cli_error(lora_composition.main, argv, capsys)
    assert "another sharer selection" in err and "--overwrite" in err
