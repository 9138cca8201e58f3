"""The PEFT-retrieval rows of stage 5 (--control nearest_sharer | random_sharer): each target user gets one
sharer's whole LoRA, chosen by history similarity (stage 2's encoder) or drawn per user; recorded, resumable,
refused when the control, seed or encoder changes, and shown as rows of the results table."""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline_fixture import TASK, one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import cli_error

import lora_composition
from perpcs.errors import PerpcsError
from perpcs.method.controls import nearest_sharer, random_sharer
from perpcs.paths import CONTROLS, control_dir_name

RETRIEVAL = ("nearest_sharer", "random_sharer")


# ---- the choice, on hand-made vectors ---------------------------------------------------------------------

def test_nearest_sharer_is_the_highest_cosine_not_the_nearest_point():
    target = np.array([1.0, 0.0])
    sharers = np.array([[0.9, 0.9],     # Euclidean distance 0.906 (the nearest point), cosine 0.707
                        [10.0, 1.0]])   # Euclidean distance 9.06, cosine 0.995 (the same direction)
    index, cosines = nearest_sharer(target, sharers)
    assert index == 1
    assert int(np.argmin(np.linalg.norm(sharers - target, axis=1))) == 0   # Euclid would choose the other
    np.testing.assert_allclose(cosines, [1 / np.sqrt(2), 10 / np.sqrt(101)], rtol=1e-12)


def test_nearest_sharer_ties_go_to_the_lower_sharer_index():
    target = np.array([1.0, 1.0, 0.0])
    sharers = np.array([[0.0, 0.0, 1.0],    # cosine 0
                        [3.0, 0.0, 0.0],    # cosine 1/sqrt(2)
                        [0.0, 5.0, 0.0],    # cosine 1/sqrt(2): a tie with #1
                        [-1.0, -1.0, 0.0]])
    index, cosines = nearest_sharer(target, sharers)
    assert cosines[1] == cosines[2] and index == 1
    index, _ = nearest_sharer(target, sharers[[0, 2, 1, 3]])   # the same tie the other way round
    assert index == 1
    assert nearest_sharer(np.array([0.0, 0.0, 1.0]), sharers)[0] == 0


def test_nearest_sharer_refuses_vectors_without_a_direction():
    with pytest.raises(PerpcsError, match="target user"):
        nearest_sharer(np.zeros(2), np.eye(2))
    with pytest.raises(PerpcsError, match="sharer #1"):
        nearest_sharer(np.ones(2), np.array([[1.0, 0.0], [np.nan, 1.0]]))


def test_random_sharer_is_seeded_per_user():
    uids = [f"u{i}" for i in range(40)]
    draws = {seed: [random_sharer(u, 3, seed) for u in uids] for seed in range(4)}
    assert draws[0] == [random_sharer(u, 3, 0) for u in uids]             # the same draws for one seed
    assert len({tuple(d) for d in draws.values()}) == 4                   # other seeds, other draws
    assert set(draws[0]) == {0, 1, 2}                                     # every sharer can be drawn
    assert [random_sharer(u, 3, 0) for u in reversed(uids)] == draws[0][::-1]   # not the order of the users


# ---- stage 5 on the tiny pipeline ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def retrieval(pipe, tmp_path_factory):
    """output/<task>/ with both PEFT-retrieval controls (each run once, --seed 0)."""
    root = tmp_path_factory.mktemp("retrieval") / TASK
    logs = {}
    for control in RETRIEVAL:
        buf = io.StringIO()
        with redirect_stdout(buf):
            lora_composition.main(pipe.compose_args(root / control_dir_name(control)) + ["--control", control])
        logs[control] = buf.getvalue()
    return root, logs


def recipe(root, uid) -> dict:
    return json.loads((root / "recipes" / f"user_{uid}.json").read_text())


