"""`python -m perpcs explain` and the routing share (issue 15, items 1 and 2): the numbers equal the recipe's, the
routing share is the own-group weight over the total, and the sample's groups file is never read by a stage."""
import json
import math
import random
import shutil

import pytest

import lora_composition
from perpcs.data.prepare import prepare_lamp
from perpcs.data.sample import generate, sample_groups, write_sample
from perpcs.evaluation.explain import (agreement, explain, explain_recipe, heatmap_pieces, load_recipes, read_groups,
                                      routing, weight_grid)
from perpcs.method.recipes import RECIPE_FORMAT
from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import ROOT, TASK, file_digests
from pipeline_fixture import run_stage as run


def recipe(user, sharers, pieces) -> dict:
    return {"format": RECIPE_FORMAT, "user_id": user, "task": TASK, "sharers": sharers, "pieces": pieces}


def random_recipe(rng, user="t", sharers=("a", "b", "c", "d", "e"), layers=3,
                  modules=("q_proj", "k_proj", "v_proj", "o_proj"), topk=2) -> dict:
    pieces = {}
    for la in range(layers):
        for m in modules:
            picked = rng.sample(list(sharers), topk)
            raw = [rng.random() for _ in picked]
            pieces[f"model.layers.{la}.self_attn.{m}"] = [[s, w / sum(raw)] for s, w in zip(picked, raw)]
    return recipe(user, list(sharers), pieces)


def groups_file(path, users: dict, n_groups: int):
    path.write_text(json.dumps({"format": "perpcs-sample-groups/1", "task": TASK, "seed": 0, "n_groups": n_groups,
                                "users": users}))
    return path


# ------------------------------------------------------------------------------------------------- explain

def test_explain_sums_equal_the_recipe():
    rng = random.Random(3)
    rec = random_recipe(rng)
    info = explain_recipe(rec)
    entries = [(s, w) for ws in rec["pieces"].values() for s, w in ws]
    total = sum(w for _, w in entries)
    assert info["total"] == pytest.approx(total) and total == pytest.approx(len(rec["pieces"]))
    for s in rec["sharers"]:
        mass = sum(w for u, w in entries if u == s)
        assert info["mass"][s] == pytest.approx(mass)
        assert info["share"][s] == pytest.approx(mass / total)
    assert sum(info["mass"].values()) == pytest.approx(total)
    assert info["distinct"] == len({u for u, _ in entries})
    shares = [sum(w for u, w in entries if u == s) / total for s in rec["sharers"]]
    assert info["entropy_bits"] == pytest.approx(-sum(p * math.log(p) for p in shares if p) / math.log(2))
    # per piece: the heatmap's column and the (layer, module) cell are the recipe's entries
    grid = weight_grid(rec, info["sharers"])
    for j, piece in enumerate(heatmap_pieces(rec)):
        expected = dict((u, w) for u, w in rec["pieces"][piece])
        assert {s: grid[i][j] for i, s in enumerate(info["sharers"]) if grid[i][j]} == pytest.approx(expected)
        la, mod = int(piece.split(".")[2]), piece.split(".")[-1]
        assert info["cells"][(la, mod)] == pytest.approx(expected)


def test_heatmap_columns_go_by_layer_number_not_as_text():
    """A recipe saved with sorted keys lists layer 10 before layer 2: the heatmap still runs 0, 1, 2, ..., 11."""
    rec = random_recipe(random.Random(5), layers=12, modules=("q_proj", "v_proj"))
    rec["pieces"] = dict(sorted(rec["pieces"].items()))   # as json.dumps(sort_keys=True) writes it
    assert list(rec["pieces"])[4].startswith("model.layers.10.")
    order = heatmap_pieces(rec)
    assert [int(p.split(".")[2]) for p in order] == [la for la in range(12) for _ in range(2)]
    assert [p.rsplit(".", 1)[1] for p in order[:2]] == ["q_proj", "v_proj"]   # within a layer: the recipe's order
    grid = weight_grid(rec, rec["sharers"])
    column = order.index("model.layers.2.self_attn.v_proj")
    assert {s: grid[i][column] for i, s in enumerate(rec["sharers"]) if grid[i][column]} == \
        pytest.approx(dict(rec["pieces"]["model.layers.2.self_attn.v_proj"]))


