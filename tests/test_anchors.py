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

from perpcs.paths import EMB_FILE, EMB_META_FILE, INDEX_FILE, default_selection_dir
from perpcs.method.clustering import select_sharers
from perpcs.models.encoder import default_encoder_path, embed_texts, embed_users, load_encoder
from perpcs.stages.sharer_selection import load_sharer_index, run_sharer_selection
from perpcs.errors import PerpcsError
from perpcs.data.prompts import history_string
from perpcs.data.tasks import get_task
from pipeline_fixture import load_script

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
                          timeout=200)   # under pytest.ini's 240 s guard


def test_script_from_repo_root_and_from_anchor_selection(tmp_path):
    cand = tmp_path / "cand.json"
    users = write_candidates(cand)
    out = tmp_path / "out"
    res = run_script("--candidate_path", str(cand), "--task_name", "movie_tagging", "--k", "3",
                     "--min_history", "5", "--output_dir", str(out))
    assert res.returncode == 0, res.stderr
    index = load_sharer_index(out / INDEX_FILE, users)
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
    index2 = load_sharer_index(out / INDEX_FILE, users)
    assert index2["k"] == 4 and {6, 7, 8} <= set(index2["indices"])
    np.testing.assert_array_equal(np.load(out / EMB_FILE), emb)


def test_changed_candidate_file_is_re_embedded(tmp_path):
    cand = tmp_path / "cand.json"
    write_candidates(cand)
    out = tmp_path / "out"
    run_sharer_selection("movie_tagging", cand, out, k=3, min_history=5, device="cpu")
    first = json.loads((out / EMB_META_FILE).read_text())["candidate_sha256"]
    users = write_candidates(cand, n_users=6)
    index = run_sharer_selection("movie_tagging", cand, out, k=3, min_history=5, device="cpu")
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
        run_sharer_selection("movie_tagging", cand, tmp_path / "out", k=2, strategy="most_active")


def test_default_selection_dir_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_selection_dir(MOVIE) == REPO / "anchor_selection" / "movie_tagging"


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
    assert load_sharer_index(path)["indices"] == [1, 3]
    path.write_text(json.dumps({**GOOD_INDEX, **change}))
    with pytest.raises(PerpcsError, match=message):
        load_sharer_index(path)


def test_load_anchor_index_checks_the_candidate_file(tmp_path):
    path = tmp_path / INDEX_FILE
    path.write_text(json.dumps({k: v for k, v in GOOD_INDEX.items() if k != "task"}))
    with pytest.raises(PerpcsError, match="missing field 'task'"):
        load_sharer_index(path)
    path.write_text("{not json")
    with pytest.raises(PerpcsError, match="malformed JSON"):
        load_sharer_index(path)
    path.write_text(json.dumps(GOOD_INDEX))
    users = [{"user_id": f"u{i}", "profile": [], "query": []} for i in range(4)]
    assert load_sharer_index(path, users)["user_ids"] == ["u1", "u3"]
    with pytest.raises(PerpcsError, match="another candidate file"):
        load_sharer_index(path, users[::-1])
    with pytest.raises(PerpcsError, match="out of range"):
        load_sharer_index(path, users[:2])


# ---- any Hugging Face encoder (docs/method.md section 5: the paper's is DeBERTa-v3-large) ----------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ENCODER_WORDS = sorted({w for theme in THEMES for w in theme} | {"description", "tag", "sci", "fi"})


def build_tiny_bert(directory: Path, seed: int):
    """A random 2-layer BERT and a WordPiece tokenizer over a small vocabulary (unknown words fall back to
    letters), saved to ``directory``; returns the in-memory (tokenizer, model)."""
    from transformers import BertConfig, BertModel, BertTokenizer
    pieces = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", "-", ".", ","] + ENCODER_WORDS + list(LETTERS)
              + ["##" + c for c in LETTERS])
    tokenizer = BertTokenizer(vocab={p: i for i, p in enumerate(pieces)})
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(pieces), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=512)).eval()
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return tokenizer, model


def train_tiny_spm() -> bytes:
    """A small SentencePiece unigram model laid out as DeBERTa-v3's spm.model ([PAD] [UNK] [CLS] [SEP] [MASK])."""
    import io

    import sentencepiece
    rng = random.Random(0)
    lines = [" ".join(rng.choice(ENCODER_WORDS) for _ in range(8)) for _ in range(300)]
    lines += [" ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6))) for _ in range(8))
              for _ in range(300)]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=120, hard_vocab_limit=False, model_type="unigram",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]",
        eos_piece="[SEP]", user_defined_symbols=["[MASK]"], minloglevel=2)
    return out.getvalue()


