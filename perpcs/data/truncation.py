"""Fitting prompts and training examples into ``--max_seq_len``, and saying how many were shortened.

A prompt is [profile section] + [history section] + instruction (docs/method.md section 4). An example too long for its token
budget loses, in this order, until it fits:
1. retrieved history items, the lowest BM25 rank first (so the prompt is exactly the one a smaller k builds);
2. words from the end of the article (the query's article or title, the history item's text);
3. words from the end of the profile text, at last the whole profile section;
and only if the instruction and the answer alone are still too long, tokens from the left after BOS (the start
of the instruction), as before. The instruction text around the article, the answer, BOS and EOS are kept.
Training (prompt + answer + EOS within max_seq_len) and generation (prompt within max_seq_len - new tokens)
fit with this same function; an example that fits is left as it is, byte for byte.

Every stage counts what it shortened: a printed line, a ``truncated`` entry in its users_log.jsonl rows (per-user
stages) and in the stage's summary.json.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from perpcs.atomic import write_json_atomic
from perpcs.data.layout import read_json
from perpcs.data.prompts import Example
from perpcs.errors import fail

PARTS = ("history", "article", "profile", "left")   # what a shortened example lost, in the order it loses them
PART_NAMES = {"history": "retrieved history items", "article": "article words", "profile": "profile words",
              "left": "the instruction's start (cut from the left)"}
COUNTS = ("total", "shortened") + PARTS


def first_words(text: str, n: int) -> str:
    """``text`` up to the end of its n-th whitespace-separated word, its own spacing kept."""
    if n <= 0:
        return ""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text[:ends[n - 1]] if n <= len(ends) else text


def _largest(n_max: int, make: Callable, fits: Callable):
    """make(n) for the largest n in [0, n_max] that fits (make(n_max + 1) is known not to); None if none does."""
    best = make(0)
    if not fits(best):
        return None
    low, high = 0, n_max + 1
    while high - low > 1:
        mid = (low + high) // 2
        candidate = make(mid)
        if fits(candidate):
            low, best = mid, candidate
        else:
            high = mid
    return best


def fit_example(example: Example, fits: Callable) -> tuple:
    """(example shortened until ``fits(example)``, the parts it lost: a tuple of PARTS, empty if it fit).

    "left" means the result still does not fit and the caller cuts its tokens from the left after BOS; an
    example without known parts (``parts`` None) can only be cut so.
    """
    if fits(example):
        return example, ()
    parts = example.parts
    if parts is None:
        return example, ("left",)
    cut = []

    def make(p):
        return Example.of(p, example.answer, example.source)

    if parts.retrieved:
        cut.append("history")
        for n in range(len(parts.retrieved) - 1, -1, -1):   # the lowest-ranked item goes first
            parts = replace(parts, retrieved=parts.retrieved[:n])
            candidate = make(parts)
            if fits(candidate):
                return candidate, tuple(cut)
    n_words = len(parts.article.split())
    if n_words:
        cut.append("article")
        base = parts
        found = _largest(n_words - 1, lambda n: make(replace(base, article=first_words(base.article, n))), fits)
        if found is not None:
            return found, tuple(cut)
        parts = replace(parts, article="")
    if parts.profile is not None:
        cut.append("profile")
        base = parts
        found = _largest(len(base.profile.split()) - 1,   # 0 words: no profile section at all
                         lambda n: make(replace(base, profile=first_words(base.profile, n) if n else None)), fits)
        if found is not None:
            return found, tuple(cut)
        parts = replace(parts, profile=None)
    return make(parts), tuple(cut + ["left"])


def count_cuts(cuts, max_seq_len: int) -> dict:
    """How many of the examples (their fit_example cuts) were shortened, and how many lost each part."""
    out = {"max_seq_len": max_seq_len, **dict.fromkeys(COUNTS, 0)}
    for cut in cuts:
        out["total"] += 1
        out["shortened"] += bool(cut)
        for part in cut:
            out[part] += 1
    return out


def describe(who: str, counts: dict, noun: str) -> str:
    """One log line: '<who>: 3 of 14 <noun> shortened to fit --max_seq_len 256 (lost: ...)'."""
    line = (f"{who}: {counts['shortened']} of {counts['total']} {noun} shortened to fit --max_seq_len "
            f"{counts['max_seq_len']}")
    if counts["shortened"]:
        line += " (lost: " + ", ".join(f"{PART_NAMES[p]} in {counts[p]}" for p in PARTS if counts[p]) + ")"
    return line


NOUNS = {"examples": "examples", "prompts": "prompts"}


def user_entry(uid: str, examples: dict | None = None, prompts: dict | None = None) -> dict:
    """The ``truncated`` entry of a user's users_log.jsonl row; prints a line when something was shortened."""
    entry = {kind: counts for kind, counts in (("examples", examples), ("prompts", prompts)) if counts is not None}
    for kind, counts in entry.items():
        if counts["shortened"]:
            print(describe(f"user {uid}", counts, NOUNS[kind]))
    return entry


