"""Storage figures (issue 12 item 6): OPPU's storage is the adapter OPPU wrote, Per-Pcs's is the recipe's payload
(sharer ids and weights per piece), reported beside the whole recipe file; in summary.json and `report`.

No model runs here: fake sharer LoRAs (small safetensors files), recipes and output trees.
"""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from perpcs.stages.lora_composition import write_summary
from perpcs.method.composition import ComposeSettings
from perpcs.method.pieces import PiecePool
from perpcs.method.recipes import make_recipe, write_recipe
from perpcs.errors import PerpcsError
from perpcs.evaluation.report import results_table
from perpcs.method.storage import format_bytes, recipe_payload
from perpcs.data.tasks import get_task

TASK = get_task("movie_tagging")
GOLDS = [("1", "comedy"), ("2", "action")]
PIECES = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


# ---- an independent reading of the payload format (perpcs/storage.py's docstring) ------------------------

def expected_size(recipe: dict) -> int:
    used = {str(s) for mix in recipe["pieces"].values() for s, _ in mix}
    width = 1 if len(used) < 256 else 2
    entries = sum(len(mix) for mix in recipe["pieces"].values())
    return sum(1 + len(s.encode()) for s in used) + 1 + len(recipe["pieces"]) * width + entries * (width + 4)


def decode(data: bytes, piece_names) -> dict:
    """{piece: {sharer id: float32 weight}} from payload bytes, given the piece names (shared by every user)."""
    ids, pos = [], 0
    while data[pos]:
        ids.append(data[pos + 1:pos + 1 + data[pos]].decode())
        pos += 1 + data[pos]
    pos += 1
    width = 1 if len(ids) < 256 else 2
    code = "<B" if width == 1 else "<H"
    out = {}
    for piece in sorted(piece_names):
        (count,), pos = struct.unpack_from(code, data, pos), pos + width
        out[piece] = {}
        for _ in range(count):
            (index,), pos = struct.unpack_from(code, data, pos), pos + width
            (weight,), pos = struct.unpack_from("<f", data, pos), pos + 4
            out[piece][ids[index]] = weight
    assert pos == len(data)
    return out


def as_float32(recipe: dict) -> dict:
    return {p: {str(s): struct.unpack("<f", struct.pack("<f", w))[0] for s, w in mix}
            for p, mix in recipe["pieces"].items()}


def test_payload_of_a_recipe_with_a_variable_number_of_sharers_per_piece():
    # pieces in a non-sorted order, 1 to 3 sharers each; sharer "9" is in the pool but never used
    recipe = {"sharers": ["101", "7", "9", "user-abc"], "batches": [[0, 1, 2]] * 50, "settings": {"topk": 3},
              "pieces": {"b.v_proj": [["7", 0.25], ["user-abc", 0.5], ["101", 0.25]],
                         "a.q_proj": [["101", 1.0]],
                         "c.o_proj": [["user-abc", 0.123456789], ["7", 0.876543211]]}}
    payload = recipe_payload(recipe)
    assert len(payload) == expected_size(recipe) == (4 + 2 + 9) + 1 + 3 * 1 + 6 * 5
    assert decode(payload, recipe["pieces"]) == as_float32(recipe)      # it re-materialises the weights
    assert len(payload) < len(json.dumps(recipe))                       # the bookkeeping is not in it


def test_payload_with_more_than_255_sharers_uses_two_byte_indices():
    sharers = [str(1000 + i) for i in range(300)]
    recipe = {"sharers": sharers, "pieces": {"p1": [[s, 1 / 300] for s in sharers], "p2": [[sharers[299], 1.0]]}}
    payload = recipe_payload(recipe)
    assert len(payload) == expected_size(recipe) == 300 * 5 + 1 + 2 * 2 + 301 * 6
    assert decode(payload, recipe["pieces"]) == as_float32(recipe)


