"""End to end on the tiny model: stages 1-5, OPPU and profile generation, as a user runs them (issues 3-5).

The pipeline is built once (tests/pipeline_fixture.py); a test that re-runs a stage writes into its own dir.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora_composition
import OPPU
import task_LoRA
import train_anchor_gate
import train_anchor_PEFT
from perpcs.data.layout import Layout, load_profiles, user_id
from perpcs.method.gates import GATES_FILE
from perpcs.data.prompts import history_examples
from perpcs.method.storage import format_bytes
from perpcs.data.tasks import get_task
from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import run_stage as run
from pipeline_fixture import DEVICE, ROOT, TASK, adapter_digests, file_digests, load_script, log_users
from test_composition import composed_forward

MOVIE = get_task(TASK)
VARIANTS = {"kNP", "k1", "kNP-profile", "k1-profile"}   # --k_list 1
MODULES = {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}


eval_task = load_script("eval/eval_task.py")
gen_profile = load_script("data/gen_profile.py")




def gold_ids(pipe) -> list:
    return sorted(g["id"] for g in json.loads(pipe.golds.read_text())["golds"])


def check_predictions(pipe, pred_dir, capsys) -> None:
    """The 4 variant files exist, hold exactly the golds' ids, and eval_task.py scores each."""
    assert {p.stem for p in pred_dir.glob("*.json")} == VARIANTS
    for stem in sorted(VARIANTS):
        preds = json.loads((pred_dir / f"{stem}.json").read_text())
        assert preds["task"] == MOVIE.lamp_id
        assert sorted(g["id"] for g in preds["golds"]) == gold_ids(pipe)
        out = run(eval_task.main, ["--golds_json", str(pipe.golds), "--preds_json", str(pred_dir / f"{stem}.json"),
                                   "--task_name", TASK], capsys)
        metrics = json.loads(out[:out.rindex("}") + 1])
        assert set(metrics) == {"accuracy", "f1"} and 0 <= metrics["accuracy"] <= 1


# ------------------------------------------------------------------------------------------- stage 1

def test_stage1_writes_a_peft_adapter_and_four_prediction_files(pipe, capsys):
    from peft import PeftModel

    from perpcs.models.loading import load_base_model
    model, _, _ = load_base_model(str(pipe.model), device="cpu")
    peft_model = PeftModel.from_pretrained(model, str(pipe.task_lora))
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert {n.split(".lora_B")[0].removeprefix("base_model.model.") for n in lora_b} == MODULES
    assert all(p.abs().sum() > 0 for p in lora_b.values())      # trained away from the zero init
    assert "2 steps" in pipe.logs["task_lora"] and "14 queries of 7 base users" in pipe.logs["task_lora"]
    check_predictions(pipe, pipe.task_lora / "predictions", capsys)


def test_eval_task_script_exits_0_on_stage1_predictions(pipe, tmp_path):
    out_file = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "eval_task.py"), "--golds_json", str(pipe.golds),
                           "--preds_json", str(pipe.task_lora / "predictions" / "k1-profile.json"),
                           "--task_name", MOVIE.lamp_id, "--output_file", str(out_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(out_file.read_text())) == {"accuracy", "f1"}


def test_stage1_infer_reloads_the_adapter_from_the_seed_spelling_without_training(pipe, tmp_path, capsys):
    out_dir = tmp_path / "infer"
    out = run(task_LoRA.main, pipe.task_lora_args(out_dir) + ["--infer", "--lora_ckpt",
                                                              str(pipe.task_lora / "lora_ckpt.pt")], capsys)
    assert f"loading the task LoRA from {pipe.task_lora}" in out and "training" not in out
    assert not (out_dir / "adapter_model.safetensors").exists() and not (out_dir / "train_log.jsonl").exists()
    # greedy decoding with the same adapter: the very same predictions
    assert file_digests(out_dir / "predictions") == file_digests(pipe.task_lora / "predictions")


# ------------------------------------------------------------------------------------------- stage 3

