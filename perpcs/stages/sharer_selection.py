"""Stage 2: choosing the sharer ("anchor") users among the candidates (docs/method.md section 5, "Sharer selection").

Reads the candidates, embeds them (models/encoder.py; the embeddings cached beside the index and reused while the
candidate file, the encoder's files and the settings match), chooses the sharers (method/clustering.py) and writes
``anchor_user_idx.json``; load_sharer_index reads and checks that index for stages 3-5.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from perpcs.atomic import write_bytes_atomic, write_json_atomic
from perpcs.data.layout import Layout, load_users, read_json, user_id
from perpcs.data.prompts import HISTORY_WORDS
from perpcs.data.tasks import Task, get_task
from perpcs.errors import fail
from perpcs.method.clustering import eligible_candidates, select_sharers
from perpcs.models.encoder import embed_users, encoder_digest, load_encoder, resolve_encoder
from perpcs.models.provenance import file_sha256
from perpcs.paths import (EMB_FILE, EMB_META_FILE, ID_RULE, INDEX_FILE, REPO_ROOT, default_selection_dir,
                          is_safe_id)

EMB_FORMAT = 2              # 2: keyed on the encoder's files (1: on its path)


def default_candidate_path(task: Task) -> Path:
    return Layout(REPO_ROOT / "data", task).candidate_users


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
    from perpcs.stages.config import SharerSelectionStage
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
