"""What a Per-Pcs recipe says about a user's LoRA, in words: which sharers' pieces it took, where, and how
mixed; and, when the sample's latent groups are known, whether the gates routed users to sharers of their own
group (``python -m perpcs explain``, and a line of the report).

A recipe (perpcs/method/recipes.py) lists, for every piece (one LoRA module of one layer), the sharers mixed
into it with their weights; a piece's weights sum to 1 (softmax over the picked sharers, averaged over batches).
"""
from __future__ import annotations

import math
from pathlib import Path

from perpcs.atomic import write_bytes_atomic, write_json_atomic
from perpcs.data.layout import read_json
from perpcs.data.sample import GROUPS_FORMAT
from perpcs.errors import fail
from perpcs.evaluation.figures import pyplot, save_png
from perpcs.method.recipes import RECIPE_FORMAT
from perpcs.models.families import layer_index
from perpcs.paths import user_file_name



def load_recipes(recipe=None, recipes_dir=None) -> list:
    """[(path, recipe)] of one recipe file, or of every ``user_*.json`` in a recipes dir (sorted by name)."""
    if recipe:
        paths = [Path(recipe)]
    else:
        rdir = Path(recipes_dir)
        if not rdir.is_dir():
            fail(f"recipes dir not found: {rdir} (stage 5 writes <output_dir>/recipes/; pass --recipe or "
                 f"--recipes_dir)")
        paths = sorted(rdir.glob("user_*.json"))
        if not paths:
            fail(f"{rdir}: no recipe files (user_<id>.json); run stage 5 (lora_composition.py) first")
    out = []
    for path in paths:
        rec = read_json(path, "recipe")
        if not isinstance(rec, dict) or rec.get("format") != RECIPE_FORMAT or "pieces" not in rec:
            fail(f"{path}: not a Per-Pcs recipe (format {rec.get('format') if isinstance(rec, dict) else None!r}, "
                 f"expected {RECIPE_FORMAT!r} with 'sharers' and 'pieces')")
        out.append((path, rec))
    return out


def piece_location(piece: str) -> tuple:
    """(layer, module) of a piece name such as ``model.layers.3.self_attn.q_proj`` -> (3, "q_proj")."""
    return layer_index(piece), piece.rsplit(".", 1)[-1]   # the layer naming of perpcs/models/families.py


def entropy_bits(masses) -> float:
    """Shannon entropy (base 2, bits) of the distribution proportional to ``masses``."""
    total = sum(masses)
    return -sum(m / total * math.log2(m / total) for m in masses if m > 0) if total > 0 else 0.0


def explain_recipe(recipe: dict) -> dict:
    """The numbers behind one recipe: mass per sharer (sum of its weights over all pieces) and its share of the
    total, the mass per (layer, module) cell and sharer, distinct sharers used, entropy of the mix in bits."""
    sharers = [str(s) for s in recipe.get("sharers", [])]
    mass = {s: 0.0 for s in sharers}
    cells: dict = {}         # (layer, module) -> {sharer: mass}
    for piece, entries in recipe["pieces"].items():
        cell = cells.setdefault(piece_location(piece), {})
        for uid, weight in entries:
            uid = str(uid)
            mass[uid] = mass.get(uid, 0.0) + float(weight)     # a sharer outside the list still counts
            cell[uid] = cell.get(uid, 0.0) + float(weight)
    total = sum(mass.values())
    return {"user_id": str(recipe.get("user_id")), "sharers": list(mass), "n_pieces": len(recipe["pieces"]),
            "total": total, "mass": mass, "share": {s: (m / total if total else 0.0) for s, m in mass.items()},
            "cells": cells, "distinct": sum(1 for m in mass.values() if m > 0), "entropy_bits": entropy_bits(
                list(mass.values()))}


# ------------------------------------------------------------------------------------------------ routing

def read_groups(path) -> dict:
    """{user id: group} and the number of groups from a groups file (data/make_sample.py --groups_file)."""
    obj = read_json(path, "groups file")
    if not isinstance(obj, dict) or obj.get("format") != GROUPS_FORMAT or not isinstance(obj.get("users"), dict):
        fail(f"{path}: not a groups file (format {GROUPS_FORMAT!r}, written by data/make_sample.py --groups_file)")
    return {"users": {str(k): int(v) for k, v in obj["users"].items()},
            "n_groups": int(obj.get("n_groups") or len(set(obj["users"].values())))}


