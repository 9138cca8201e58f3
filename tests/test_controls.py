"""User-blind controls of stage 5 (--control uniform | swapped | peft_merge) and the base-model row (stage 1
--base_only): they differ from Per-Pcs only in the weights, and the results table shows them as rows."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline_fixture import TASK, file_digests, one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import cli_error, run_stage as run

import lora_composition
import task_LoRA
from perpcs.method.controls import derangement
from perpcs.paths import BASE_ONLY, control_dir_name

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def controls(pipe, tmp_path_factory):
    """output/<task>/ with the three controls and the base-model predictions (each run once)."""
    import io
    from contextlib import redirect_stdout
    root = tmp_path_factory.mktemp("controls") / TASK
    logs = {}
    for control in ("uniform", "swapped", "peft_merge"):
        buf = io.StringIO()
        with redirect_stdout(buf):
            lora_composition.main(pipe.compose_args(root / control_dir_name(control)) + ["--control", control])
        logs[control] = buf.getvalue()
    buf = io.StringIO()
    with redirect_stdout(buf):
        task_LoRA.main(pipe.task_lora_args(root / BASE_ONLY) + ["--base_only"])
    logs["base"] = buf.getvalue()
    return root, logs


def recipe(root, uid) -> dict:
    return json.loads((root / "recipes" / f"user_{uid}.json").read_text())


def sharer_tensors(pipe) -> tuple:
    """({piece: [A_s]}, {piece: [B_s]}, scaling) read straight from the sharers' adapter files."""
    A, B = {}, {}
    for uid in pipe.sharer_ids():
        for key, t in load_file(str(pipe.anchor_peft / f"user_{uid}" / "adapter_model.safetensors")).items():
            piece = key[len(PREFIX):].rsplit(".lora_", 1)[0]
            (A if ".lora_A." in key else B).setdefault(piece, []).append(t.double())
    cfg = json.loads((pipe.anchor_peft / f"user_{pipe.sharer_ids()[0]}" / "adapter_config.json").read_text())
    return A, B, cfg["lora_alpha"] / cfg["r"]


def test_derangement_has_no_fixed_point_and_depends_only_on_the_seed():
    for n in range(2, 9):
        uids = [f"u{i}" for i in range(n)]
        for seed in range(20):
            pairs = derangement(uids, seed)
            assert sorted(pairs) == uids and sorted(pairs.values()) == uids   # a permutation
            assert all(u != v for u, v in pairs.items())                      # nobody gets its own history
            assert pairs == derangement(uids, seed)
    assert len({tuple(derangement([f"u{i}" for i in range(6)], s).values()) for s in range(30)}) > 5


def test_uniform_control_is_the_plain_average_of_every_sharer_piece(pipe, controls):
    from perpcs.method.pieces import PiecePool, composed_lora_model, load_composed
    from perpcs.method.recipes import recipe_weights
    from perpcs.models.loading import load_base_model
    from peft import get_peft_model_state_dict
    root = controls[0] / control_dir_name("uniform")
    sharers = pipe.sharer_ids()
    n = len(sharers)
    per_pcs = recipe(pipe.composition, pipe.test_ids()[0])
    for uid in pipe.test_ids():
        r = recipe(root, uid)
        assert r["control"] == "uniform" and r["sharers"] == per_pcs["sharers"] == sharers
        assert set(r["pieces"]) == set(per_pcs["pieces"])                    # the same pieces
        for piece, entries in r["pieces"].items():
            assert entries == [[s, 1.0 / n] for s in sharers], piece       # exactly 1/n, every sharer
        assert (root / "user_predictions" / f"user_{uid}.json").is_file()
    assert sorted(p.name for p in (root / "predictions").glob("*.json")) == \
        sorted(p.name for p in (pipe.composition / "predictions").glob("*.json"))

    # the uniform weights through Per-Pcs's own loading path == a hand-built average of the sharers' files
    pool = PiecePool(sharers, pipe.anchor_peft)
    model, _, _ = load_base_model(str(pipe.model), device="cpu")
    peft_model = composed_lora_model(model, pool)
    load_composed(peft_model, pool, recipe_weights(recipe(root, pipe.test_ids()[0]), pool))
    loaded = get_peft_model_state_dict(peft_model)
    A, B, _ = sharer_tensors(pipe)
    for piece in A:
        for table, part in ((A, "lora_A"), (B, "lora_B")):
            hand = sum(table[piece]) / n
            torch.testing.assert_close(loaded[f"{PREFIX}{piece}.{part}.weight"].double(), hand, rtol=1e-6, atol=1e-8)


def test_swapped_user_gets_exactly_the_per_pcs_recipe_of_its_partner(pipe, controls):
    root = controls[0] / control_dir_name("swapped")
    uids = pipe.test_ids()
    pairs = derangement(uids, 0)   # the stage's --seed (default 0)
    # the check has teeth: Per-Pcs gives these users different recipes, so an own-history assembly would fail it
    assert len({json.dumps(recipe(pipe.composition, u)["pieces"]) for u in uids}) == len(uids)
    for uid in uids:
        r = recipe(root, uid)
        partner = pairs[uid]
        assert r["control"] == "swapped" and r["history_of"] == partner != uid and r["user_id"] == uid
        theirs = recipe(pipe.composition, partner)
        assert r["pieces"] == theirs["pieces"]                              # the same weights, bit for bit
        assert r["batches"] == theirs["batches"] and r["seed_user"] == theirs["seed_user"]
        assert (root / "user_predictions" / f"user_{uid}.json").is_file()


