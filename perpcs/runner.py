"""The per-user loop of stages 3, 4, 5 and OPPU: sharding, resuming, per-user seeds and a JSONL log.

A user's work is seeded from (seed, user id), and its output is published atomically, so a run killed at any
moment and started again produces the same files as an uninterrupted one, without redoing finished users.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .errors import fail


def lazy(make: Callable) -> Callable:
    """``make()`` on the first call, the same value afterwards: a stage loads its model only once it has a
    user to work on, so a rerun with everything done costs seconds, not a 13 GB model load."""
    made = []

    def get():
        if not made:
            made.append(make())
        return made[0]
    return get


def refuse_other_settings(path, had: dict, wanted: dict, made: str) -> None:
    """Resuming over an output made with other settings would pass it off as this run's: stop and say which."""
    changed = {k: (had.get(k), v) for k, v in wanted.items() if had.get(k) != v}
    if changed:
        diff = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        fail(f"{path} was {made} with other settings ({diff}); pass another --output_dir, or --overwrite to redo "
             f"every user")


def last_per_user(log_path, key: str) -> dict:
    """{user: value of ``key``} from a per-user log (users_log.jsonl, all shards append to it); the last positive
    value of each user counts (a user resumed from its saved adapter logs 0 training seconds)."""
    values = {}
    for row in log_rows(log_path):
        value = row.get(key)
        if isinstance(value, (int, float)) and value > 0:
            values[str(row["user_id"])] = float(value)
    return values


def log_rows(log_path) -> list:
    """The per-user rows (those with a user_id) of a users_log.jsonl, in order; none when there is no log."""
    path = Path(log_path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            fail(f"{log_path}: line {number} is not JSON ({err.msg})")
        if isinstance(row, dict) and "user_id" in row:
            rows.append(row)
    return rows


def shard_users(users: list, num_shards: int, shard_id: int) -> list:
    """Users i with i % num_shards == shard_id: deterministic, and the shards' union is every user once."""
    return [u for i, u in enumerate(users) if i % num_shards == shard_id]


def run_per_user(users: list, is_done: Callable, work: Callable, desc: str, log_path: Path | None = None,
                 num_shards: int = 1, shard_id: int = 0, overwrite: bool = False) -> dict:
    """Call ``work(uid, user) -> dict`` for each (uid, user) of this shard that is not done yet.

    Returns {"done": [...], "skipped": [...]}; each finished user appends a line (time, stats) to log_path.
    """
    mine = shard_users(users, num_shards, shard_id)
    finished = set() if overwrite else {uid for uid, _ in mine if is_done(uid)}
    todo = [(uid, u) for uid, u in mine if uid not in finished]
    skipped = [uid for uid, _ in mine if uid in finished]
    print(f"{desc}: {len(mine)} users in shard {shard_id}/{num_shards}, {len(skipped)} already done, "
          f"{len(todo)} to do")
    done = []
    for uid, user in tqdm(todo, desc=desc, unit="user"):
        t0 = time.perf_counter()
        try:
            stats = work(uid, user) or {}
            record = {"user_id": uid, "seconds": round(time.perf_counter() - t0, 3), **stats}
            if log_path is not None:
                Path(log_path).parent.mkdir(parents=True, exist_ok=True)
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        except OSError as err:   # disk full, read-only output dir: say where, keep what is finished
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            fail(f"{desc}: user {uid!r}: {err.strerror or err}{where}; users finished before are intact, "
                 f"run again to resume")
        done.append(uid)
    return {"done": done, "skipped": skipped}