def test_stage3_trains_only_lora_weights_on_an_untouched_merged_base(pipe, tmp_path, capsys, monkeypatch):
    from peft import get_peft_model
    from transformers import set_seed

    import cli_flags
    import perpcs.stages.common as stage_common
    from perpcs.engine.training import user_seed
    from perpcs.models.lora import lora_config

    loaded = {}
    original = stage_common.load_merged_base

    def capture(args):
        loaded["model"], tokenizer, device = original(args)
        return loaded["model"], tokenizer, device

    monkeypatch.setattr(stage_common, "load_merged_base", capture)
    argv = pipe.sharer_args(tmp_path / "anchor_PEFT")
    run(train_anchor_PEFT.main, argv, capsys)
    monkeypatch.undo()

    # the process's merged base after training 3 sharers equals a freshly merged one: LoRAs were unloaded
    fresh, _, _ = original(cli_flags.stage_inputs(train_anchor_PEFT.parse_args(argv)))
    after, before = loaded["model"].state_dict(), fresh.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)

    for uid in pipe.sharer_ids():
        tensors = load_file(str(tmp_path / "anchor_PEFT" / f"user_{uid}" / "adapter_model.safetensors"))
        assert {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors} == MODULES
        assert all(".lora_A." in k or ".lora_B." in k for k in tensors)           # LoRA weights only
        set_seed(user_seed(0, uid))                                                # the user's own init
        peft_model = get_peft_model(fresh, lora_config())
        init = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n}
        fresh = peft_model.unload()
        for key, value in tensors.items():
            if ".lora_B." in key:
                assert value.abs().sum() > 0, key                                  # B started at zero
            else:
                init_a = init[key.replace(".lora_A.weight", ".lora_A.default.weight")]
                assert not torch.equal(value, init_a) and (value - init_a).abs().max() < 1e-2, key
    # in-process and repeated runs are deterministic: the same bytes as the fixture's run
    assert adapter_digests(tmp_path / "anchor_PEFT") == adapter_digests(pipe.anchor_peft)


def test_stage3_rerun_skips_finished_users_and_overwrite_redoes_them(pipe, tmp_path, capsys):
    out_dir = tmp_path / "anchor_PEFT"
    shutil.copytree(pipe.anchor_peft, out_dir)
    before = {p: p.stat().st_mtime_ns for p in out_dir.glob("user_*/*")}
    out = run(train_anchor_PEFT.main, pipe.sharer_args(out_dir), capsys)
    assert "3 already done, 0 to do" in out
    assert {p: p.stat().st_mtime_ns for p in out_dir.glob("user_*/*")} == before
    assert len(log_users(out_dir / "users_log.jsonl")) == 3                  # the copied log, nothing added

    out = run(train_anchor_PEFT.main, pipe.sharer_args(out_dir) + ["--overwrite"], capsys)
    assert "0 already done, 3 to do" in out
    assert log_users(out_dir / "users_log.jsonl")[3:] == pipe.sharer_ids()
    assert adapter_digests(out_dir) == adapter_digests(pipe.anchor_peft)     # redone, same seeds, same bytes


def test_stage3_restart_after_losing_a_user_equals_an_uninterrupted_run(pipe, tmp_path, capsys):
    out_dir = tmp_path / "anchor_PEFT"
    shutil.copytree(pipe.anchor_peft, out_dir)
    lost = pipe.sharer_ids()[1]
    shutil.rmtree(out_dir / f"user_{lost}")         # as if killed while training the second sharer
    (out_dir / f".user_{lost}.x.tmp").mkdir()       # with its staging dir left behind
    (out_dir / f".user_{lost}.x.tmp" / "adapter_model.safetensors").write_bytes(b"partial")
    out = run(train_anchor_PEFT.main, pipe.sharer_args(out_dir), capsys)
    assert "2 already done, 1 to do" in out
    assert log_users(out_dir / "users_log.jsonl")[3:] == [lost]
    assert adapter_digests(out_dir) == adapter_digests(pipe.anchor_peft)


