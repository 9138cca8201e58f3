"""What a personalized user costs to store: the figures of ``python -m perpcs report``, stage 5's
``summary.json`` and the ablation's cost curves.

OPPU: the adapter OPPU wrote for the user (``OPPU/adapters/user_<id>/``), i.e. the files peft loads it from,
``adapter_model.safetensors`` and ``adapter_config.json`` (peft's ``README.md`` model card is not counted); its
size follows OPPU's own target modules (q_proj and v_proj by default), not the sharers'.

Per-Pcs: the recipe's *payload*, the minimum that re-materialises the user's LoRA from the sharer LoRAs (which
all users share, like the piece names): which sharers each piece mixes and with what weight. Encoded as

    the sharers the recipe uses, in the recipe's sharer order: per sharer one length byte + its id in UTF-8,
      then one 0 byte ending the list;
    w = 1 byte if at most 255 sharers are used, else 2 (else 4);
    for every piece, in sorted piece-name order: its number of entries (w bytes), then per entry the
      sharer's position in the list above (w bytes) and its weight as a float32 (4 bytes), little-endian.

so payload bytes = sum(1 + len(id)) + 1 + pieces * w + entries * (w + 4), from the recipe's actual entries (a
piece may mix any number of sharers). float32 loses nothing: materialize mixes the pieces in float32. The rest of
the recipe file (settings, batches, seed, LoRA config, JSON syntax) is bookkeeping that lets the assembly be
checked and re-derived; its full size is reported beside the payload, never in its place.
"""
from __future__ import annotations

import struct
from pathlib import Path

from perpcs.errors import fail

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def adapter_bytes(adapter_dir) -> int | None:
    """Bytes of the files a peft adapter is loaded from; None unless both exist (an unfinished adapter)."""
    paths = [Path(adapter_dir) / name for name in ADAPTER_FILES]
    if not all(p.is_file() for p in paths):
        return None
    return sum(p.stat().st_size for p in paths)


def mean_adapter_bytes(adapters_root) -> tuple:
    """(mean adapter bytes, number of users) over the complete ``user_<id>/`` adapters below a dir; (None, 0)
    when there is none."""
    root = Path(adapters_root)
    sizes = [adapter_bytes(d) for d in sorted(root.glob("user_*")) if d.is_dir()] if root.is_dir() else []
    sizes = [s for s in sizes if s is not None]
    return (sum(sizes) / len(sizes), len(sizes)) if sizes else (None, 0)


def _width(n: int) -> int:
    return 1 if n <= 0xFF else 2 if n <= 0xFFFF else 4


def recipe_payload(recipe: dict, path="recipe") -> bytes:
    """The recipe's payload in the encoding of this module's docstring."""
    sharers = [str(s) for s in recipe.get("sharers", [])]
    pieces = recipe.get("pieces")
    if not isinstance(pieces, dict):
        fail(f"{path}: not a Per-Pcs recipe (no 'pieces')")
    used = set()
    for piece, mix in pieces.items():
        named = [str(uid) for uid, _ in mix]
        if len(set(named)) != len(named):
            fail(f"{path}: piece {piece} names a sharer twice")
        for uid in named:
            if uid not in sharers:
                fail(f"{path}: piece {piece} uses sharer {uid!r}, which is not in the recipe's 'sharers'")
            used.add(uid)
    ids = [s for s in sharers if s in used]
    position = {uid: i for i, uid in enumerate(ids)}
    out = bytearray()
    for uid in ids:
        raw = uid.encode("utf-8")
        if not 0 < len(raw) < 256:
            fail(f"{path}: sharer id {uid!r} is empty or longer than 255 bytes")
        out += bytes([len(raw)]) + raw
    out += b"\0"
    code = {1: "B", 2: "H", 4: "I"}[_width(len(ids))]
    for piece in sorted(pieces):
        mix = pieces[piece]
        out += struct.pack("<" + code, len(mix))
        for uid, weight in mix:
            out += struct.pack("<" + code + "f", position[str(uid)], float(weight))
    return bytes(out)


def format_bytes(n) -> str:
    """'-' for a missing figure, else B / KB / MB / GB (1024-based)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