def check_one_sharer_run(pipe, root, control, tmp_path) -> dict:
    """Every user's recipe holds one sharer, weight 1 in every piece; its materialized adapter is that sharer's
    adapter, tensor for tensor; predictions, prediction files and summary are written. Returns {user: sharer}."""
    from perpcs.method.recipes import materialize
    sharers = pipe.sharer_ids()
    per_pcs = recipe(pipe.composition, pipe.test_ids()[0])
    chosen = {}
    for uid in pipe.test_ids():
        r = recipe(root, uid)
        sharer = r["sharer"]
        assert r["control"] == control and r["sharers"] == sharers and sharers[r["sharer_index"]] == sharer
        assert set(r["pieces"]) == set(per_pcs["pieces"])
        assert all(entries == [[sharer, 1.0]] for entries in r["pieces"].values())   # 1 on it, 0 elsewhere
        out = materialize(root / "recipes" / f"user_{uid}.json", pipe.anchor_peft, tmp_path / control / uid)
        mine = load_file(str(out / "adapter_model.safetensors"))
        theirs = load_file(str(pipe.anchor_peft / f"user_{sharer}" / "adapter_model.safetensors"))
        assert set(mine) == set(theirs)
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), key
        assert (root / "user_predictions" / f"user_{uid}.json").is_file()
        chosen[uid] = sharer
    assert sorted(p.name for p in (root / "predictions").glob("*.json")) == \
        sorted(p.name for p in (pipe.composition / "predictions").glob("*.json"))
    summary = json.loads((root / "summary.json").read_text())
    assert summary["n_users"] == len(pipe.test_ids()) and summary["mean"]["sharers_per_piece"] == 1.0
    assert summary["mean"]["payload_bytes"] > 0
    return chosen


def test_nearest_sharer_gives_each_user_the_sharer_with_the_most_similar_history(pipe, retrieval, tmp_path):
    from perpcs.data.tasks import get_task
    from perpcs.stages.common import load_sharers
    from perpcs.models.encoder import default_encoder_path, embed_users, load_encoder
    root = retrieval[0] / control_dir_name("nearest_sharer")
    chosen = check_one_sharer_run(pipe, root, "nearest_sharer", tmp_path)
    # by hand: stage 2's encoder (the index has none: most_active; so the bundled MiniLM) on the same histories
    task = get_task(TASK)
    tokenizer, model = load_encoder(default_encoder_path(), torch.device("cpu"))
    sharer_users = [u for _, u in load_sharers(pipe.anchor_idx, pipe.layout.candidate_users, task)]
    sharer_vecs = embed_users(sharer_users, task, tokenizer, model).astype(np.float64)
    targets = {str(u["user_id"]): u for u in json.loads(pipe.layout.test_users.read_text())}
    for uid, sharer in chosen.items():
        r = recipe(root, uid)
        assert r["encoder"] == str(default_encoder_path())
        assert list(r["cosines"]) == pipe.sharer_ids()
        vec = embed_users([targets[uid]], task, tokenizer, model)[0].astype(np.float64)
        hand = sharer_vecs @ vec / (np.linalg.norm(sharer_vecs, axis=1) * np.linalg.norm(vec))
        np.testing.assert_allclose(list(r["cosines"].values()), hand, rtol=1e-4, atol=1e-4)   # CPU vs --device
        assert sharer == pipe.sharer_ids()[int(np.argmax(list(r["cosines"].values())))]
        assert r["inputs"]["encoder_sha256"]
    manifest = json.loads((root / "run_manifest.json").read_text())
    assert manifest["settings"]["control"] == "nearest_sharer" and manifest["settings"]["encoder_max_length"] == 512
    assert manifest["inputs"]["encoder_sha256"] == recipe(root, pipe.test_ids()[0])["inputs"]["encoder_sha256"]
    assert "assembly_seconds" in json.loads((root / "users_log.jsonl").read_text().splitlines()[0])


