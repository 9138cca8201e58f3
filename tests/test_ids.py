"""Ids are never paths (issue 21): a user id names files (user_<id>), so one rule (perpcs.paths.SAFE_ID) is checked
where ids come in (prepare_lamp's raw question ids, users files, stage 2's index) and again wherever an id becomes a
file name. A traversal id is refused with exit 2 and nothing is written, inside the output folder or outside it."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import lora_composition
import OPPU
from perpcs.data.sample import write_sample
from perpcs.data.tasks import TASKS
from perpcs.errors import PerpcsError
from perpcs.paths import ID_RULE, is_safe_id, safe_id, user_file_name
from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import ROOT, cli_error, run_script

TRAVERSAL_USER = "x/../../../../elsewhere/PWNED"
TRAVERSAL_QUESTION = "/../../elsewhere/PWNED_RAW"


def tree(root: Path) -> dict:
    """{relative path: sha256 of a file, or None for a folder} of everything below root, hidden names included."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------- the rule

def test_real_question_ids_are_safe(lamp_real_dir, lamp2_full_rows):
    real = [row["id"] for row in lamp2_full_rows]
    for questions in sorted(lamp_real_dir.glob("LaMP_*/*/*_questions.json")):
        real += [q["id"] for q in json.loads(questions.read_text(encoding="utf-8"))]
    assert len(real) >= 5 and all(is_safe_id(q) and is_safe_id(f"u{q}") for q in real)


def test_the_rule_accepts_sample_ids_and_refuses_paths():
    for ok in ["u110", "310", "000", "u000", 7, "user6", "_x", "a.b-c_D", "a" * 128]:
        assert is_safe_id(ok) and safe_id(ok) == str(ok), ok
    assert user_file_name("u110", ".json") == "user_u110.json"
    for bad in ["..", ".", ".hidden", "a/b", "a\\b", "", "a" * 129, "a b", "a\x00b", "-x", "x\n", "é", True, None,
                1.5, -3]:
        assert not is_safe_id(bad), repr(bad)
        with pytest.raises(PerpcsError, match="cannot name a file") as err:
            user_file_name(bad)
        assert ID_RULE in str(err.value)


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_every_sample_question_id_makes_a_safe_user_id(task_name):
    from perpcs.data.sample import generate
    files = generate(task_name, 4, 4, 2, 0)
    ids = [q["id"] for name, obj in files.items() if name.endswith("_questions.json") for q in obj]
    assert ids and all(is_safe_id(q) and is_safe_id(f"u{q}") for q in ids)


def test_every_path_builder_refuses_a_traversal_id(tmp_path):
    from perpcs.stages.common import user_dir
    from perpcs.stages.lora_composition import gate_scores_path, recipe_path
    from perpcs.stages.target_users import user_predictions_path
    for build in (user_dir, user_predictions_path, recipe_path, gate_scores_path):
        with pytest.raises(PerpcsError, match="cannot name a file"):
            build(tmp_path, TRAVERSAL_USER)
    assert user_dir(tmp_path, "u1") == tmp_path / "user_u1"


def test_a_traversal_id_in_the_sharer_index_is_refused(tmp_path):
    from perpcs.stages.sharer_selection import load_sharer_index
    path = tmp_path / "anchor_user_idx.json"
    path.write_text(json.dumps({"task": "movie_tagging", "strategy": "most_active", "k": 2, "seed": 0,
                                "indices": [0, 1], "user_ids": ["u1", "../../PWNED"], "clusters": None}))
    with pytest.raises(PerpcsError) as err:
        load_sharer_index(path)
    assert str(path) in str(err.value) and "user_ids #1 ('../../PWNED')" in str(err.value)


# ------------------------------------------------------------------------------------------------- prepare

