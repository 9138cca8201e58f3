"""The gate-score diagnostic (perpcs/evaluation/gate_scores.py) on hand-made score files; stage 5 writing them
(lora_composition.py --save_scores) is tested in test_explain.py and test_composition.py."""
import json
import math

import numpy as np
import pytest

from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)

from perpcs.errors import PerpcsError
from perpcs.evaluation.gate_scores import (decompose, format_gate_scores, format_pooled, load_gate_scores,
                                           load_pooled, pooled_spread)
from perpcs.method.recipes import GATE_SCORES_FORMAT, pooled_vectors_bytes

USERS, SHARERS = ["a", "b", "c"], ["s0", "s1", "s2"]
SHIFT = [5.0, -2.0, 0.0]                        # each user's own level: changes no ranking
OFFSET = {"p1": [1.0, 0.0, -1.0], "p2": [0.0, 2.0, -2.0]}
INTERACTION = {"p1": [[0.2, -0.1, -0.1], [-0.1, 0.2, -0.1], [-0.1, -0.1, 0.2]],   # rows and columns sum to 0
               "p2": [[-0.3, 0.2, 0.1], [0.1, -0.3, 0.2], [0.2, 0.1, -0.3]]}
GROUPS = {"users": {"a": 0, "b": 1, "c": 2, "s0": 0, "s1": 1, "s2": 1}, "n_groups": 3}


def records():
    return [(f"user_{u}.json", {"format": GATE_SCORES_FORMAT, "user_id": u, "sharers": SHARERS,
                                "scores": {p: [SHIFT[i] + OFFSET[p][s] + INTERACTION[p][i][s] for s in range(3)]
                                           for p in OFFSET}})
            for i, u in enumerate(USERS)]