def test_stage3_and_stage4_two_shards_equal_one_run(pipe, tmp_path, capsys):
    peft_dir, gate_dir = tmp_path / "anchor_PEFT", tmp_path / "sharer_gates"
    done = []
    for shard in (0, 1):
        out = run(train_anchor_PEFT.main, pipe.sharer_args(peft_dir) + ["--num_shards", "2", "--shard_id",
                                                                         str(shard)], capsys)
        done.append(log_users(peft_dir / "users_log.jsonl"))
    ids = pipe.sharer_ids()
    assert done == [ids[0::2], ids[0::2] + ids[1::2]]          # disjoint shards, every sharer once
    assert adapter_digests(peft_dir) == adapter_digests(pipe.anchor_peft)

    sharer_files = file_digests(peft_dir)
    for shard in (0, 1):
        out = run(train_anchor_gate.main, pipe.gate_args(gate_dir, peft_dir) + ["--num_shards", "2",
                                                                                "--shard_id", str(shard)], capsys)
        assert f"in shard {shard}/2" in out
    assert file_digests(peft_dir) == sharer_files              # stage 4 leaves the sharer LoRAs as they were
    assert adapter_digests(gate_dir) == adapter_digests(pipe.anchor_gate)
    for uid in ids:
        gates = load_file(str(gate_dir / f"user_{uid}" / GATES_FILE))
        assert set(gates) == MODULES
        assert all(g.shape == (64,) for g in gates.values())
        assert any(g.abs().sum() > 0 for g in gates.values())    # trained away from the zero init


# ------------------------------------------------------------------------------------------- stage 5

def test_stage5_recipes_predictions_summary(pipe, capsys):
    comp, ids = pipe.composition, pipe.test_ids()
    sharers = pipe.sharer_ids()
    for uid in ids:
        recipe = json.loads((comp / "recipes" / f"user_{uid}.json").read_text())
        assert recipe["user_id"] == uid and recipe["sharers"] == sharers
        assert set(recipe["pieces"]) == MODULES
        for piece, mix in recipe["pieces"].items():
            assert 1 <= len(mix) <= 2 and {s for s, _ in mix} <= set(sharers)          # --topk 2
            assert sum(w for _, w in mix) == pytest.approx(1.0)
        used = sorted(i for batch in recipe["batches"] for i in batch)
        assert used == list(range(recipe["examples"]))
    check_predictions(pipe, comp / "predictions", capsys)
    summary = json.loads((comp / "summary.json").read_text())
    assert summary["n_users"] == len(ids) and set(summary["users"]) == set(ids)
    assert summary["n_sharers"] == len(sharers) and summary["n_pieces"] == len(MODULES)
    for uid, u in summary["users"].items():
        path = comp / "recipes" / f"user_{uid}.json"
        recipe = json.loads(path.read_text())
        # storage: the payload (used sharer ids once, then per piece a count and (index, float32 weight) pairs;
        # 1-byte counts and indices below 256 sharers) beside the whole recipe file
        used = {s for mix in recipe["pieces"].values() for s, _ in mix}
        entries = sum(len(mix) for mix in recipe["pieces"].values())
        assert u["payload_bytes"] == sum(1 + len(s.encode()) for s in used) + 1 + len(MODULES) + entries * 5
        assert u["recipe_bytes"] == path.stat().st_size > u["payload_bytes"]
    assert summary["sharer_pool_bytes"] == sum((pipe.anchor_peft / f"user_{s}" / name).stat().st_size for s in sharers
                                               for name in ("adapter_model.safetensors", "adapter_config.json"))


def test_stage5_materialize_from_a_recipe_equals_the_saved_adapter(pipe, tmp_path, capsys):
    from peft import PeftModel

    from perpcs.__main__ import main as perpcs_main
    from perpcs.models.loading import load_base_model
    uid = pipe.test_ids()[0]
    run(perpcs_main, ["materialize", "--recipe", str(pipe.composition / "recipes" / f"user_{uid}.json"),
                      "--anchor_dir", str(pipe.anchor_peft), "--output_dir", str(tmp_path / "adapter")], capsys)
    assert file_digests(tmp_path / "adapter") == file_digests(pipe.composition / "adapters" / f"user_{uid}")
    model, _, _ = load_base_model(str(pipe.model), device="cpu")
    PeftModel.from_pretrained(model, str(tmp_path / "adapter"))        # a standard peft adapter


def test_stage5_users_assembled_in_separate_runs_equal_one_run(pipe, tmp_path, capsys):
    """A user's recipe and predictions do not depend on the users predicted before it by the same model (their LoRAs
    stay in the peft adapter between users): one shard per user gives the one-run outputs."""
    out_dir = tmp_path / "composition"
    n = len(pipe.test_ids())
    for shard in range(n):
        run(lora_composition.main, pipe.compose_args(out_dir) + ["--num_shards", str(n), "--shard_id", str(shard)],
            capsys)
    for sub in ("recipes", "user_predictions", "predictions"):
        assert file_digests(out_dir / sub) == file_digests(pipe.composition / sub)