def test_prepare_refuses_a_traversal_question_id_and_writes_nothing(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "data"
    write_sample("movie_tagging", raw, 6, 4, 2)
    questions_file = next(raw.rglob("train_questions.json"))
    questions = json.loads(questions_file.read_text())
    outputs_file = questions_file.with_name("train_outputs.json")
    outputs = json.loads(outputs_file.read_text())
    old = questions[2]["id"]
    questions[2]["id"] = TRAVERSAL_QUESTION
    next(g for g in outputs["golds"] if g["id"] == old)["id"] = TRAVERSAL_QUESTION
    questions_file.write_text(json.dumps(questions))
    outputs_file.write_text(json.dumps(outputs))
    before = tree(tmp_path)
    proc = run_script("data/prepare_lamp.py", ["--task_name", "movie_tagging", "--lamp_dir", raw, "--out_dir", out,
                                               "--n_test", "1"], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "Traceback" not in proc.stderr
    assert str(questions_file) in error and f"question #2 (id {TRAVERSAL_QUESTION!r})" in error and ID_RULE in error
    assert tree(tmp_path) == before and not out.exists()     # not even a partial output folder


# ------------------------------------------------------------------------------------------------- stages

def traversal_data(pipe, tmp_path) -> Path:  # noqa: F811  (the pipe fixture)
    """A copy of the pipeline's data whose test user #1 is named TRAVERSAL_USER (its profile text too): the
    fixture's own files never change."""
    data = Path(shutil.copytree(pipe.data, tmp_path / "data"))
    users_file = pipe.layout.test_users.relative_to(pipe.data)
    users = json.loads((data / users_file).read_text())
    old, users[1]["user_id"] = users[1]["user_id"], TRAVERSAL_USER
    (data / users_file).write_text(json.dumps(users, indent=1))
    profiles_file = data / pipe.layout.profiles.relative_to(pipe.data)
    profiles = json.loads(profiles_file.read_text())
    profiles[TRAVERSAL_USER] = profiles[old]
    profiles_file.write_text(json.dumps(profiles))
    return data


@pytest.mark.parametrize("stage", ["composition", "oppu"])
def test_a_traversal_user_id_is_refused_before_anything_is_written(pipe, tmp_path, capsys, stage):  # noqa: F811
    data = traversal_data(pipe, tmp_path)
    # deep enough that every would-be target (user_<id>/../../../../elsewhere) stays inside tmp_path
    out = tmp_path / "a" / "b" / "c" / "out"
    out.mkdir(parents=True)
    targets = [out / "adapters" / f"user_{TRAVERSAL_USER}", out / "user_predictions" / f"user_{TRAVERSAL_USER}.json",
               out / "recipes" / f"user_{TRAVERSAL_USER}.json"]
    assert all(Path(os.path.normpath(t)).is_relative_to(tmp_path) for t in targets)
    before, fixture_before = tree(tmp_path), tree(pipe.root)
    main, argv = (lora_composition.main, pipe.compose_args(out)) if stage == "composition" else \
        (OPPU.main, pipe.oppu_args(out))
    error = cli_error(main, argv + ["--data_dir", str(data)], capsys)
    assert str(data / pipe.layout.test_users.relative_to(pipe.data)) in error
    assert f"user #1 (user_id {TRAVERSAL_USER!r})" in error and ID_RULE in error
    assert not any(Path(os.path.normpath(t)).exists() for t in targets)
    assert not (tmp_path / "a" / "b" / "elsewhere").exists()
    assert tree(tmp_path) == before and tree(pipe.root) == fixture_before   # nothing new, inside out or outside


def test_explain_names_every_heatmap_before_writing_one(pipe, tmp_path):  # noqa: F811
    from perpcs.evaluation.explain import explain, load_recipes
    recipes = load_recipes(recipes_dir=pipe.composition / "recipes")
    assert len(recipes) >= 2
    path, recipe = recipes[-1]
    recipes[-1] = (path, {**recipe, "user_id": "../../PWNED"})
    out = tmp_path / "explain"
    with pytest.raises(PerpcsError, match="cannot name a file"):
        explain(recipes, out)
    assert not out.exists() and not (tmp_path.parent / "PWNED.png").exists()