def test_decompose_recovers_offset_and_interaction_by_hand():
    d = decompose(records(), GROUPS)
    assert d["pieces"] == 2 and d["users"] == USERS
    assert d["offset_sd"] == pytest.approx(math.sqrt((2 / 3 + 8 / 3) / 2))
    assert d["interaction_sd"] == pytest.approx(math.sqrt((0.18 / 9 + 0.42 / 9) / 2))
    assert d["ratio"] == pytest.approx(d["interaction_sd"] / d["offset_sd"])
    by_scores, by_user = d["ranked_by"]["scores"], d["ranked_by"]["user-relative"]
    # by the scores: s0 for everyone at p1, s1 at p2 -> every pair agrees; own group: a at p1, b at p2
    assert by_scores["same_top"] == 1.0
    assert by_scores["own_group_top"] == pytest.approx(2 / 6)
    # by the interaction: p1 a->s0, b->s1, c->s2; p2 a->s1, b->s2, c->s0: no pair agrees
    assert by_user["same_top"] == 0.0
    assert by_user["own_group_top"] == pytest.approx(3 / 6)     # a and b at p1, b at p2
    assert d["own_group_blind"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    text = format_gate_scores(d)
    assert "| the scores (what Per-Pcs does) | 100.0% | 33.3% |" in text
    assert f"interaction / offset: {d['ratio']:.2f}" in text


def test_without_groups_and_with_too_few_users():
    d = decompose(records())
    assert "own_group_top" not in d["ranked_by"]["scores"] and "own_group_blind" not in d
    assert "no groups file" in format_gate_scores(d)
    assert decompose(records()[:1]) is None
    with pytest.raises(PerpcsError, match="no group for user"):
        decompose(records(), {"users": {"a": 0}, "n_groups": 1})


def test_score_files_are_read_filtered_and_checked(tmp_path):
    for name, rec in records():
        (tmp_path / name).write_text(json.dumps(rec))
    assert [r["user_id"] for _, r in load_gate_scores(tmp_path)] == USERS
    assert [r["user_id"] for _, r in load_gate_scores(tmp_path, {"a", "c"})] == ["a", "c"]
    other = dict(records()[0][1], user_id="d", sharers=["s0", "s1", "x"])
    (tmp_path / "user_d.json").write_text(json.dumps(other))
    with pytest.raises(PerpcsError, match="user_d.json: other sharers or pieces"):
        load_gate_scores(tmp_path)
    alone = tmp_path / "alone"      # a single file is checked too: one score per sharer at every piece
    alone.mkdir()
    short = dict(records()[0][1], scores={"p1": [1.0, 2.0]})
    (alone / "user_a.json").write_text(json.dumps(short))
    with pytest.raises(PerpcsError, match="user_a.json: piece p1 has 2 scores for 3 sharers"):
        load_gate_scores(alone)
    (tmp_path / "user_d.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(PerpcsError, match="user_d.json: not a gate scores file"):
        load_gate_scores(tmp_path)


def test_stage_5_adds_scores_to_finished_users_and_drops_stale_ones(pipe, tmp_path, capsys):
    """--save_scores on a finished run assembles its users again (same recipes, byte for byte) for their scores;
    a later assembly without the flag removes them, so scores never describe another run's recipes."""
    import shutil

    import lora_composition
    from pipeline_fixture import file_digests
    from pipeline_fixture import run_stage as run
    out_dir = tmp_path / "composition"
    shutil.copytree(pipe.composition, out_dir)
    assert not (out_dir / "gate_scores").exists()
    run(lora_composition.main, pipe.compose_args(out_dir) + ["--save_scores"], capsys)
    assert sorted(p.name for p in (out_dir / "gate_scores").iterdir()) == \
        sorted(f"user_{uid}{ext}" for uid in pipe.test_ids() for ext in (".json", ".safetensors"))
    for sub in ("recipes", "predictions"):
        assert file_digests(out_dir / sub) == file_digests(pipe.composition / sub)
    # the pooled vectors are what the scores were made from: score = pooled . LN(gate) / sqrt(d), per sharer
    import torch

    from perpcs.method.gates import GATES_FILE, normalised_gates
    from perpcs.models.lora import read_safetensors
    pooled = dict(load_pooled(out_dir / "gate_scores"))
    assert set(pooled) == set(pipe.test_ids())
    for _, rec in load_gate_scores(out_dir / "gate_scores"):
        gates = [read_safetensors(pipe.anchor_gate / f"user_{s}" / GATES_FILE) for s in rec["sharers"]]
        for piece, scores in rec["scores"].items():
            v = torch.from_numpy(pooled[rec["user_id"]][piece])
            G = normalised_gates(gates, piece).double()
            torch.testing.assert_close(v @ G.T / math.sqrt(v.shape[0]), torch.tensor(scores, dtype=torch.float64),
                                       rtol=1e-4, atol=1e-5)
    run(lora_composition.main, pipe.compose_args(out_dir) + ["--overwrite"], capsys)
    assert list((out_dir / "gate_scores").iterdir()) == []


# pieces of two layers; layer 0: users (4,3), (4,-1), (4,-2) around the mean (4,0) at distances 3, 1, 2 (RMS
# sqrt(14/3), where a plain mean would give 2); layer 1: every user the same vector (spread 0, cosine 1)
P0, P1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
POOLED = {"a": {P0: [4.0, 3.0], P1: [3.0, 4.0]}, "b": {P0: [4.0, -1.0], P1: [3.0, 4.0]},
          "c": {P0: [4.0, -2.0], P1: [3.0, 4.0]}}


def test_pooled_spread_and_cosine_by_hand():
    users = [(u, {p: np.array(v) for p, v in vs.items()}) for u, vs in POOLED.items()]
    p = pooled_spread(users)
    spread0 = math.sqrt(14 / 3) / 4
    cos0 = (13 / (5 * math.sqrt(17)) + 10 / (5 * math.sqrt(20)) + 18 / (math.sqrt(17) * math.sqrt(20))) / 3
    assert p["per_piece"][P0]["spread"] == pytest.approx(spread0)
    assert p["per_piece"][P0]["cosine"] == pytest.approx(cos0)
    assert p["per_piece"][P1]["spread"] == pytest.approx(0.0) and p["per_piece"][P1]["cosine"] == pytest.approx(1.0)
    assert p["spread"] == pytest.approx(spread0 / 2) and p["cosine"] == pytest.approx((cos0 + 1) / 2)
    assert p["per_layer"]["0"]["spread"] == pytest.approx(spread0) and p["per_layer"]["1"]["cosine"] == \
        pytest.approx(1.0)
    # a shift common to every user (what all users share) lowers the spread: relative to a longer mean
    shifted = [(u, {q: v + np.array([4.0, 0.0]) for q, v in vs.items()}) for u, vs in users]
    assert pooled_spread(shifted)["per_piece"][P0]["spread"] == pytest.approx(math.sqrt(14 / 3) / 8)
    assert pooled_spread(users[:1]) is None
    text = format_pooled(p)
    assert f"{p['spread']:.1%}" in text and f"| 0 | {spread0:.1%} | {cos0:.4f} |" in text


def test_pooled_files_are_read_filtered_and_checked(tmp_path):
    import torch
    for uid, vs in POOLED.items():
        (tmp_path / f"user_{uid}.safetensors").write_bytes(pooled_vectors_bytes(
            {p: torch.tensor(v, dtype=torch.float64) for p, v in vs.items()}, uid, "movie_tagging", {"batches": 1}))
    read = load_pooled(tmp_path)
    assert [u for u, _ in read] == ["a", "b", "c"] and read[1][1][P0].tolist() == [4.0, -1.0]
    assert [u for u, _ in load_pooled(tmp_path, {"c"})] == ["c"]
    assert pooled_spread(read)["spread"] == pytest.approx(math.sqrt(14 / 3) / 8)
    (tmp_path / "user_d.safetensors").write_bytes(pooled_vectors_bytes(
        {P0: torch.zeros(3), P1: torch.zeros(2)}, "d", "movie_tagging"))
    with pytest.raises(PerpcsError, match="user_d.safetensors: other pieces or widths"):
        load_pooled(tmp_path)
    (tmp_path / "user_d.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PerpcsError, match="user_d.safetensors: not a readable pooled-vectors file"):
        load_pooled(tmp_path)