def tiny_deberta_model(vocab_size: int, seed: int):
    from transformers import DebertaV2Config, DebertaV2Model
    torch.manual_seed(seed)
    # DeBERTa-v3's attention (relative positions in 256 buckets, no absolute positions), tiny sizes.
    config = DebertaV2Config(vocab_size=vocab_size, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=48, max_position_embeddings=512, relative_attention=True,
                             position_buckets=256, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                             share_att_key=True, position_biased_input=False, type_vocab_size=0)
    return DebertaV2Model(config).eval()


def build_tiny_deberta(directory: Path, seed: int):
    """A random 2-layer DeBERTa-v2/v3 and its tokenizer (the unigram vocabulary of a SentencePiece model trained
    here, read without protobuf), saved to ``directory`` with tokenizer.json, as save_pretrained writes it."""
    import sentencepiece
    from transformers import DebertaV2Tokenizer
    proto = train_tiny_spm()
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = DebertaV2Tokenizer(vocab=vocab, unk_id=sp.unk_id())
    model = tiny_deberta_model(len(vocab), seed)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    (directory / "spm.model").write_bytes(proto)
    return tokenizer, model


BUILDERS = {"bert": build_tiny_bert, "deberta": build_tiny_deberta}


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    """{kind: (directory, tokenizer, model)} for a tiny random BERT and DeBERTa."""
    out = {}
    for kind, build in BUILDERS.items():
        directory = tmp_path_factory.mktemp(f"tiny_{kind}")
        out[kind] = (directory, *build(directory, seed=0))
    return out


def encoder_candidates(path):
    """Histories of different lengths and item lengths (batches are padded), one item longer than 512 tokens."""
    rng = random.Random(1)
    users = []
    for u in range(5):
        profile = []
        for i in range(2 + u):
            words = [rng.choice(THEMES[u % 3]) for _ in range(rng.randint(1, 25))]
            profile.append({"id": f"{u}_{i}", "description": " ".join(words), "tag": "sci-fi"})
        users.append({"user_id": f"user{u}", "profile": profile, "query": []})
    gibberish = " ".join("".join(rng.choice(LETTERS) for _ in range(7)) for _ in range(300))
    users[1]["profile"].append({"id": "long", "description": gibberish, "tag": "comedy"})
    path.write_text(json.dumps(users))
    return users


def reference_user_embeddings(users, tokenizer, model) -> np.ndarray:
    """docs/method.md section 5 written out: each item alone (no padding, so a plain mean is the masked mean), 512 tokens at most,
    mean of the last hidden state over its tokens; then the mean over the user's items."""
    rows = []
    for u in users:
        vectors = []
        for it in u["profile"]:
            text = MOVIE.prompts["retrieval_history"].format(**it)          # items here are under 368 words
            enc = tokenizer(text, truncation=True, max_length=512, return_tensors="pt")
            with torch.no_grad():
                vectors.append(model(**enc).last_hidden_state[0].mean(dim=0).double().numpy())
        rows.append(np.mean(vectors, axis=0))
    return np.array(rows)


def select(cand, out, encoder):
    """``history_anchor.py --encoder <encoder>`` in this process; returns (embeddings, index)."""
    history_anchor = load_script("anchor_selection/history_anchor.py")
    history_anchor.main(["--task_name", "movie_tagging", "--candidate_path", str(cand), "--output_dir", str(out),
                         "--k", "2", "--min_history", "1", "--device", "cpu", "--batch_size", "3",
                         "--encoder", str(encoder)])
    return np.load(out / EMB_FILE), json.loads((out / INDEX_FILE).read_text())


@pytest.mark.parametrize("kind", ["bert", "deberta"])
def test_hf_encoder_directory_is_mean_pooled_per_item_then_averaged(kind, tiny_encoders, tmp_path):
    directory, tokenizer, model = tiny_encoders[kind]
    cand = tmp_path / "cand.json"
    users = encoder_candidates(cand)
    long_text = MOVIE.prompts["retrieval_history"].format(**users[1]["profile"][-1])
    assert len(tokenizer(long_text)["input_ids"]) > 512          # truncated to 512 tokens, by both sides
    emb, index = select(cand, tmp_path / "out", directory)
    assert emb.shape == (5, model.config.hidden_size)
    np.testing.assert_allclose(emb, reference_user_embeddings(users, tokenizer, model), rtol=0, atol=2e-5)
    assert index["encoder"] == str(directory.resolve())
    assert json.loads((tmp_path / "out" / EMB_META_FILE).read_text())["encoder"] == str(directory.resolve())


