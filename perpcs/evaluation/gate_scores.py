"""Where Per-Pcs's choices come from: the gate scores behind the recipes (``lora_composition.py --save_scores``).

At every piece, stage 5 scores each sharer for a target user and mixes the best ones. Across target users,
a piece's scores form a matrix M[user][sharer]. Take out each user's own mean (a shift common to all of a
user's sharers changes no ranking) and split the rest into

    M[u][s] - mean_s M[u] = offset[s] + interaction[u][s]

offset[s]: the sharer's mean over users, the same for everyone; interaction: what depends on the user. If the
offset is much larger than the interaction, the gates pick the same sharer for every user. Ranking by the
interaction alone ("user-relative": how much more this user scores a sharer than the average target user does)
shows whether the user-dependent part would route users to different sharers, and, with the sample's latent
groups, to sharers of their own group.
"""
from __future__ import annotations

import math
from pathlib import Path

from perpcs.data.layout import read_json
from perpcs.errors import fail
from perpcs.method.recipes import GATE_SCORES_FORMAT


def load_gate_scores(scores_dir, users=None) -> list:
    """[(path, record)] of the ``user_*.json`` score files in scores_dir (sorted by name); with users, only
    theirs. Records must share their sharers and pieces."""
    paths = sorted(Path(scores_dir).glob("user_*.json"))
    out = []
    for path in paths:
        rec = read_json(path, "gate scores")
        if not isinstance(rec, dict) or rec.get("format") != GATE_SCORES_FORMAT or not isinstance(
                rec.get("scores"), dict):
            fail(f"{path}: not a gate scores file (format {GATE_SCORES_FORMAT!r}, written by "
                 f"lora_composition.py --save_scores)")
        if users is None or str(rec.get("user_id")) in users:
            out.append((path, rec))
    for path, rec in out:   # every record, the first one too: as many scores per piece as sharers
        first_path, first = out[0]
        if rec.get("sharers") != first.get("sharers") or list(rec["scores"]) != list(first["scores"]):
            fail(f"{path}: other sharers or pieces than {first_path} (score files of two runs in one dir?)")
        bad = [p for p, v in rec["scores"].items() if len(v) != len(rec.get("sharers") or [])]
        if bad:
            fail(f"{path}: piece {bad[0]} has {len(rec['scores'][bad[0]])} scores for {len(rec['sharers'])} sharers")
    return out


def _argmax(values) -> int:
    """Index of the largest value; ties go to the lower index (as stage 5 breaks them)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def decompose(records: list, groups: dict | None = None) -> dict | None:
    """The offset / interaction split of the scores of two or more users (None for fewer), and what each part
    would route: how often two users' top sharer is the same, and (with groups: read_groups' dict) how often a
    user's top sharer is of the user's own group, next to the user-blind share of the pool."""
    if len(records) < 2:
        return None
    recs = [rec for _, rec in records]
    users = [str(rec["user_id"]) for rec in recs]
    sharers = [str(s) for s in recs[0]["sharers"]]
    pieces = list(recs[0]["scores"])
    U, S = len(users), len(sharers)
    if groups is not None:
        missing = [u for u in users + sharers if u not in groups["users"]]
        if missing:
            fail(f"groups file: no group for user(s) {', '.join(missing[:5])} of the gate scores (a groups file of "
                 f"another sample?)")
    offset_sq = interaction_sq = 0.0
    tops = {"scores": [], "user-relative": []}   # per piece: each user's top sharer
    for piece in pieces:
        M = [[float(v) for v in rec["scores"][piece]] for rec in recs]
        R = [[v - sum(row) / S for v in row] for row in M]
        offset = [sum(R[u][s] for u in range(U)) / U for s in range(S)]
        E = [[R[u][s] - offset[s] for s in range(S)] for u in range(U)]
        offset_sq += sum(c * c for c in offset) / S
        interaction_sq += sum(e * e for row in E for e in row) / (U * S)
        tops["scores"].append([_argmax(row) for row in M])
        tops["user-relative"].append([_argmax(row) for row in E])
    n = len(pieces)
    offset_sd, interaction_sd = math.sqrt(offset_sq / n), math.sqrt(interaction_sq / n)
    pairs = [(a, b) for a in range(U) for b in range(a + 1, U)]
    out = {"users": users, "sharers": sharers, "pieces": n, "offset_sd": offset_sd, "interaction_sd": interaction_sd,
           "ratio": interaction_sd / offset_sd if offset_sd > 0 else None, "ranked_by": {}}
    for name, per_piece in tops.items():
        entry = {"same_top": sum(t[a] == t[b] for t in per_piece for a, b in pairs) / (n * len(pairs))}
        if groups is not None:
            g = groups["users"]
            entry["own_group_top"] = sum(g[sharers[t[u]]] == g[users[u]] for t in per_piece for u in range(U)) / (n * U)
        out["ranked_by"][name] = entry
    if groups is not None:
        g = groups["users"]
        out["own_group_blind"] = sum(sum(g[s] == g[u] for s in sharers) / S for u in users) / U
    return out


def format_gate_scores(d: dict) -> str:
    ratio = f"{d['ratio']:.2f}" if d["ratio"] is not None else "undefined (no offset)"
    lines = ["## where the choices come from: the gate scores", "",
             f"Scores of {len(d['users'])} target users x {len(d['sharers'])} sharers at {d['pieces']} pieces "
             "(lora_composition.py --save_scores). Per piece, each user's scores minus the user's own mean split "
             "into a per-sharer offset (the same for every user) and a user x sharer interaction (what depends "
             "on the user).", "",
             f"- spread of the offset (sd): {d['offset_sd']:.4g}; of the interaction: {d['interaction_sd']:.4g}; "
             f"interaction / offset: {ratio}. Well below 1, the offset decides the ranking: every user gets the "
             "same top sharer at a piece.", "",
             "| ranked by | same top sharer, pairs of users | top sharer of the user's own group |", "|---|---|---|"]
    labels = {"scores": "the scores (what Per-Pcs does)",
              "user-relative": "the interaction (how much more this user scores a sharer than the average user)"}
    for name, e in d["ranked_by"].items():
        own = f"{e['own_group_top']:.1%}" if "own_group_top" in e else "- (no groups file)"
        lines.append(f"| {labels[name]} | {e['same_top']:.1%} | {own} |")
    if "own_group_blind" in d:
        lines += ["", f"A user-blind pick (any sharer of the pool, equally) is of the user's own group "
                      f"{d['own_group_blind']:.1%} of the time."]
    return "\n".join(lines) + "\n"