def test_peft_merge_update_is_n_times_the_uniform_mix(pipe, controls):
    """peft's linear rule: A' = sum_s sqrt(w c) A_s, B' = sum_s sqrt(w c) B_s, scaling 1; w = 1/n gives
    B'A' = n * (c mean(B) mean(A)), n times the uniform mix's update."""
    root = controls[0] / control_dir_name("peft_merge")
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and not cfg.get("use_rslora")   # the merge's scaling is 1
    merged = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    A, B, c = sharer_tensors(pipe)
    n = len(pipe.sharer_ids())
    assert n > 1
    for piece in A:
        a = merged[f"{PREFIX}{piece}.lora_A.weight"].double()
        b = merged[f"{PREFIX}{piece}.lora_B.weight"].double()
        mean_a, mean_b = sum(A[piece]) / n, sum(B[piece]) / n
        torch.testing.assert_close(a, math.sqrt(c * n) * mean_a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b, math.sqrt(c * n) * mean_b, rtol=1e-5, atol=1e-7)
        uniform_update = c * mean_b @ mean_a
        torch.testing.assert_close(b @ a, n * uniform_update, rtol=1e-5, atol=1e-8)
        if uniform_update.abs().max() > 0:
            assert not torch.allclose(b @ a, uniform_update)
    assert not (root / "recipes").exists()
    for uid in pipe.test_ids():
        assert (root / "user_predictions" / f"user_{uid}.json").is_file()
    assert json.loads((root / "summary.json").read_text())["control"] == "peft_merge"


def test_controls_resume_and_refuse_another_control_in_their_dir(pipe, controls, tmp_path, capsys):
    out = tmp_path / "uniform"
    shutil.copytree(controls[0] / control_dir_name("uniform"), out)
    before = file_digests(out / "recipes")
    run(lora_composition.main, pipe.compose_args(out) + ["--control", "uniform"], capsys)
    assert file_digests(out / "recipes") == before
    assert len((out / "users_log.jsonl").read_text().splitlines()) == len(pipe.test_ids())   # nobody redone
    msg = cli_error(lora_composition.main, pipe.compose_args(out) + ["--control", "swapped"], capsys)
    assert 'settings.control "uniform" -> "swapped"' in msg and "--overwrite" in msg
    (out / "run_manifest.json").unlink()     # without the folder's record, each recipe says which control made it
    msg = cli_error(lora_composition.main, pipe.compose_args(out) + ["--control", "swapped"], capsys)
    assert "--control uniform" in msg and "--control swapped" in msg
    msg = cli_error(lora_composition.main, pipe.compose_args(out), capsys)
    assert "--control uniform" in msg and "Per-Pcs" in msg
    per_pcs = tmp_path / "per_pcs"
    shutil.copytree(pipe.composition / "recipes", per_pcs / "recipes")
    msg = cli_error(lora_composition.main, pipe.compose_args(per_pcs) + ["--control", "swapped"], capsys)
    assert "by Per-Pcs" in msg


def test_base_only_predicts_with_the_plain_base_model(pipe, controls):
    from perpcs.data.tasks import get_task
    from perpcs.engine.generation import predict_variants
    from perpcs.models.loading import load_base_model
    base = controls[0] / BASE_ONLY
    assert not (base / "adapter_model.safetensors").exists() and not (base / "adapter_config.json").exists()
    assert "base model" in controls[1]["base"] and "training" not in controls[1]["base"]
    task, layout = get_task(TASK), pipe.layout
    model, tokenizer, device = load_base_model(str(pipe.model), device="cpu")
    users = json.loads(layout.test_users.read_text())
    preds = predict_variants(model, tokenizer, task, users, layout.load_profiles(), device, k_list=(1,),
                             max_new_tokens=4, profiles_path=layout.profiles, temperature=0.0, max_seq_len=256)
    assert preds
    for stem, rows in preds.items():
        written = json.loads((base / "predictions" / f"{stem}.json").read_text())
        assert [[g["id"], g["output"]] for g in written["golds"]] == [[i, o] for i, o in rows]


def test_report_shows_the_base_and_control_rows(pipe, controls):
    from perpcs.evaluation.report import results_table
    root = controls[0]
    for name in ("task-base_LLM", "LoRA-Composition"):
        shutil.copytree(pipe.root / name / "predictions", root / name / "predictions", dirs_exist_ok=True)
    table = results_table(TASK, pipe.data, root)
    rows = [line.split("|")[1].strip() for line in table.splitlines() if "| no retrieval |" in line]
    assert rows == ["base model (no LoRA)", "task LoRA (non-personalized)", "Per-Pcs",
                    "control: uniform mix (user-blind)", "control: swapped history (another user's)",
                    "control: peft merge (add_weighted_adapter, linear)"]
    assert "personalizes where it beats all three" in table
