"""The gate-score diagnostic (perpcs/evaluation/gate_scores.py) on hand-made score files; stage 5 writing them
(lora_composition.py --save_scores) is tested in test_explain.py and test_composition.py."""
import json
import math

import pytest

from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)

from perpcs.errors import PerpcsError
from perpcs.evaluation.gate_scores import decompose, format_gate_scores, load_gate_scores
from perpcs.method.recipes import GATE_SCORES_FORMAT

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
        sorted(f"user_{uid}.json" for uid in pipe.test_ids())
    for sub in ("recipes", "predictions"):
        assert file_digests(out_dir / sub) == file_digests(pipe.composition / sub)
    run(lora_composition.main, pipe.compose_args(out_dir) + ["--overwrite"], capsys)
    assert list((out_dir / "gate_scores").iterdir()) == []