def test_payload_of_a_recipe_naming_an_unknown_sharer_is_an_error():
    with pytest.raises(PerpcsError, match="sharer '8'.*not in the recipe's 'sharers'"):
        recipe_payload({"sharers": ["7"], "pieces": {"p": [["8", 1.0]]}}, "user_1.json")


# ---- summary.json and report -------------------------------------------------------------------------------

def fake_sharers(anchor_dir, ids, d=16, r=2) -> PiecePool:
    """Sharer LoRAs on q/v of 2 layers, with peft's README.md beside them (not part of the adapter)."""
    for n, uid in enumerate(ids):
        g = torch.Generator().manual_seed(n)
        tensors = {}
        for piece in PIECES:
            tensors[f"base_model.model.{piece}.lora_A.weight"] = torch.randn(r, d, generator=g)
            tensors[f"base_model.model.{piece}.lora_B.weight"] = torch.randn(d, r, generator=g)
        target = anchor_dir / f"user_{uid}"
        target.mkdir(parents=True)
        save_file(tensors, str(target / "adapter_model.safetensors"))
        write(target / "adapter_config.json", {"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
                                               "peft_type": "LORA"})
        write(target / "README.md", "model card " * 500)
    return PiecePool(ids, anchor_dir)


def fake_composition(root, pool, users: dict) -> dict:
    """Recipes (users: {user id: sharers per piece}), users_log.jsonl and summary.json of a stage 5 run."""
    out = root / "LoRA-Composition"
    for n, (uid, k) in enumerate(users.items()):
        weights = {}
        for j, piece in enumerate(pool.pieces):
            w = torch.zeros(len(pool), dtype=torch.float64)
            chosen = [(n + j + i) % len(pool) for i in range(1 + (j + k) % k)] if k > 1 else [n % len(pool)]
            w[chosen] = torch.softmax(torch.arange(len(chosen), dtype=torch.float64), 0)
            weights[piece] = w
        recipe = make_recipe(pool, weights, ComposeSettings(topk=k), uid, TASK.name, [[0, 1], [2, 3]] * 20,
                             {"seed_user": 1234, "examples": 4})
        write_recipe(recipe, out / "recipes" / f"user_{uid}.json")
        with open(out / "users_log.jsonl", "a") as f:
            f.write(json.dumps({"user_id": uid, "assembly_seconds": 2.0 + n}) + "\n")
    return write_summary(out, pool, list(users))


def test_summary_reports_the_payload_beside_the_recipe_file(tmp_path, capsys):
    sharers = ["11", "22", "333"]
    pool = fake_sharers(tmp_path / "anchor_PEFT", sharers)
    summary = fake_composition(tmp_path, pool, {"u1": 1, "u2": 3})
    saved = json.loads((tmp_path / "LoRA-Composition" / "summary.json").read_text())
    assert saved == summary
    for uid in ("u1", "u2"):
        path = tmp_path / "LoRA-Composition" / "recipes" / f"user_{uid}.json"
        recipe = json.loads(path.read_text())
        assert summary["users"][uid]["payload_bytes"] == expected_size(recipe)
        assert summary["users"][uid]["recipe_bytes"] == path.stat().st_size
        assert summary["users"][uid]["payload_bytes"] < summary["users"][uid]["recipe_bytes"]
    # u2 mixes a variable number of sharers per piece: its payload counts the actual entries
    assert summary["users"]["u2"]["payload_bytes"] > summary["users"]["u1"]["payload_bytes"]
    assert summary["mean"]["payload_bytes"] == (summary["users"]["u1"]["payload_bytes"]
                                                + summary["users"]["u2"]["payload_bytes"]) / 2
    # the sharer LoRAs as stored (weights + config, not peft's README), once for all users; no figure of the
    # sharers' adapters is labelled as a per-user adapter (OPPU's is measured from OPPU's own files)
    pool_bytes = sum((tmp_path / "anchor_PEFT" / f"user_{s}" / name).stat().st_size
                     for s in sharers for name in ("adapter_model.safetensors", "adapter_config.json"))
    assert summary["sharer_pool_bytes"] == pool_bytes and summary["sharer_adapter_bytes"] == pool_bytes / 3
    assert "adapter_bytes" not in summary["mean"] and "adapter_bytes" not in summary["users"]["u1"]
    out = capsys.readouterr().out
    assert all(format_bytes(summary["mean"][key]) in out for key in ("payload_bytes", "recipe_bytes"))