def test_stage5_rerun_keeps_finished_users(pipe, tmp_path, capsys):
    out_dir = tmp_path / "composition"
    shutil.copytree(pipe.composition, out_dir)
    before = {p: p.stat().st_mtime_ns for p in (out_dir / "recipes").glob("*.json")}
    out = run(lora_composition.main, pipe.compose_args(out_dir), capsys)
    assert "3 already done, 0 to do" in out
    assert {p: p.stat().st_mtime_ns for p in (out_dir / "recipes").glob("*.json")} == before
    assert file_digests(out_dir / "predictions") == file_digests(pipe.composition / "predictions")


def test_stage5_static_kv_cache_predicts_the_same(pipe, tmp_path, capsys):
    """--kv_cache static through the assembled-LoRA model (peft's LoRA layers): same predictions."""
    out_dir = tmp_path / "composition"
    run(lora_composition.main, pipe.compose_args(out_dir) + ["--kv_cache", "static"], capsys)
    assert file_digests(out_dir / "recipes") == file_digests(pipe.composition / "recipes")
    assert file_digests(out_dir / "predictions") == file_digests(pipe.composition / "predictions")


# ------------------------------------------------------------------------------------------- OPPU and profiles

def test_oppu_trains_each_user_on_its_own_history_only(pipe, tmp_path, capsys, monkeypatch):
    import perpcs.stages.oppu as oppu
    seen = {}
    original_train = oppu.train

    def recording_train(model, tokenizer, examples, cfg, device, desc="train", **kw):
        seen[desc] = list(examples)
        return original_train(model, tokenizer, examples, cfg, device, desc=desc, **kw)

    monkeypatch.setattr(oppu, "train", recording_train)
    out_dir = tmp_path / "OPPU"
    run(OPPU.main, pipe.oppu_args(out_dir), capsys)
    layout = Layout(pipe.data, MOVIE)
    profiles = load_profiles(layout.profiles)
    users = json.loads(layout.test_users.read_text())
    log = {json.loads(line)["user_id"]: json.loads(line) for line in
           (out_dir / "users_log.jsonl").read_text().splitlines()}
    assert list(log) == [user_id(u) for u in users]
    for user in users:
        own = history_examples(MOVIE, user["profile"], profiles[user_id(user)])
        assert log[user_id(user)]["examples"] == len(own)
        assert seen[f"OPPU {user_id(user)}"] == own
        assert (out_dir / "adapters" / f"user_{user_id(user)}" / "adapter_model.safetensors").is_file()
    check_predictions(pipe, out_dir / "predictions", capsys)


def test_gen_profile_writes_every_user_and_a_rerun_generates_none(pipe, tmp_path, capsys):
    out_file = tmp_path / "profiles.json"
    out = run(gen_profile.main, pipe.profile_args(out_file), capsys)
    assert "16 users, 0 already in" in out and "16 to generate" in out
    profiles = json.loads(out_file.read_text())
    all_ids = set(json.loads((pipe.data / TASK / "profile-id2text.json").read_text()))
    assert set(profiles) == all_ids and len(all_ids) == 16
    assert all(isinstance(t, str) for t in profiles.values())
    digest = file_digests(tmp_path)
    out = run(gen_profile.main, pipe.profile_args(out_file), capsys)
    assert "16 already in" in out and "0 to generate" in out
    assert file_digests(tmp_path) == digest


# ------------------------------------------------------------------------------------------- python -m perpcs