def routing(recipes: list, groups: dict, groups_path="groups file") -> dict:
    """Per target user: the share of its recipe weight on sharers of its own latent group, next to what a
    user-blind mix gives (the uniform mix over the pool: the share of pool sharers in the user's group).
    Means over users, and 1 / number of groups (the user-blind share when groups are balanced)."""
    users = groups["users"]
    per_user = {}
    for path, recipe in recipes:
        info = explain_recipe(recipe)
        uid, pool = info["user_id"], [str(s) for s in recipe.get("sharers", [])]
        missing = [u for u in [uid, *info["sharers"]] if u not in users]
        if missing:
            fail(f"{groups_path}: no group for user(s) {', '.join(missing[:5])} of {path} (a groups file of "
                 f"another sample?)")
        own = users[uid]
        per_user[uid] = {"group": own,
                         "share": (sum(m for s, m in info["mass"].items() if users[s] == own) / info["total"]
                                   if info["total"] else 0.0),
                         "blind": sum(1 for s in pool if users[s] == own) / len(pool) if pool else 0.0}
    n = len(per_user)
    return {"users": per_user, "mean_share": sum(u["share"] for u in per_user.values()) / n if n else None,
            "mean_blind": sum(u["blind"] for u in per_user.values()) / n if n else None,
            "balanced_blind": 1 / groups["n_groups"], "n_groups": groups["n_groups"]}


def routing_lines(recipes_dir, groups_file) -> list:
    """Lines for the results table: the routing share of Per-Pcs's recipes (none when there are no recipes)."""
    rdir = Path(recipes_dir)
    if not rdir.is_dir() or not any(rdir.glob("user_*.json")):
        return []
    recipes = load_recipes(recipes_dir=rdir)
    r = routing(recipes, read_groups(groups_file), groups_file)
    a = agreement(recipes)
    same = (["", f"Do users get different sharers? Two target users have the same dominant sharer in {a['mean_same']:.0%} "
             f"of the pieces on average ({a['min_same']:.0%}-{a['max_same']:.0%} over {len(a['pairs'])} pairs; "
             f"chance {a['mean_chance']:.0%}): near 100% the gates pick by piece, not by user."] if a else [])
    return [f"routing (Per-Pcs): on average {r['mean_share']:.1%} of a target user's recipe weight is on sharers "
            f"of the user's own latent group (groups from {groups_file}; no stage reads it); a user-blind mix "
            f"(every sharer equally) gives {r['mean_blind']:.1%} with this pool, 1/{r['n_groups']} = "
            f"{r['balanced_blind']:.1%} for balanced groups. Per user: "
            + ", ".join(f"{u} {v['share']:.0%}" for u, v in r["users"].items()) + "."] + same


def dominant_sharers(recipe: dict) -> dict:
    """{piece: the sharer with the largest weight in it} (ties: the earlier sharer of the recipe's pool)."""
    order = {str(s): i for i, s in enumerate(recipe.get("sharers", []))}
    return {piece: min(entries, key=lambda e: (-float(e[1]), order.get(str(e[0]), len(order))))[0]
            for piece, entries in recipe["pieces"].items() if entries}


def agreement(recipes: list) -> dict | None:
    """Does the routing depend on the user? For every pair of target users, the share of their common pieces
    whose dominant sharer is the same, next to chance: what the pair would share if each user kept how often
    it makes each sharer dominant but placed those pieces independently of the other user
    (sum over sharers of f_a(s) * f_b(s)). 100% = every user gets the same sharer in every piece (routing
    decided by the piece alone). None for fewer than two recipes."""
    tops = [(str(rec.get("user_id")), dominant_sharers(rec)) for _, rec in recipes]
    pairs = []
    for i in range(len(tops)):
        for j in range(i + 1, len(tops)):
            (ua, a), (ub, b) = tops[i], tops[j]
            common = [p for p in a if p in b]
            if not common:
                continue
            fa = {s: sum(1 for p in common if a[p] == s) / len(common) for s in set(a[p] for p in common)}
            fb = {s: sum(1 for p in common if b[p] == s) / len(common) for s in set(b[p] for p in common)}
            pairs.append({"users": [ua, ub], "pieces": len(common),
                          "same": sum(1 for p in common if a[p] == b[p]) / len(common),
                          "chance": sum(f * fb.get(s, 0.0) for s, f in fa.items())})
    if not pairs:
        return None
    return {"pairs": pairs, "mean_same": sum(p["same"] for p in pairs) / len(pairs),
            "min_same": min(p["same"] for p in pairs), "max_same": max(p["same"] for p in pairs),
            "mean_chance": sum(p["chance"] for p in pairs) / len(pairs)}


# ------------------------------------------------------------------------------------------------ text