def test_summary_without_any_timing_still_writes(tmp_path):
    """Every user resumed from its recipe (no assembly_seconds logged): the summary is written, seconds None."""
    pool = fake_sharers(tmp_path / "anchor_PEFT", ["1", "2"])
    fake_composition(tmp_path, pool, {"u1": 1})
    (tmp_path / "LoRA-Composition" / "users_log.jsonl").unlink()
    summary = write_summary(tmp_path / "LoRA-Composition", pool, ["u1"])
    assert summary["mean"]["assembly_seconds"] is None and summary["mean"]["payload_bytes"] > 0


def predictions(outputs) -> dict:
    return {"task": TASK.lamp_id, "golds": [{"id": i, "output": o} for (i, _), o in zip(GOLDS, outputs)]}


def report_rows(table: str) -> dict:
    """{method: [cells after the metrics]} of the 'no retrieval' rows."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[1] == "no retrieval":
            rows[cells[0]] = cells[4:]
    return rows


def test_report_storage_is_what_each_method_stored(tmp_path):
    write(tmp_path / "data" / TASK.name / "test_100" / "golds.json", predictions([g for _, g in GOLDS]))
    root = tmp_path / "output" / TASK.name
    for sub in ("task-base_LLM", "OPPU", "LoRA-Composition"):
        write(root / sub / "predictions" / "kNP.json", predictions(["comedy", "zzz"]))
    # OPPU's own adapters (q/v, smaller than the sharers'): weights + config per user, mean over the users
    for uid, (weights, config) in {"a": (300, 100), "b": (600, 200)}.items():
        write(root / "OPPU" / "adapters" / f"user_{uid}" / "adapter_model.safetensors", b"w" * weights)
        write(root / "OPPU" / "adapters" / f"user_{uid}" / "adapter_config.json", "c" * config)
        write(root / "OPPU" / "adapters" / f"user_{uid}" / "README.md", "m" * 1000)     # not counted
    write(root / "OPPU" / "adapters" / "user_c" / "adapter_model.safetensors", b"w" * 5000)  # unfinished
    write(root / "OPPU" / "users_log.jsonl", json.dumps({"user_id": "a", "train_seconds": 30.0}) + "\n")
    pool = fake_sharers(root / "Anchor_PEFT" / "LoRA", ["11", "22", "333"])
    summary = fake_composition(root, pool, {"u1": 2, "u2": 3})

    table = results_table(TASK.name, tmp_path / "data", root)
    assert "| storage / user | recipe file / user | seconds / user |" in table
    rows = report_rows(table)
    assert rows["OPPU"] == ["600 B", "-", "30.0"]          # (400 + 800) / 2
    assert rows["Per-Pcs"] == [format_bytes(summary["mean"]["payload_bytes"]),
                               format_bytes(summary["mean"]["recipe_bytes"]), "2.5"]
    assert rows["Per-Pcs"][0] != rows["Per-Pcs"][1]
    assert rows["task LoRA (non-personalized)"] == ["0 B", "-", "-"]

    # no OPPU adapters: OPPU's storage is not measured, and nothing else is shown in its place
    for uid in ("a", "b", "c"):
        for f in (root / "OPPU" / "adapters" / f"user_{uid}").iterdir():
            f.unlink()
    rows = report_rows(results_table(TASK.name, tmp_path / "data", root))
    assert rows["OPPU"][:2] == ["-", "-"]