def test_show_prompts_and_report_commands(pipe, capsys):
    from perpcs.__main__ import main as perpcs_main
    from perpcs.evaluation.metrics import evaluate_files
    out = run(perpcs_main, ["show-prompts", "--task_name", TASK, "--data_dir", str(pipe.data), "--n", "2",
                            "--k", "1", "--profile"], capsys)
    first = json.loads(pipe.layout.test_users.read_text())[0]
    assert out.count("===== user") == 2 and f"===== user {first['user_id']} query {first['query'][0]['id']}" in out
    assert f"### User Profile:\nprofile of {first['user_id']}\n" in out and "### User History:\n" in out
    assert f"----- gold: {first['query'][0]['gold']}" in out

    out = run(perpcs_main, ["report", "--task_name", TASK, "--data_dir", str(pipe.data),
                            "--output_root", str(pipe.root)], capsys)
    for method, pred_dir in (("task LoRA (non-personalized)", pipe.task_lora), ("Per-Pcs", pipe.composition)):
        for stem, label in (("kNP", "no retrieval"), ("k1", "BM25 k=1"), ("k1-profile", "BM25 k=1 + profile")):
            scores = evaluate_files(pipe.golds, pred_dir / "predictions" / f"{stem}.json", TASK)
            assert f"| {method} | {label} | {scores['accuracy']:.4f} | {scores['f1']:.4f} |" in out
    assert "| OPPU |" not in out                       # no OPPU run under this root
    mean = json.loads((pipe.composition / "summary.json").read_text())["mean"]
    scores = evaluate_files(pipe.golds, pipe.composition / "predictions" / "kNP.json", TASK)
    assert (f"| Per-Pcs | no retrieval | {scores['accuracy']:.4f} | {scores['f1']:.4f} | "
            f"{format_bytes(mean['payload_bytes'])} | {format_bytes(mean['recipe_bytes'])} |") in out



def test_report_takes_the_parent_output_dir_like_eval_all(pipe, tmp_path, capsys):
    from perpcs.__main__ import main as perpcs_main
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / TASK).symlink_to(pipe.root)     # output/<task>, as eval_all and the ablation take it
    out = run(perpcs_main, ["report", "--task_name", TASK, "--data_dir", str(pipe.data),
                            "--output_root", str(tmp_path / "output")], capsys)
    assert "| Per-Pcs | no retrieval |" in out and "| task LoRA (non-personalized) | BM25 k=1 |" in out


def test_report_without_predictions_is_an_error_and_ignores_zero_seconds_of_resumed_users(pipe, tmp_path):
    from perpcs.errors import PerpcsError
    from perpcs.evaluation.report import _per_user_seconds, results_table
    with pytest.raises(PerpcsError, match="no prediction files under"):
        results_table(TASK, pipe.data, tmp_path / "empty")
    log = tmp_path / "users_log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"user_id": "u1", "train_seconds": 100.0}, {"user_id": "u2", "train_seconds": 300.0},
        {"user_id": "u1", "train_seconds": 0.0}]) + "\n")   # u1 resumed from its saved adapter
    assert _per_user_seconds(log, "train_seconds") == 200.0


PROBE = "Which tag does this movie relate to? description: a robot falls in love Tag:"


def _logits(model, tokenizer, text=PROBE):
    device = next(model.parameters()).device
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()


# the stages run in bf16 on a GPU (PERPCS_TEST_DEVICE=cuda), the fp32 CPU reference does not
CLOSE = dict(rtol=1e-4, atol=1e-5) if DEVICE == "cpu" else dict(rtol=5e-2, atol=5e-2)


def _reference_logits(pipe, adapter_dir, tokenizer):
    """Base + task LoRA merged, the user's adapter loaded by PEFT: what a server would run."""
    from peft import PeftModel

    from perpcs.models.loading import load_base_model
    from perpcs.models.lora import merge_lora_into_base
    base, _, _ = load_base_model(str(pipe.model), device="cpu")
    return _logits(PeftModel.from_pretrained(merge_lora_into_base(base, pipe.task_lora), str(adapter_dir)), tokenizer)


def _composed_forward_logits(pipe, adapter_dir, tokenizer):
    """Base + task LoRA merged, the user's LoRA added as stage 5 predicted before peft did: forward hooks adding
    B(A(x)) * scaling in the activations' dtype (docs/method.md section 7)."""
    from perpcs.models.loading import load_base_model
    from perpcs.models.lora import merge_lora_into_base
    model, _, _ = load_base_model(str(pipe.model), device="cpu")
    model = merge_lora_into_base(model, pipe.task_lora)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    composed_forward(model, load_file(str(adapter_dir / "adapter_model.safetensors")),
                     config["lora_alpha"] / config["r"])
    return _logits(model, tokenizer)


