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


# ---------------------------------------------------------------------------------- the pooled vectors

def load_pooled(scores_dir, users=None) -> list:
    """[(user id, {piece: float64 numpy vector})] of the ``user_*.safetensors`` pooled vectors in scores_dir
    (lora_composition.py --save_scores; sorted by name); with users, only theirs. They must share their pieces
    and widths."""
    import json

    import numpy as np
    from safetensors import safe_open

    from perpcs.method.recipes import POOLED_FORMAT, POOLED_METADATA
    out = []
    for path in sorted(Path(scores_dir).glob("user_*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get(POOLED_METADATA, "{}"))
                vectors = {name: f.get_tensor(name).astype(np.float64) for name in f.keys()}
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, bad JSON: the file is named
            fail(f"{path}: not a readable pooled-vectors file ({err}); run lora_composition.py --save_scores again")
        if meta.get("format") != POOLED_FORMAT:
            fail(f"{path}: not a pooled-vectors file (format {POOLED_FORMAT!r}, written by lora_composition.py "
                 f"--save_scores)")
        if users is None or str(meta.get("user_id")) in users:
            out.append((str(meta.get("user_id")), vectors, path))
    for uid, vectors, path in out:
        first = out[0]
        if sorted(vectors) != sorted(first[1]) or any(v.shape != first[1][p].shape for p, v in vectors.items()):
            fail(f"{path}: other pieces or widths than {first[2]} (pooled vectors of two runs in one dir?)")
    return [(uid, vectors) for uid, vectors, _ in out]


def pooled_spread(users: list) -> dict | None:
    """How user-specific the evidence is: per piece, over the users' pooled vectors v_u with mean m,
    spread = sqrt(mean_u ||v_u - m||^2) / ||m|| (0: every user the same) and the mean cosine over pairs of users
    (1: the same direction); each averaged over pieces, and per layer. None for fewer than two users."""
    import numpy as np

    from perpcs.models.families import layer_index
    if len(users) < 2:
        return None
    per_piece = {}
    for piece in users[0][1]:
        V = np.stack([vectors[piece] for _, vectors in users])           # (U, d)
        mean = V.mean(0)
        norm = float(np.linalg.norm(mean))
        spread = math.sqrt(float((np.linalg.norm(V - mean, axis=1) ** 2).mean())) / norm if norm > 0 else None
        lengths = np.linalg.norm(V, axis=1)
        unit = V / np.where(lengths > 0, lengths, 1.0)[:, None]
        cos = unit @ unit.T
        pairs = [(a, b) for a in range(len(V)) for b in range(a + 1, len(V))]
        per_piece[piece] = {"spread": spread, "cosine": sum(float(cos[a, b]) for a, b in pairs) / len(pairs)}
    layers: dict = {}
    for piece, v in per_piece.items():
        layers.setdefault(layer_index(piece), []).append(v)

    def mean_of(items, key):
        known = [v[key] for v in items if v[key] is not None]
        return sum(known) / len(known) if known else None
    return {"users": [uid for uid, _ in users], "pieces": len(per_piece),
            "spread": mean_of(per_piece.values(), "spread"), "cosine": mean_of(per_piece.values(), "cosine"),
            "per_layer": {str(la): {"spread": mean_of(vs, "spread"), "cosine": mean_of(vs, "cosine")}
                          for la, vs in sorted(layers.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))},
            "per_piece": per_piece}


def format_pooled(p: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    def num(v):
        return "-" if v is None else f"{v:.4f}"
    lines = ["## how user-specific is the evidence: the users' pooled vectors", "",
             f"The pooled vector of a user at a piece is what the gate scores are made from: the mean over the "
             f"user's batches of the normalised module input at the answer positions (lora_composition.py "
             f"--save_scores). Over {len(p['users'])} target users and {p['pieces']} pieces:", "",
             f"- spread around the users' mean (RMS of ||v_u - mean|| / ||mean||): {pct(p['spread'])}; mean "
             f"pairwise cosine: {num(p['cosine'])}. A spread of a few percent and a cosine near 1 mean every user "
             "brings about the same evidence: a sharer's score is then nearly a fixed offset, and the same sharer "
             "wins for everyone.", "", "| layer | spread | pairwise cosine |", "|---|---|---|"]
    lines += [f"| {la} | {pct(v['spread'])} | {num(v['cosine'])} |" for la, v in p["per_layer"].items()]
    return "\n".join(lines) + "\n"