def test_random_sharer_draws_each_users_sharer_from_the_seed(pipe, retrieval, tmp_path):
    root = retrieval[0] / control_dir_name("random_sharer")
    chosen = check_one_sharer_run(pipe, root, "random_sharer", tmp_path)
    n = len(pipe.sharer_ids())
    assert chosen == {uid: pipe.sharer_ids()[random_sharer(uid, n, 0)] for uid in pipe.test_ids()}   # --seed 0
    manifest = json.loads((root / "run_manifest.json").read_text())
    assert manifest["settings"]["control"] == "random_sharer" and manifest["settings"]["compose"]["seed"] == 0
    assert "encoder_sha256" not in manifest["inputs"]


def test_resume_and_refusals(pipe, retrieval, tmp_path, capsys):
    from pipeline_fixture import file_digests, run_stage
    nearest = tmp_path / "nearest"
    shutil.copytree(retrieval[0] / control_dir_name("nearest_sharer"), nearest)
    before = file_digests(nearest / "recipes")
    run_stage(lora_composition.main, pipe.compose_args(nearest) + ["--control", "nearest_sharer"], capsys)
    assert file_digests(nearest / "recipes") == before                 # resumed: nobody redone
    # another encoder (the MiniLM's files with another config: other files, another digest) is refused
    from perpcs.models.encoder import default_encoder_path
    other = tmp_path / "encoder"
    other.mkdir()
    for f in default_encoder_path().iterdir():
        if f.is_file():
            (other / f.name).symlink_to(f)
    (other / "config.json").unlink()
    config = json.loads((default_encoder_path() / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "note": "another encoder"}))
    msg = cli_error(lora_composition.main, pipe.compose_args(nearest) + ["--control", "nearest_sharer",
                                                                          "--encoder", str(other)], capsys)
    assert "inputs.encoder_sha256" in msg and "--overwrite" in msg
    msg = cli_error(lora_composition.main, pipe.compose_args(nearest) + ["--control", "random_sharer"], capsys)
    assert 'settings.control "nearest_sharer" -> "random_sharer"' in msg
    # without the folder's record, each recipe still says which control and encoder made it
    (nearest / "run_manifest.json").unlink()
    msg = cli_error(lora_composition.main, pipe.compose_args(nearest) + ["--control", "nearest_sharer",
                                                                          "--encoder", str(other)], capsys)
    assert "encoder" in msg and "--overwrite" in msg

    drawn = tmp_path / "random"
    shutil.copytree(retrieval[0] / control_dir_name("random_sharer"), drawn)
    msg = cli_error(lora_composition.main, pipe.compose_args(drawn) + ["--control", "random_sharer", "--seed", "1"],
                    capsys)
    assert "settings.compose.seed 0 -> 1" in msg and "--overwrite" in msg
    msg = cli_error(lora_composition.main, pipe.compose_args(tmp_path / "x") + ["--encoder", str(other)], capsys)
    assert "--encoder is read by --control nearest_sharer only" in msg


def test_report_shows_the_peft_retrieval_rows(pipe, retrieval):
    from perpcs.evaluation.report import results_table
    root = retrieval[0]
    assert set(RETRIEVAL) <= set(CONTROLS)
    shutil.copytree(pipe.root / "task-base_LLM" / "predictions", root / "task-base_LLM" / "predictions",
                    dirs_exist_ok=True)
    table = results_table(TASK, pipe.data, root)
    rows = [line.split("|")[1].strip() for line in table.splitlines() if "| no retrieval |" in line]
    assert rows == ["task LoRA (non-personalized)", "PEFT retrieval (nearest sharer)",
                    "PEFT retrieval (random sharer)"]
    assert "the paper's are unpublished" in table


def test_demo_runs_both_peft_retrieval_rows_after_the_controls(tmp_path):
    from test_gen_len import demo_commands
    commands = demo_commands(tmp_path, TASK)
    controls = [argv[argv.index("--control") + 1] for argv in commands
                if argv[0] == "lora_composition.py" and "--control" in argv]
    assert controls == ["uniform", "swapped", "peft_merge", "nearest_sharer", "random_sharer"] == list(CONTROLS)