def test_one_sharer_everywhere_has_zero_entropy_and_uniform_has_log2_s():
    one = explain_recipe(recipe("t", ["a", "b"], {"model.layers.0.mlp.up_proj": [["a", 1.0]],
                                                  "model.layers.1.mlp.up_proj": [["a", 1.0]]}))
    assert one["entropy_bits"] == 0 and one["distinct"] == 1 and one["mass"] == {"a": 2.0, "b": 0.0}
    even = explain_recipe(recipe("t", list("abcd"), {"model.layers.0.mlp.up_proj": [[s, 0.25] for s in "abcd"]}))
    assert even["entropy_bits"] == pytest.approx(2.0) and even["distinct"] == 4


def test_explain_command_writes_text_json_and_a_heatmap_per_user(tmp_path, capsys):
    from perpcs.__main__ import main as perpcs_main
    rng = random.Random(0)
    rdir = tmp_path / "LoRA-Composition" / "recipes"
    rdir.mkdir(parents=True)
    for user in ("t1", "t2"):
        (rdir / f"user_{user}.json").write_text(json.dumps(random_recipe(rng, user)))
    out = run(perpcs_main, ["explain", "--recipes_dir", str(rdir)], capsys)
    assert out.count("## user ") == 2 and "Distinct sharers used:" in out and "bits" in out
    assert "| layer | q_proj | k_proj | v_proj | o_proj |" in out
    exp = tmp_path / "LoRA-Composition" / "explain"
    for user in ("t1", "t2"):
        assert (exp / f"heatmap_user_{user}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((exp / "explain.json").read_text())
    assert [u["user_id"] for u in saved["users"]] == ["t1", "t2"] and saved["routing"] is None
    assert (exp / "explain.md").read_text() in out


# ------------------------------------------------------------------------------------------------- routing

def test_agreement_counts_pieces_with_the_same_dominant_sharer():
    pieces = [f"model.layers.{la}.self_attn.{m}" for la in range(2) for m in ("q_proj", "v_proj")]   # 4 pieces
    # a: x dominant in every piece; b: x in pieces 0-1, y in 2-3 (piece 1 is a tie 0.5/0.5: the pool's first, x)
    a = recipe("a", ["x", "y"], {p: [["x", 0.7], ["y", 0.3]] for p in pieces})
    b = recipe("b", ["x", "y"], {pieces[0]: [["x", 1.0]], pieces[1]: [["y", 0.5], ["x", 0.5]],
                                 pieces[2]: [["y", 0.9], ["x", 0.1]], pieces[3]: [["y", 1.0]]})
    c = recipe("c", ["x", "y"], {p: [["y", 1.0]] for p in pieces})
    agree = agreement([("a", a), ("b", b), ("c", c)])
    by_pair = {tuple(p["users"]): p for p in agree["pairs"]}
    assert by_pair[("a", "b")]["same"] == pytest.approx(0.5)
    assert by_pair[("a", "b")]["chance"] == pytest.approx(1.0 * 0.5)     # f_a(x)=1, f_b(x)=0.5
    assert by_pair[("a", "c")]["same"] == 0 and by_pair[("a", "c")]["chance"] == 0
    assert by_pair[("b", "c")]["same"] == pytest.approx(0.5) and by_pair[("b", "c")]["chance"] == pytest.approx(0.5)
    assert agree["mean_same"] == pytest.approx(1 / 3) and agree["min_same"] == 0 and agree["max_same"] == 0.5
    assert agreement([("a", a)]) is None
    text = explain([("a", a), ("b", b)])
    assert "| a, b | 4 | 50.0% | 50.0% |" in text


def test_routing_share_on_a_hand_made_recipe(tmp_path):
    groups = {"a": 0, "b": 1, "c": 0, "d": 2, "t1": 0, "t2": 1}
    path = groups_file(tmp_path / "groups.json", groups, 4)
    r1 = recipe("t1", list("abcd"), {"model.layers.0.self_attn.q_proj": [["a", 0.5], ["b", 0.5]],
                                      "model.layers.0.self_attn.v_proj": [["b", 1.0]],
                                      "model.layers.1.self_attn.q_proj": [["c", 0.25], ["d", 0.75]]})
    r2 = recipe("t2", list("abcd"), {"model.layers.0.self_attn.q_proj": [["b", 1.0]],
                                      "model.layers.0.self_attn.v_proj": [["b", 0.6], ["a", 0.4]]})
    r = routing([("r1", r1), ("r2", r2)], read_groups(path))
    # t1 (group 0): a 0.5 + c 0.25 of 3; pool: a, c of 4 sharers in group 0. t2 (group 1): b 1.6 of 2; b of 4
    assert r["users"]["t1"] == {"group": 0, "share": pytest.approx(0.25), "blind": pytest.approx(0.5)}
    assert r["users"]["t2"] == {"group": 1, "share": pytest.approx(0.8), "blind": pytest.approx(0.25)}
    assert r["mean_share"] == pytest.approx(0.525) and r["mean_blind"] == pytest.approx(0.375)
    assert r["balanced_blind"] == 0.25


def test_routing_names_a_user_the_groups_file_lacks(tmp_path, capsys):
    from perpcs.__main__ import main as perpcs_main
    path = groups_file(tmp_path / "groups.json", {"a": 0, "t": 0}, 2)
    (tmp_path / "user_t.json").write_text(json.dumps(recipe("t", ["a", "b"], {"model.layers.0.mlp.up_proj": [
        ["a", 0.5], ["b", 0.5]]})))
    with pytest.raises(SystemExit) as exc:
        from perpcs.errors import run_cli
        run_cli(lambda: perpcs_main(["explain", "--recipe", str(tmp_path / "user_t.json"), "--groups_file",
                                     str(path), "--output_dir", str(tmp_path / "x")]))
    assert exc.value.code == 2 and "no group for user(s) b" in capsys.readouterr().err


def test_groups_file_is_keyed_by_the_prepared_user_ids(tmp_path):
    files = write_sample(TASK, tmp_path / "raw", 12, 6, 3, seed=1)
    prepare_lamp(TASK, tmp_path / "raw", tmp_path / "data", n_test=3, verbose=False)
    groups = sample_groups(files["sample_info.json"])["users"]
    prepared = {}
    for split in (tmp_path / "data" / TASK).rglob("*.json"):
        if split.name != "golds.json":
            prepared.update({u["user_id"]: [q["id"] for q in u["query"]] for u in json.loads(split.read_text())})
    assert set(groups) == set(prepared)
    by_questions = {tuple(u["question_ids"]): u["group"] for u in files["sample_info.json"]["users"]}
    assert all(groups[uid] == by_questions[tuple(qids)] for uid, qids in prepared.items())
    assert generate(TASK, 12, 6, 3, seed=1) == files          # the flag changes nothing else (same generator)


def test_make_sample_groups_file_flag(tmp_path):
    import subprocess
    import sys
    subprocess.run([sys.executable, str(ROOT / "data" / "make_sample.py"), "--task_name", TASK, "--out_dir",
                    str(tmp_path / "raw"), "--n_users", "8", "--n_history", "4", "--n_queries", "2",
                    "--groups_file", str(tmp_path / "side" / "groups.json")], check=True, capture_output=True)
    info = json.loads((tmp_path / "raw" / "sample_info.json").read_text())
    side = json.loads((tmp_path / "side" / "groups.json").read_text())
    assert side["users"] == {f"u{u['question_ids'][0]}": u["group"] for u in info["users"]}
    assert side["n_groups"] == info["n_groups"] and not (tmp_path / "raw" / "groups.json").exists()


# ------------------------------------------------------------------------------------------------- on the pipeline

def test_no_stage_reads_the_groups_file(pipe, tmp_path, capsys):
    """Stage 5 with the groups file in the data dir (where stages look) gives the fixture's outputs, made without
    one (and with --save_scores, which adds gate_scores/ and changes nothing else); then explain and the report
    show the routing share of those recipes, and explain where the choices come from."""
    from perpcs.__main__ import main as perpcs_main
    side = sample_groups(json.loads((pipe.root / "raw" / "sample_info.json").read_text()))
    data = tmp_path / "data"
    shutil.copytree(pipe.data, data)
    for where in (data / "sample_groups.json", data / TASK / "sample_groups.json", data / TASK / "groups.json"):
        where.write_text(json.dumps(side))
    out_dir = tmp_path / "composition"
    args = pipe.compose_args(out_dir) + ["--save_adapters", "--save_scores"]
    args[args.index("--data_dir") + 1] = str(data)
    run(lora_composition.main, args, capsys)
    for sub in ("recipes", "predictions"):
        assert file_digests(out_dir / sub) == file_digests(pipe.composition / sub)
    # the scores are what the recipes were chosen from: one batch, --topk 2 -> the two best, softmax weights
    one_batch = 0
    for uid in pipe.test_ids():
        scores = json.loads((out_dir / "gate_scores" / f"user_{uid}.json").read_text())
        rec = json.loads((out_dir / "recipes" / f"user_{uid}.json").read_text())
        assert scores["sharers"] == rec["sharers"] and list(scores["scores"]) == list(rec["pieces"])
        assert scores["batches"] == len(rec["batches"])
        if scores["batches"] != 1:
            continue
        one_batch += 1
        for piece, entries in rec["pieces"].items():
            s = dict(zip(rec["sharers"], scores["scores"][piece]))
            best = sorted(rec["sharers"], key=lambda x: -s[x])[:2]
            assert {e[0] for e in entries} == set(best), piece
            z = sum(math.exp(s[x]) for x in best)
            for sharer, weight in entries:
                assert weight == pytest.approx(math.exp(s[sharer]) / z, rel=1e-5)
    assert one_batch > 0

    gfile = data / TASK / "groups.json"
    recipes = load_recipes(recipes_dir=pipe.composition / "recipes")
    r = routing(recipes, {"users": side["users"], "n_groups": side["n_groups"]})
    assert set(r["users"]) == set(pipe.test_ids())
    out = run(perpcs_main, ["explain", "--recipes_dir", str(pipe.composition / "recipes"), "--groups_file",
                            str(gfile), "--output_dir", str(tmp_path / "explain")], capsys)
    assert f"| mean over {len(recipes)} users | | {r['mean_share']:.1%} | {r['mean_blind']:.1%} |" in out
    assert "where the choices come from" not in out        # the fixture's run saved no scores
    out = run(perpcs_main, ["explain", "--recipes_dir", str(out_dir / "recipes"), "--groups_file", str(gfile),
                            "--output_dir", str(tmp_path / "explain2")], capsys)   # finds gate_scores/ beside
    from perpcs.evaluation.gate_scores import decompose, load_gate_scores
    d = decompose(load_gate_scores(out_dir / "gate_scores"), read_groups(gfile))
    assert d and "same top sharer" in out and f"{d['ranked_by']['scores']['same_top']:.1%}" in out
    assert json.loads((tmp_path / "explain2" / "explain.json").read_text())["gate_scores"]["ratio"] == \
        pytest.approx(d["ratio"])
    out = run(perpcs_main, ["report", "--task_name", TASK, "--data_dir", str(pipe.data), "--output_root",
                            str(pipe.root), "--groups_file", str(gfile)], capsys)
    assert f"routing (Per-Pcs): on average {r['mean_share']:.1%}" in out
    agree = agreement(recipes)
    assert len(recipes) > 1 and f"the same dominant sharer in {agree['mean_same']:.0%} of the pieces" in out
    assert "routing" not in run(perpcs_main, ["report", "--task_name", TASK, "--data_dir", str(pipe.data),
                                              "--output_root", str(pipe.root)], capsys)