def test_stage5_predicts_with_the_assembled_lora_through_peft(pipe, tmp_path, capsys, monkeypatch):
    """Each user's LoRA predicts as OPPU's does: a peft model whose adapter holds the user's materialized LoRA,
    without the composer's wrappers in the forward; in fp32 it predicts what the composed forward did."""
    from peft import PeftModel, get_peft_model_state_dict

    import perpcs.stages.target_users as target_users
    from perpcs.method.composition import ComposedLinear
    seen = {}
    real = target_users.predict_one_user

    def spy(model, tokenizer, task, user, *args, **kwargs):
        assert isinstance(model, PeftModel) and not any(isinstance(m, ComposedLinear) for m in model.modules())
        seen.setdefault("adapters", {})[str(user["user_id"])] = {k: v.clone() for k, v in
                                                                 get_peft_model_state_dict(model).items()}
        if "used" not in seen:
            seen.update(uid=str(user["user_id"]), tokenizer=tokenizer, used=_logits(model, tokenizer))
            with model.disable_adapter():
                seen["off"] = _logits(model, tokenizer)
        return real(model, tokenizer, task, user, *args, **kwargs)

    monkeypatch.setattr(target_users, "predict_one_user", spy)
    out_dir = tmp_path / "composition"
    # one user at a time: the spy sees each user's adapter (batched users: tests/test_user_batches.py)
    run(lora_composition.main, pipe.compose_args(out_dir) + ["--save_adapters", "--users_per_batch", "1"], capsys)
    assert sorted(seen["adapters"]) == sorted(pipe.test_ids())
    for uid, state in seen["adapters"].items():   # the active adapter is the recipe's, as materialize writes it
        saved = load_file(str(out_dir / "adapters" / f"user_{uid}" / "adapter_model.safetensors"))
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k].to(state[k].dtype)) for k in saved)
    assert not torch.allclose(seen["used"], seen["off"], atol=1e-4)          # the LoRA changes the model
    adapter_dir = out_dir / "adapters" / f"user_{seen['uid']}"
    expected = _reference_logits(pipe, adapter_dir, seen["tokenizer"])
    torch.testing.assert_close(seen["used"], expected, **CLOSE)  # and it is the user's LoRA
    composed = _composed_forward_logits(pipe, adapter_dir, seen["tokenizer"])
    torch.testing.assert_close(seen["used"], composed, **CLOSE)  # the numerics of the composed forward, in fp32


def test_oppu_predicts_with_the_users_own_lora(pipe, tmp_path, capsys, monkeypatch):
    import perpcs.stages.target_users as target_users
    seen = {}
    real = target_users.predict_one_user

    def spy(model, tokenizer, task, user, *args, **kwargs):
        if not seen:
            seen.update(uid=str(user["user_id"]), tokenizer=tokenizer, used=_logits(model, tokenizer))
            with model.disable_adapter():
                seen["off"] = _logits(model, tokenizer)
        return real(model, tokenizer, task, user, *args, **kwargs)

    monkeypatch.setattr(target_users, "predict_one_user", spy)
    out_dir = tmp_path / "oppu"
    run(OPPU.main, pipe.oppu_args(out_dir) + ["--lr", "5e-2", "--users_per_batch", "1"], capsys)
    assert not torch.allclose(seen["used"], seen["off"], atol=1e-4)
    expected = _reference_logits(pipe, out_dir / "adapters" / f"user_{seen['uid']}", seen["tokenizer"])
    torch.testing.assert_close(seen["used"], expected, **CLOSE)


# ------------------------------------------------------------------------------------------- LaMP leaderboard

def _without(argv: list, *flags) -> list:
    """A stage's flag list without the given flags (and their values): the leaderboard command sets those."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def _leaderboard_data(pipe, tmp_path):
    """The pipeline's data with a leaderboard split: its test users, their queries without golds."""
    data = tmp_path / "data"
    shutil.copytree(pipe.data, data)
    layout = Layout(data, MOVIE)
    users = json.loads(layout.test_users.read_text())
    for u in users:
        u["query"] = [{"id": q["id"], "input": q["input"]} for q in u["query"]]
    layout.leaderboard_users.parent.mkdir(parents=True)
    layout.leaderboard_users.write_text(json.dumps(users))
    return layout


