"""User-blind controls of stage 5 (`lora_composition.py --control`): the same sharers, pieces and prediction code
as Per-Pcs, only other weights, so that Per-Pcs personalizes where it beats them.

    uniform     every piece the plain average of all sharers' pieces: weight 1/n for each of the n sharers, A and
                B mixed as Per-Pcs mixes them (sum_s w_s A_s, sum_s w_s B_s); the same adapter for every user
    swapped     user u's LoRA assembled (the gated Per-Pcs assembly) from the history of another target user,
                its partner in a seeded derangement of the test users (derangement below)
    peft_merge  the sharer adapters merged by peft's add_weighted_adapter, weights 1/n, combination_type "linear",
                as peft users build it (peft_merged_model); the same adapter for every user

PEFT retrieval (our definitions; the paper's "PEFT retrieval" baselines are unpublished): each user gets one
sharer's WHOLE LoRA, weight 1 on every piece of that sharer and 0 on every other sharer's.

    nearest_sharer  the sharer whose history is most similar to the user's: the highest cosine between mean
                    history embeddings (stage 2's encoder and item text), ties to the lower sharer index
                    (nearest_sharer below)
    random_sharer   a sharer drawn per user from random.Random(user_seed(--seed, user)) (random_sharer below)

peft's "linear" rule (peft 0.21, tuners/lora/model.py, _generalized_task_arithmetic_weighted_adapter): with c the
sharers' scaling (lora_alpha / r), A' = sum_s sqrt(w_s c) A_s and B' = sum_s sqrt(w_s c) B_s, and the new adapter
gets lora_alpha = r (scaling 1). With w_s = 1/n: A' = sqrt(c n) mean(A), B' = sqrt(c n) mean(B), so its update
B'A' = n * c * mean(B) mean(A) is exactly n times the uniform mix's update c * mean(B) mean(A).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from perpcs.engine.training import user_seed
from perpcs.errors import fail
from perpcs.method.pieces import PiecePool
from perpcs.paths import user_file_name

PEFT_COMBINATION = "linear"
MERGED_ADAPTER = "default"   # peft saves the adapter named "default" at the top of the output dir
ONE_SHARER = ("nearest_sharer", "random_sharer")   # the PEFT-retrieval controls: one sharer's whole LoRA per user


def uniform_weights(pool: PiecePool) -> dict:
    """{piece: (S,) weights 1/S}: every sharer equally in every piece."""
    n = len(pool)
    return {piece: torch.full((n,), 1.0 / n, dtype=torch.float64) for piece in pool.pieces}


def one_sharer_weights(pool: PiecePool, index: int) -> dict:
    """{piece: (S,) weights}: 1.0 on sharer ``index`` in every piece, 0 on every other sharer (its whole LoRA)."""
    weights = {}
    for piece in pool.pieces:
        w = torch.zeros(len(pool), dtype=torch.float64)
        w[index] = 1.0
        weights[piece] = w
    return weights


def nearest_sharer(target, sharers) -> tuple:
    """(index of the nearest sharer, [cosine to every sharer]): the highest cosine similarity between the target
    user's vector ``target`` (d,) and each row of ``sharers`` (S, d), computed in float64; an exact tie goes to
    the lower sharer index (the first maximum). Cosine, not Euclidean distance: the length of a mean embedding
    is not a similarity of histories. A zero or non-finite vector has no direction: an error."""
    target = np.asarray(target, dtype=np.float64)
    sharers = np.asarray(sharers, dtype=np.float64)
    if target.ndim != 1 or sharers.ndim != 2 or sharers.shape[1] != target.shape[0] or sharers.shape[0] == 0:
        fail(f"nearest sharer: a ({target.shape}) vector against sharer rows of shape {sharers.shape}")
    norms = np.linalg.norm(sharers, axis=1)
    t_norm = float(np.linalg.norm(target))
    if not np.isfinite(target).all() or t_norm == 0.0:
        fail("nearest sharer: the target user's history embedding is zero or not finite")
    bad = [i for i in range(len(sharers)) if not np.isfinite(sharers[i]).all() or norms[i] == 0.0]
    if bad:
        fail(f"nearest sharer: the history embedding of sharer #{bad[0]} is zero or not finite")
    cosines = [float(c) for c in (sharers @ target) / (norms * t_norm)]
    best = max(range(len(cosines)), key=lambda i: (cosines[i], -i))   # the highest; of equals, the lowest index
    return best, cosines


def random_sharer(uid, n_sharers: int, seed: int) -> int:
    """The index of the sharer drawn for user ``uid``: random.Random(user_seed(seed, uid)).randrange(n_sharers),
    seeded per user (as Per-Pcs's assembly is), so a user's draw does not depend on the other test users, their
    order or the shard; the same on every run for one --seed."""
    if n_sharers < 1:
        fail("random sharer: no sharers to draw from")
    return random.Random(user_seed(seed, str(uid))).randrange(n_sharers)


def derangement(uids: list, seed: int) -> dict:
    """{user: partner whose history assembles the user's LoRA}, no user its own partner.

    Sattolo's shuffle (a uniformly drawn single-cycle permutation, always a derangement) of the users in test-file
    order, drawn from random.Random(seed) with seed the stage's --seed: the same pairs on every run, shard and
    device."""
    uids = [str(u) for u in uids]
    if len(set(uids)) != len(uids):
        fail("--control swapped: the test users' ids are not distinct")
    if len(uids) < 2:
        fail(f"--control swapped needs at least 2 test users to swap histories (there are {len(uids)})")
    perm = list(range(len(uids)))
    rnd = random.Random(seed)
    for i in range(len(perm) - 1, 0, -1):
        j = rnd.randrange(i)   # j < i: Sattolo (j <= i would be Fisher-Yates, with fixed points)
        perm[i], perm[j] = perm[j], perm[i]
    return {uids[i]: uids[perm[i]] for i in range(len(uids))}


def peft_merged_model(model, pool: PiecePool):
    """``model`` (base + task model) as a PeftModel holding every sharer adapter of the pool, loaded from its dir,
    and their add_weighted_adapter merge (weights 1/n, PEFT_COMBINATION) as the active adapter MERGED_ADAPTER."""
    from peft import PeftModel
    names = [f"sharer_{uid}" for uid in pool.sharer_ids]
    dirs = [pool.anchor_dir / user_file_name(uid) for uid in pool.sharer_ids]
    peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
    for name, path in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    n = len(names)
    peft_model.add_weighted_adapter(names, [1.0 / n] * n, MERGED_ADAPTER, combination_type=PEFT_COMBINATION)
    peft_model.set_adapter(MERGED_ADAPTER)
    for name in names:   # only the merge predicts
        peft_model.delete_adapter(name)
    peft_model.eval()
    return peft_model
