"""Stage 2's choice of sharers ("anchors") among the candidates (docs/method.md section 5, "Sharer selection").

k-means groups the candidates' history embeddings (models/encoder.py); the most active user of each cluster
(longest history, ties: lower candidate index) becomes a sharer if that history has more than ``min_history``
items. A candidate with an empty history has a NaN embedding row: it is left out of k-means and can never be a
sharer (no strategy keeps a user with <= min_history >= 0 items). Two controls need no embeddings: the
most_active users, and a seeded random draw.
"""
from __future__ import annotations

import random

import numpy as np

from perpcs.errors import fail

STRATEGIES = ("cluster", "most_active", "random")
KMEANS_N_INIT = 10          # k-means restarts; the best of 10 (by inertia) is kept
KMEANS_MAX_ITER = 3000      # as the authors' selection script (sklearn's default is 300)


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