def _label(uid: str, groups: dict | None) -> str:
    return f"{uid} (group {groups['users'][uid]})" if groups and uid in groups["users"] else uid


def format_recipe(path, info: dict, groups: dict | None = None) -> str:
    n_pool, total = len(info["sharers"]), info["total"]
    lines = [f"## user {info['user_id']}", "",
             f"Recipe: {path}",
             f"Per-Pcs assembled this user's LoRA from pieces of the sharers' LoRAs. A piece is one LoRA module of "
             f"one layer; this LoRA has {info['n_pieces']} of them, and each is a weighted mix of some sharers' "
             f"pieces (the weights of a piece sum to 1, so the total weight is about the number of pieces: "
             f"{total:.3f}).",
             f"Distinct sharers used: {info['distinct']} of the {n_pool} sharers in the pool.",
             f"Entropy of the mix: {info['entropy_bits']:.3f} bits (base-2 entropy of the mass share per sharer; "
             f"0 = one sharer everywhere, log2({n_pool}) = {math.log2(n_pool) if n_pool else 0:.3f} = every "
             f"sharer equally).", "",
             "Weight mass per sharer (the sum of the sharer's weights over all pieces) and its share of the total:",
             "", "| sharer | mass | share |", "|---|---|---|"]
    for uid in sorted(info["mass"], key=lambda s: (-info["mass"][s], info["sharers"].index(s))):
        lines.append(f"| {_label(uid, groups)} | {info['mass'][uid]:.3f} | {info['share'][uid]:.1%} |")
    modules = sorted({m for _, m in info["cells"]}, key=lambda m: [mod for _, mod in info["cells"]].index(m))
    layers = sorted({la for la, _ in info["cells"]}, key=lambda la: (la is None, la if la is not None else 0))
    lines += ["", "Dominant sharer per layer (rows) and module (columns), with its share of that cell's weight:", "",
              "| layer | " + " | ".join(modules) + " |", "|---|" + "---|" * len(modules)]
    for la in layers:
        cells = []
        for mod in modules:
            cell = info["cells"].get((la, mod))
            if not cell or sum(cell.values()) <= 0:
                cells.append("-")
                continue
            top = max(cell, key=lambda s: (cell[s], -info["sharers"].index(s)))
            cells.append(f"{top} {cell[top] / sum(cell.values()):.0%}")
        lines.append(f"| {'-' if la is None else la} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_agreement(a: dict) -> str:
    lines = ["## do users get different sharers?", "",
             "For each pair of target users: the share of pieces whose dominant sharer (largest weight) is the "
             "same for both, and chance (each user's own mix of dominant sharers, placed independently of the "
             "other's). Near 100% the gates pick by piece, not by user: every user gets about the same LoRA.", "",
             "| users | pieces | same dominant sharer | chance |", "|---|---|---|---|"]
    for p in a["pairs"]:
        lines.append(f"| {p['users'][0]}, {p['users'][1]} | {p['pieces']} | {p['same']:.1%} | {p['chance']:.1%} |")
    lines += [f"| mean over {len(a['pairs'])} pairs | | {a['mean_same']:.1%} | {a['mean_chance']:.1%} |"]
    return "\n".join(lines) + "\n"


def format_routing(r: dict) -> str:
    lines = ["## routing against the sample's latent groups", "",
             "Share of each target user's recipe weight on sharers of the user's own latent group (the groups "
             "come from the sample generator's side file, which no stage reads). A user-blind mix (every sharer "
             "of the pool equally, whoever the user) would put on the user's group the share of pool sharers "
             "in that group.", "", "| user | group | own-group share | user-blind mix |", "|---|---|---|---|"]
    for uid, v in r["users"].items():
        lines.append(f"| {uid} | {v['group']} | {v['share']:.1%} | {v['blind']:.1%} |")
    lines += [f"| mean over {len(r['users'])} users | | {r['mean_share']:.1%} | {r['mean_blind']:.1%} |", "",
              f"With {r['n_groups']} balanced groups a user-blind mix gives 1/{r['n_groups']} = "
              f"{r['balanced_blind']:.1%}. Routing is personal where the own-group share is well above the "
              f"user-blind one."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ heatmap

def heatmap_pieces(recipe: dict) -> list:
    """The recipe's pieces by layer number (a recipe written with sorted keys has layer 10 before layer 2), each
    layer's modules in the recipe's order; pieces of no layer last."""
    names = list(recipe["pieces"])
    order = {name: j for j, name in enumerate(names)}

    def key(name):
        layer = piece_location(name)[0]
        return (layer is None, layer if layer is not None else 0, order[name])
    return sorted(names, key=key)


def weight_grid(recipe: dict, sharers: list) -> list:
    """[sharer][piece] weight (0 where the piece does not use the sharer), pieces in heatmap_pieces' order."""
    row = {s: i for i, s in enumerate(sharers)}
    pieces = heatmap_pieces(recipe)
    grid = [[0.0] * len(pieces) for _ in sharers]
    for j, piece in enumerate(pieces):
        for uid, weight in recipe["pieces"][piece]:
            grid[row[str(uid)]][j] += float(weight)
    return grid


def plot_heatmap(path, info: dict, recipe: dict, groups: dict | None = None) -> Path:
    """PNG: sharers (rows) x pieces (columns, by layer number), colour = the sharer's weight."""
    import numpy as np
    plt = pyplot()

    pieces, sharers = heatmap_pieces(recipe), info["sharers"]
    grid = np.array(weight_grid(recipe, sharers))
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.12 * len(pieces) + 3)), 1.0 + 0.35 * len(sharers)))
    im = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(sharers)))
    ax.set_yticklabels([f"{_label(s, groups)}  {info['share'][s]:.0%}" for s in sharers], fontsize=8)
    starts = {}
    for j, piece in enumerate(pieces):
        starts.setdefault(piece_location(piece)[0], j)
    ticks = [(j, la) for la, j in starts.items() if la is not None]
    step = max(1, len(ticks) // 16)
    ax.set_xticks([j for j, _ in ticks[::step]])
    ax.set_xticklabels([str(la) for _, la in ticks[::step]], fontsize=8)
    ax.set_xlabel("pieces, by layer (each layer: its LoRA modules in order)")
    ax.set_title(f"user {_label(info['user_id'], groups)}: weight of each sharer in each piece "
                 f"({info['distinct']} sharers used, entropy {info['entropy_bits']:.2f} bits)", fontsize=9)
    fig.colorbar(im, ax=ax, label="weight", fraction=0.03)
    fig.tight_layout()
    try:
        return save_png(fig, path, 100)
    finally:
        plt.close(fig)


def explain(recipes: list, output_dir=None, groups_file=None, scores_dir=None) -> str:
    """The text report of some recipes; with output_dir, also explain.md, explain.json and one heatmap PNG per
    user (heatmap_user_<id>.png) there; with scores_dir, the gate scores of these users too (gate_scores.py)."""
    from perpcs.evaluation.gate_scores import (decompose, format_gate_scores, format_pooled, load_gate_scores,
                                               load_pooled, pooled_spread)
    groups = read_groups(groups_file) if groups_file else None
    infos = [(path, rec, explain_recipe(rec)) for path, rec in recipes]
    parts = [f"# What the Per-Pcs recipes say ({len(infos)} target user{'s' if len(infos) != 1 else ''})", ""]
    parts += [format_recipe(path, info, groups) for path, _, info in infos]
    agree = agreement(recipes)
    if agree:
        parts.append(format_agreement(agree))
    r = routing(recipes, groups, groups_file) if groups else None
    if r:
        parts.append(format_routing(r))
    scores = pooled = None
    if scores_dir:
        wanted = {str(rec.get("user_id")) for _, rec in recipes}
        scores = decompose(load_gate_scores(scores_dir, wanted), groups)
        parts.append(format_gate_scores(scores) if scores else
                     f"## gate scores\n\n{scores_dir}: fewer than two of these users have gate scores; the split "
                     "into a per-sharer offset and a user part needs two or more.\n")
        pooled = pooled_spread(load_pooled(scores_dir, wanted))
        if pooled:   # runs saved before the pooled vectors were kept have none
            parts.append(format_pooled(pooled))
    text = "\n".join(parts)
    if output_dir:
        out = Path(output_dir)
        # every name first: a recipe whose user id is not a safe id stops the report before any file is written
        heatmaps = [out / f"heatmap_{user_file_name(info['user_id'], '.png')}" for _, _, info in infos]
        for heatmap, (_, rec, info) in zip(heatmaps, infos):
            plot_heatmap(heatmap, info, rec, groups)
        write_bytes_atomic(out / "explain.md", text.encode("utf-8"))
        write_json_atomic(out / "explain.json", {
            "users": [{k: v for k, v in info.items() if k != "cells"}
                      | {"cells": [[la, mod, cell] for (la, mod), cell in info["cells"].items()]}
                      for _, _, info in infos], "agreement": agree, "routing": r, "gate_scores": scores,
            "pooled": pooled})
    return text