def test_leaderboard_users_are_assembled_like_target_users_and_oppu_trained_like_them(pipe, tmp_path, capsys):
    """--test_split leaderboard: stage 5 assembles the leaderboard users as it does the test users (same recipes and
    predictions for the same users), under <output_dir>/leaderboard/, leaving the test-split outputs alone; the
    leaderboard command writes LaMP's file for Per-Pcs and (running OPPU.py itself) for OPPU."""
    from perpcs.__main__ import main as perpcs_main
    layout = _leaderboard_data(pipe, tmp_path)
    out_root = tmp_path / "output"
    comp = out_root / "LoRA-Composition"
    shutil.copytree(pipe.composition, comp)
    before = file_digests(comp)
    run(lora_composition.main, pipe.compose_args(comp) + ["--data_dir", str(layout.data_dir), "--test_split",
                                                          "leaderboard"], capsys)
    assert file_digests(comp, "*.json") == {k: v for k, v in before.items() if "/" not in k and k.endswith(".json")}
    for sub in ("recipes", "user_predictions", "predictions"):
        assert file_digests(comp / "leaderboard" / sub) == file_digests(pipe.composition / sub)
        assert file_digests(comp / sub) == file_digests(pipe.composition / sub)          # untouched
    assert (comp / "leaderboard" / "summary.json").is_file()
    ids = [q["id"] for u in layout.load_split("leaderboard") for q in u["query"]]
    for method, variant in (("per-pcs", "k1"), ("oppu", "kNP-profile")):
        stage = _without(pipe.oppu_args(tmp_path / "unused"), "--task_name", "--data_dir", "--output_dir")
        alone = ["--standalone"] if method == "oppu" else []   # OPPU has no test run here to take its flags from
        run(perpcs_main, ["leaderboard", "--task_name", TASK, "--method", method, "--variant", variant,
                          "--data_dir", str(layout.data_dir), "--output_root", str(out_root), *alone, "--", *stage],
            capsys)
        board = json.loads((out_root / "leaderboard" / f"{method}-{variant}" / "LaMP_2.json").read_text())
        assert board["task"] == "LaMP_2" and [e["id"] for e in board["golds"]] == ids
    assert not (out_root / "OPPU" / "predictions").exists()           # OPPU ran on the leaderboard split only
    assert (out_root / "OPPU" / "leaderboard" / "adapters").is_dir()


def _record_turns(monkeypatch, module) -> list:
    """Events ("examples" | "predict", user id) of a per-user stage, in the order they happen."""
    events = []
    real_examples, real_predict = module.user_examples, module.predict_one_user

    def examples(task, user, *a, **kw):
        events.append(("examples", user_id(user)))
        return real_examples(task, user, *a, **kw)

    def predict(model, tokenizer, task, user, *a, **kw):
        events.append(("predict", user_id(user)))
        return real_predict(model, tokenizer, task, user, *a, **kw)

    monkeypatch.setattr(module, "user_examples", examples)
    monkeypatch.setattr(module, "predict_one_user", predict)
    return events


def test_stage5_builds_a_users_examples_in_its_turn_only(pipe, tmp_path, capsys, monkeypatch):
    """Every test user's examples held from the start to the end of stage 5 grow with the users (~750 MB for 100
    LaMP-sized users): each user's are built in its turn, and not at all when its recipe is already there; the
    outputs stay the same."""
    import perpcs.stages.target_users as target_users
    events = _record_turns(monkeypatch, target_users)
    out_dir = tmp_path / "composition"
    one_at_a_time = ["--users_per_batch", "1"]   # a group's users are all assembled before their predictions
    run(lora_composition.main, pipe.compose_args(out_dir) + one_at_a_time, capsys)
    uids = pipe.test_ids()
    assert events == [(what, uid) for uid in uids for what in ("examples", "predict")]
    assert file_digests(out_dir / "recipes") == file_digests(pipe.composition / "recipes")
    assert file_digests(out_dir / "predictions") == file_digests(pipe.composition / "predictions")

    # killed after the recipe, before the predictions: resumed from the recipe, no examples built
    (out_dir / "user_predictions" / f"user_{uids[1]}.json").unlink()
    events.clear()
    run(lora_composition.main, pipe.compose_args(out_dir) + one_at_a_time, capsys)
    assert events == [("predict", uids[1])]
    assert file_digests(out_dir / "predictions") == file_digests(pipe.composition / "predictions")


def test_oppu_builds_a_users_examples_in_its_turn(pipe, tmp_path, capsys, monkeypatch):
    import perpcs.stages.target_users as target_users
    events = _record_turns(monkeypatch, target_users)
    run(OPPU.main, pipe.oppu_args(tmp_path / "OPPU") + ["--users_per_batch", "1"], capsys)
    assert events == [(what, uid) for uid in pipe.test_ids() for what in ("examples", "predict")]