def total_counts(entries: list) -> dict:
    """Counts summed over users; max_seq_len one number, or the sorted list when users differ."""
    lengths = sorted({e.get("max_seq_len") for e in entries if e.get("max_seq_len") is not None})
    out = {"max_seq_len": lengths[0] if len(lengths) == 1 else lengths,
           **{key: sum(int(e.get(key, 0)) for e in entries) for key in COUNTS}}
    out["users"] = len(entries)
    out["users_shortened"] = sum(1 for e in entries if e.get("shortened"))
    return out


def log_totals(log_path, uids=None) -> dict:
    """{"examples": ..., "prompts": ...} summed over the users of a users_log.jsonl (all shards append to it):
    per user and kind the last row that has it counts (a user resumed from its adapter or recipe logs no
    examples, only prompts). ``uids``: only these users."""
    from perpcs.data.layout import log_rows
    last: dict = {}
    for row in log_rows(log_path):
        entry = row.get("truncated")
        if isinstance(entry, dict):
            for kind, counts in entry.items():
                last.setdefault(kind, {})[str(row["user_id"])] = counts
    wanted = None if uids is None else {str(u) for u in uids}
    return {kind: total_counts([c for u, c in per_user.items() if wanted is None or u in wanted])
            for kind, per_user in sorted(last.items())}


def update_summary(out_dir, key: str, value: dict, merge: bool = False) -> Path:
    """Set ``key`` of <out_dir>/summary.json (written atomically) to ``value``, or with ``merge`` to the old
    entry updated by it; the other keys stay."""
    path = Path(out_dir) / "summary.json"
    summary = read_json(path, "summary") if path.is_file() else {}
    if not isinstance(summary, dict):
        fail(f"{path}: expected a JSON object")
    summary[key] = {**summary.get(key, {}), **value} if merge else value
    write_json_atomic(path, summary)
    return path


def record_in_summary(out_dir, truncated: dict) -> Path:
    """Merge ``truncated`` ({kind: counts}) into <out_dir>/summary.json; other keys, and kinds this run did not
    count (a reused adapter's training), stay."""
    return update_summary(out_dir, "truncated", truncated, merge=True)


def report_stage(who: str, totals: dict, where=None) -> None:
    """The stage's lines (always printed, also when nothing was shortened)."""
    if not totals:
        print(f"{who}: no example or prompt counted in this run")
    for kind, counts in totals.items():
        print(describe(who, counts, NOUNS.get(kind, kind)) + (f" -> {where}" if where else ""))


def finish_per_user_stage(who: str, out_root, uids) -> dict:
    """End of a per-user stage: totals over its users_log.jsonl, printed and merged into summary.json."""
    totals = log_totals(Path(out_root) / "users_log.jsonl", uids)
    where = record_in_summary(out_root, totals) if totals else None
    report_stage(who, totals, where)
    return totals
