"""Stage 2, sharer selection: k-means + most active user per cluster, the other strategies, the MiniLM
embeddings (padding-free mean pooling, per-user average), the script and the index reader."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from perpcs.anchors import (EMB_FILE, EMB_META_FILE, INDEX_FILE, default_encoder_path, default_output_dir,
                            embed_texts, embed_users, load_anchor_index, load_encoder, run_anchor_selection,
                            select_sharers)
from perpcs.errors import PerpcsError
from perpcs.prompts import history_string
from perpcs.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "anchor_selection" / "history_anchor.py"
MOVIE = get_task("movie_tagging")


def blobs(lengths_per_blob, seed=0):
    """Users in well-separated 2-D blobs; returns (embeddings, lengths, blob of each user)."""
    rng = np.random.default_rng(seed)
    centres = [(0.0, 0.0), (100.0, 0.0), (0.0, 100.0), (100.0, 100.0)]
    emb, lengths, blob = [], [], []
    for b, blob_lengths in enumerate(lengths_per_blob):
        for n in blob_lengths:
            emb.append(np.array(centres[b]) + rng.normal(0, 1, 2))
            lengths.append(n)
            blob.append(b)
    # Interleave the blobs so candidate order says nothing about the clusters.
    order = rng.permutation(len(lengths))
    return (np.array(emb, dtype=np.float32)[order], [lengths[i] for i in order], [blob[i] for i in order])


def longest_per_blob(lengths, blob, min_history):
    best = {}
    for i, (n, b) in enumerate(zip(lengths, blob)):
        if b not in best or n > lengths[best[b]]:     # strict: ties keep the lower index
            best[b] = i
    return sorted(i for i in best.values() if lengths[i] > min_history)


# ---- select_sharers -------------------------------------------------------------------------------

def test_cluster_keeps_the_longest_history_of_each_cluster():
    emb, lengths, blob = blobs([[12, 30, 15, 11], [40, 20, 13], [25, 14, 50, 16]])
    indices, clusters, dropped = select_sharers(emb, lengths, k=3, strategy="cluster", min_history=10, seed=0)
    assert indices == longest_per_blob(lengths, blob, 10)
    assert sorted(lengths[i] for i in indices) == [30, 40, 50]
    assert len(set(clusters)) == 3 and dropped == []


def test_cluster_ties_go_to_the_lower_candidate_index():
    emb, lengths, blob = blobs([[20, 20, 20], [30, 12]])
    indices, _, _ = select_sharers(emb, lengths, k=2, min_history=10)
    blob0 = [i for i in range(len(lengths)) if blob[i] == 0]
    assert min(blob0) in indices and not (set(blob0) - {min(blob0)}) & set(indices)


def test_cluster_whose_most_active_user_is_too_short_is_dropped():
    emb, lengths, blob = blobs([[12, 30, 15], [40, 20], [9, 10, 3]])   # blob 2: longest has 10 items
    indices, clusters, dropped = select_sharers(emb, lengths, k=3, min_history=10)
    assert indices == longest_per_blob(lengths, blob, 10) and len(indices) == 2
    assert len(dropped) == 1
    short = [i for i in range(len(lengths)) if blob[i] == 2 and lengths[i] == 10][0]
    assert dropped[0]["index"] == short and dropped[0]["history"] == 10
    assert dropped[0]["cluster"] not in clusters
    # With a lower threshold the same cluster keeps its user.
    indices9, _, dropped9 = select_sharers(emb, lengths, k=3, min_history=9)
    assert short in indices9 and dropped9 == []


def test_empty_history_rows_are_left_out_of_kmeans():
    emb, lengths, blob = blobs([[12, 30], [40, 20]])
    emb = np.vstack([emb, np.full((1, 2), np.nan, dtype=np.float32)])
    indices, _, _ = select_sharers(emb, lengths + [0], k=2, min_history=0)
    assert indices == longest_per_blob(lengths, blob, 0)


def test_most_active_takes_the_k_longest_histories_across_clusters():
    emb, lengths, blob = blobs([[12, 90, 80, 11], [40, 20], [25, 5]])
    indices, clusters, dropped = select_sharers(emb, lengths, k=3, strategy="most_active", min_history=10)
    assert sorted(lengths[i] for i in indices) == [40, 80, 90]     # two from blob 0
    assert clusters is None and dropped == []
    assert indices != select_sharers(emb, lengths, k=3, strategy="cluster", min_history=10)[0]
    # min_history still applies: only 2 users have more than 50 items.
    assert sorted(lengths[i] for i in select_sharers(None, lengths, 3, "most_active", 50, 0)[0]) == [80, 90]


def test_random_is_seeded_and_draws_among_users_passing_min_history():
    lengths = [5 + i for i in range(40)]                   # users 0..5 have <= 10 items
    eligible = [i for i in range(40) if lengths[i] > 10]
    first = select_sharers(None, lengths, k=5, strategy="random", min_history=10, seed=3)
    again = select_sharers(None, lengths, k=5, strategy="random", min_history=10, seed=3)
    assert first == again
    assert first[0] == sorted(random.Random(3).sample(eligible, 5))
    assert all(lengths[i] > 10 for i in first[0])
    draws = {tuple(select_sharers(None, lengths, 5, "random", 10, seed)[0]) for seed in range(5)}
    assert len(draws) > 1


def test_selection_errors():
    emb, lengths, _ = blobs([[12, 30], [40]])
    with pytest.raises(PerpcsError, match="3 candidates, fewer than the 4"):
        select_sharers(emb, lengths, k=4)
    with pytest.raises(PerpcsError, match="no candidate has more than --min_history 50"):
        select_sharers(emb, lengths, k=2, min_history=50)
    with pytest.raises(PerpcsError, match="unknown strategy"):
        select_sharers(emb, lengths, k=2, strategy="best")


# ---- embeddings -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    return load_encoder(default_encoder_path(), torch.device("cpu"))


def item(description, tag="comedy"):
    return {"id": description[:8], "description": description, "tag": tag}


def user(uid, descriptions):
    return {"user_id": uid, "profile": [item(d) for d in descriptions], "query": []}


def test_mean_pooling_ignores_padding(minilm):
    tokenizer, model = minilm
    short = user("a", ["A quiet comedy about two friends."])
    long = user("b", ["An epic space opera " + "with battles, empires and betrayals " * 30])
    alone = embed_users([short], MOVIE, tokenizer, model, batch_size=8)
    batched = embed_users([short, long], MOVIE, tokenizer, model, batch_size=8)
    assert len(tokenizer(history_string(MOVIE, long["profile"][0]))["input_ids"]) > 100   # real padding
    np.testing.assert_allclose(batched[0], alone[0], rtol=0, atol=1e-5)
    assert np.abs(batched[1] - batched[0]).max() > 1e-2


def test_user_vector_is_the_mean_of_its_items(minilm):
    tokenizer, model = minilm
    texts = ["A heist goes wrong in Paris.", "Robots learn to love on a distant planet and sing about it.",
             "A detective story."]
    users = [user("multi", texts), {"user_id": "empty", "profile": [], "query": []}, user("one", texts[:1])]
    emb = embed_users(users, MOVIE, tokenizer, model, batch_size=2)
    items = embed_texts([history_string(MOVIE, item(t)) for t in texts], tokenizer, model, batch_size=1)
    assert emb.shape == (3, model.config.hidden_size) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[0], items.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(emb[2], items[0], atol=1e-5)
    assert np.isnan(emb[1]).all()


# ---- the script and the index file ----------------------------------------------------------------

THEMES = [["space", "alien", "robot", "laser"], ["love", "kiss", "wedding", "heart"],
          ["murder", "police", "detective", "gun"]]


def write_candidates(path, n_users=9):
    rng = random.Random(0)
    users = []
    for u in range(n_users):
        theme = THEMES[u % 3]
        profile = [{"id": f"{u}_{i}", "description": " ".join(rng.choice(theme) for _ in range(12)),
                    "tag": "sci-fi"} for i in range(2 + 2 * u)]
        users.append({"user_id": f"user{u}", "profile": profile, "query": []})
    path.write_text(json.dumps(users))
    return users


def run_script(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_script_from_repo_root_and_from_anchor_selection(tmp_path):
    cand = tmp_path / "cand.json"
    users = write_candidates(cand)
    out = tmp_path / "out"
    res = run_script("--candidate_path", str(cand), "--task_name", "movie_tagging", "--k", "3",
                     "--min_history", "5", "--output_dir", str(out))
    assert res.returncode == 0, res.stderr
    index = load_anchor_index(out / INDEX_FILE, users)
    # The themes are the clusters; the last user of each theme has the longest history.
    assert index["indices"] == [6, 7, 8] and index["user_ids"] == ["user6", "user7", "user8"]
    assert sorted(index["clusters"]) == [0, 1, 2]
    assert (index["task"], index["strategy"], index["k"], index["seed"]) == ("movie_tagging", "cluster", 3, 0)
    assert index["candidate_path"] == str(cand.resolve())
    emb = np.load(out / EMB_FILE)
    assert emb.shape == (9, 384) and emb.dtype == np.float32
    assert "kept: 3" in res.stdout and "user7" in res.stdout

    # From inside anchor_selection/ with a relative candidate path (as the seed README does): same
    # candidate file and encoder, so the embeddings are reused; k=4 clusters one theme twice.
    rel = os.path.relpath(cand, REPO / "anchor_selection")
    res2 = run_script("--candidate_path", rel, "--task_name", "movie_tagging", "--k", "4",
                      "--min_history", "5", "--output_dir", str(out), cwd=REPO / "anchor_selection")
    assert res2.returncode == 0, res2.stderr
    assert "reusing embeddings" in res2.stdout
    index2 = load_anchor_index(out / INDEX_FILE, users)
    assert index2["k"] == 4 and {6, 7, 8} <= set(index2["indices"])
    np.testing.assert_array_equal(np.load(out / EMB_FILE), emb)


def test_changed_candidate_file_is_re_embedded(tmp_path):
    cand = tmp_path / "cand.json"
    write_candidates(cand)
    out = tmp_path / "out"
    run_anchor_selection("movie_tagging", cand, out, k=3, min_history=5, device="cpu")
    first = json.loads((out / EMB_META_FILE).read_text())["candidate_sha256"]
    users = write_candidates(cand, n_users=6)
    index = run_anchor_selection("movie_tagging", cand, out, k=3, min_history=5, device="cpu")
    assert json.loads((out / EMB_META_FILE).read_text())["candidate_sha256"] != first
    assert np.load(out / EMB_FILE).shape[0] == 6
    assert index["user_ids"] == ["user3", "user4", "user5"] and len(users) == 6


def test_fewer_candidates_than_clusters_exits_2_naming_both_numbers(tmp_path):
    cand = tmp_path / "cand.json"
    write_candidates(cand, n_users=4)
    res = run_script("--candidate_path", str(cand), "--task_name", "movie_tagging", "--k", "5",
                     "--output_dir", str(tmp_path / "out"))
    assert res.returncode == 2
    assert "4 candidates" in res.stderr and "5 clusters" in res.stderr and str(cand) in res.stderr
    assert not (tmp_path / "out" / INDEX_FILE).exists()


def test_no_candidate_passing_min_history_is_an_error(tmp_path):
    cand = tmp_path / "cand.json"
    write_candidates(cand, n_users=4)                      # at most 8 items each
    with pytest.raises(PerpcsError, match="--min_history 10"):
        run_anchor_selection("movie_tagging", cand, tmp_path / "out", k=2, strategy="most_active")


def test_default_output_dir_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_output_dir(MOVIE) == REPO / "anchor_selection" / "movie_tagging"


GOOD_INDEX = {"task": "movie_tagging", "strategy": "cluster", "k": 2, "seed": 0, "candidate_path": "c.json",
              "indices": [1, 3], "user_ids": ["u1", "u3"], "clusters": [1, 0]}


@pytest.mark.parametrize("change, message", [
    ({"indices": None}, "'indices' must be a list"),
    ({"indices": []}, "empty"),
    ({"indices": [1, -3]}, "non-negative"),
    ({"indices": [1, 1]}, "repeats"),
    ({"user_ids": ["u1"]}, "one user id per index"),
    ({"clusters": [0]}, "'clusters'"),
    ({"k": "2"}, "'k' must be a int"),
])
def test_load_anchor_index_rejects_malformed_files(tmp_path, change, message):
    path = tmp_path / INDEX_FILE
    path.write_text(json.dumps(GOOD_INDEX))
    assert load_anchor_index(path)["indices"] == [1, 3]
    path.write_text(json.dumps({**GOOD_INDEX, **change}))
    with pytest.raises(PerpcsError, match=message):
        load_anchor_index(path)


def test_load_anchor_index_checks_the_candidate_file(tmp_path):
    path = tmp_path / INDEX_FILE
    path.write_text(json.dumps({k: v for k, v in GOOD_INDEX.items() if k != "task"}))
    with pytest.raises(PerpcsError, match="missing field 'task'"):
        load_anchor_index(path)
    path.write_text("{not json")
    with pytest.raises(PerpcsError, match="malformed JSON"):
        load_anchor_index(path)
    path.write_text(json.dumps(GOOD_INDEX))
    users = [{"user_id": f"u{i}", "profile": [], "query": []} for i in range(4)]
    assert load_anchor_index(path, users)["user_ids"] == ["u1", "u3"]
    with pytest.raises(PerpcsError, match="another candidate file"):
        load_anchor_index(path, users[::-1])
    with pytest.raises(PerpcsError, match="out of range"):
        load_anchor_index(path, users[:2])