def test_switching_encoder_re_embeds_even_in_the_same_directory(tiny_encoders, tmp_path, capsys):
    cand = tmp_path / "cand.json"
    users = encoder_candidates(cand)
    out, encoder = tmp_path / "out", tmp_path / "encoder"
    first = reference_user_embeddings(users, *build_tiny_bert(encoder, seed=0))
    np.testing.assert_allclose(select(cand, out, encoder)[0], first, atol=2e-5)
    select(cand, out, encoder)
    assert "reusing embeddings" in capsys.readouterr().out

    deberta_dir, tokenizer, model = tiny_encoders["deberta"]
    emb, index = select(cand, out, deberta_dir)
    assert "re-embedding" in capsys.readouterr().out
    np.testing.assert_allclose(emb, reference_user_embeddings(users, tokenizer, model), atol=2e-5)

    # Another model saved where the first one was: same path, other weights.
    select(cand, out, encoder)
    capsys.readouterr()
    second = reference_user_embeddings(users, *build_tiny_bert(encoder, seed=1))
    emb, _ = select(cand, out, encoder)
    assert "re-embedding" in capsys.readouterr().out
    assert np.abs(second - first).max() > 1e-3
    np.testing.assert_allclose(emb, second, atol=2e-5)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub's constants with an empty cache (tmp_path/hub); opening a connection fails the test."""
    import socket

    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return constants


def fake_hub_cache(cache: Path, repo_id: str, files_from: Path, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub gives a downloaded model: refs/main -> snapshots/<commit>/ (files are links
    into blobs/)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in files_from.iterdir():
        blob = blobs / f"blob_{f.name}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hub_id_is_read_from_the_local_cache_without_the_network(tiny_encoders, tmp_path, hub, capsys):
    directory, tokenizer, model = tiny_encoders["deberta"]
    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-deberta", directory)
    cand = tmp_path / "cand.json"
    users = encoder_candidates(cand)
    emb, index = select(cand, tmp_path / "out", "tiny-org/tiny-deberta")
    np.testing.assert_allclose(emb, reference_user_embeddings(users, tokenizer, model), atol=2e-5)
    assert index["encoder"] == "tiny-org/tiny-deberta"
    assert "with tiny-org/tiny-deberta on cpu" in capsys.readouterr().out
    # The same files as a local directory are the same encoder: the embeddings are reused.
    select(cand, tmp_path / "out", directory)
    assert "reusing embeddings" in capsys.readouterr().out


def test_unknown_hub_id_fails_naming_it_and_how_to_provide_it(tmp_path, hub):
    assert hub.is_offline_mode()                               # conftest: HF_HUB_OFFLINE=1
    cand = tmp_path / "cand.json"
    encoder_candidates(cand)
    with pytest.raises(PerpcsError) as err:
        select(cand, tmp_path / "out", "nobody/no-such-encoder")
    message = str(err.value)
    assert "'nobody/no-such-encoder' is not a local directory and not in the Hugging Face cache" in message
    assert str(tmp_path / "hub") in message and "models--nobody--no-such-encoder" in message
    assert "HF_HUB_OFFLINE is set" in message and "save_pretrained(DIR)" in message and "--encoder DIR" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(PerpcsError, match=r"--encoder \./nowhere: no such directory"):
        select(cand, tmp_path / "out", "./nowhere")


def test_unreachable_hub_fails_with_the_reason(hub, monkeypatch):
    monkeypatch.setattr(hub, "is_offline_mode", lambda: False)
    import huggingface_hub

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(PerpcsError, match=r"'org/enc' is not a local directory .*downloading it failed "
                                          r"\(ConnectionError: Name or service not known\)"):
        load_encoder("org/enc", torch.device("cpu"))


def test_sentencepiece_only_tokenizer_loads_or_says_what_it_needs(tmp_path):
    """microsoft/deberta-v3-large as published has spm.model and no tokenizer.json; transformers reads that
    with protobuf. Without it the error says so (transformers' own would ask for tiktoken)."""
    from transformers.utils import is_protobuf_available
    directory = tmp_path / "deberta_spm"
    directory.mkdir()
    proto = train_tiny_spm()
    (directory / "spm.model").write_bytes(proto)
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    import sentencepiece
    tiny_deberta_model(sentencepiece.SentencePieceProcessor(model_proto=proto).get_piece_size(), 0).save_pretrained(
        directory)
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401  (what transformers reads spm.model with)
        readable = is_protobuf_available()
    except Exception:
        readable = False
    if readable:
        tokenizer, model = load_encoder(directory, torch.device("cpu"))
        assert embed_texts(["Description: space alien Tag: sci-fi\n"], tokenizer, model).shape == (1, 24)
    else:
        with pytest.raises(PerpcsError, match=r"SentencePiece model without tokenizer\.json.*pip install protobuf"
                                              r".*save_pretrained\(DIR\)"):
            load_encoder(directory, torch.device("cpu"))
