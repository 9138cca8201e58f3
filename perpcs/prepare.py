"""Raw LaMP files (``*_questions.json`` + ``*_outputs.json``) -> the users files of SPEC section 3.

The authors never published this step (SPEC section 10); the choices made here:
- Questions of ``train`` and ``dev`` (whichever exist) are merged; each gets its gold by id.
- Users: LaMP questions carry no user id. In LaMP's time-based split one user's questions have
  profiles that are prefixes of one another (same items, same order, by item id). Questions are taken
  shortest profile first; a question joins the user whose longest profile so far is a prefix of its
  own profile, otherwise it starts a new user. A question whose profile shares its first item with a
  user's but is not an extension of it (a "prefix conflict") becomes a separate user and is counted
  in the summary. A question with an empty profile is a user of its own.
- ``user_id`` = "u" + the id of the user's first question (the one with the shortest profile): stable
  when more questions of the same users are added (dev after train).
- A user's profile is its longest profile, sorted by ``date`` when every item has a comparable date
  (all numbers, or all ISO ``YYYY[-MM[-DD]]`` strings; stable, so equal dates keep the given order),
  else in the given order. Queries: all the user's questions, shortest profile first, with gold.
- Test users: the ``n_test`` users with the longest history (ties: smaller user_id first). The rest
  is shuffled with ``random.Random(seed)`` and cut at the cumulative fractions base, candidate,
  reserve (rounded half up); users beyond the fractions' sum are left out.
- Citation: raw LaMP-1 history items carry ``title`` and ``abstract``; the published prompts read
  ``title`` and ``citation``. ``citation`` is set from ``citation_field`` (default the abstract)
  unless an item already has one; the original fields are kept.
"""
from __future__ import annotations

import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .data import Layout, read_json, validate_users, write_json_atomic
from .errors import fail
from .tasks import Task, get_task

SPLIT_FILES = ("train", "dev")
_ISO_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?")


@dataclass(frozen=True)
class Question:
    id: str
    input: str
    gold: str
    profile: tuple          # the raw history items, as given
    source: str             # the questions file it came from, for messages

    @property
    def item_ids(self) -> tuple:
        return tuple(str(item["id"]) for item in self.profile)


@dataclass
class Grouping:
    users: list = field(default_factory=list)       # lists of questions, shortest profile first
    prefix_conflicts: int = 0
    empty_profiles: int = 0


# ----------------------------------------------------------------------------------------------------------
# Reading

def read_questions(lamp_dir, task: Task) -> list:
    """All questions of train and dev (whichever exist) with their golds."""
    lamp_dir = Path(lamp_dir)
    questions, seen = [], {}
    found = False
    for split in SPLIT_FILES:
        qpath, opath = lamp_dir / f"{split}_questions.json", lamp_dir / f"{split}_outputs.json"
        if not qpath.is_file():
            continue
        found = True
        if not opath.is_file():
            fail(f"{qpath} has no outputs file beside it: expected {opath}")
        golds = _read_golds(opath, task)
        for question in _read_question_file(qpath, golds):
            if question.id in seen:
                fail(f"question id {question.id!r} appears in both {seen[question.id]} and {question.source}")
            seen[question.id] = question.source
            questions.append(question)
    if not found:
        fail(f"no LaMP questions in {lamp_dir}: expected train_questions.json and/or dev_questions.json "
             f"(with train_outputs.json / dev_outputs.json)")
    return questions


def _read_golds(path: Path, task: Task) -> dict:
    raw = read_json(path, "LaMP outputs file")
    if not isinstance(raw, dict) or not isinstance(raw.get("golds"), list):
        fail(f"{path}: expected a LaMP outputs file {{\"task\": ..., \"golds\": [{{\"id\", \"output\"}}]}}")
    named = raw.get("task")
    # LaMP's own files call both LaMP-2 versions "LaMP_2"; accept that for LaMP_2M / LaMP_2N.
    if named is not None and named not in (task.lamp_id, task.lamp_id.rstrip("MN")):
        fail(f"{path}: holds task {named!r}, but --task_name {task.name} is {task.lamp_id}")
    golds = {}
    for i, entry in enumerate(raw["golds"]):
        if not isinstance(entry, dict) or "id" not in entry or "output" not in entry:
            fail(f"{path}: golds entry #{i} needs 'id' and 'output'")
        golds[str(entry["id"])] = entry["output"]
    return golds


def _read_question_file(path: Path, golds: dict) -> list:
    raw = read_json(path, "LaMP questions file")
    if not isinstance(raw, list):
        fail(f"{path}: expected a JSON list of questions {{\"id\", \"input\", \"profile\"}}")
    questions = []
    for i, q in enumerate(raw):
        if not isinstance(q, dict):
            fail(f"{path}: question #{i} is not an object")
        for key in ("id", "input", "profile"):
            if key not in q:
                fail(f"{path}: question #{i} (id {q.get('id', '?')!r}) is missing field '{key}'")
        qid = str(q["id"])
        if not isinstance(q["profile"], list):
            fail(f"{path}: question {qid!r}: 'profile' must be a list of history items")
        for k, item in enumerate(q["profile"]):
            if not isinstance(item, dict) or "id" not in item:
                fail(f"{path}: question {qid!r}: profile item #{k} needs an 'id' (users are found by item ids)")
        if qid not in golds:
            fail(f"{path}: question {qid!r} has no output in {path.name.replace('_questions', '_outputs')}")
        questions.append(Question(qid, q["input"], golds[qid], tuple(q["profile"]), path.name))
    return questions


# ----------------------------------------------------------------------------------------------------------
# Users

def group_questions(questions: list) -> Grouping:
    """Questions -> users by the prefix relation of their profiles (see the module docstring)."""
    grouping = Grouping()
    chains_by_first: dict = {}       # first item id -> chains [(longest item ids so far, questions)]
    for question in sorted(questions, key=lambda q: (len(q.profile), q.id)):
        ids = question.item_ids
        if not ids:
            grouping.empty_profiles += 1
            grouping.users.append([question])
            continue
        chains = chains_by_first.setdefault(ids[0], [])
        for chain in chains:
            if ids[:len(chain[0])] == chain[0]:
                chain[0] = ids
                chain[1].append(question)
                break
        else:
            if chains:
                grouping.prefix_conflicts += 1
            chain = [ids, [question]]
            chains.append(chain)
            grouping.users.append(chain[1])
    return grouping


def build_user(questions: list, task: Task, citation_field: str = "abstract") -> dict:
    """One users-file entry: the longest profile (new item dicts, time order) and every query with gold."""
    longest = questions[-1]
    items = [_project_item(item, longest, task, citation_field) for item in longest.profile]
    return {"user_id": f"u{questions[0].id}", "profile": sort_by_time(items),
            "query": [{"id": q.id, "input": q.input, "gold": q.gold} for q in questions]}


def _project_item(item: dict, question: Question, task: Task, citation_field: str) -> dict:
    out = dict(item)
    if task.name == "citation" and "citation" not in out:
        if citation_field not in item:
            fail(f"{question.source}: question {question.id!r}: profile item {item['id']!r} has no "
                 f"'{citation_field}' to use as its citation (--citation_field)")
        out["citation"] = item[citation_field]
    for name in task.history_fields:
        if out.get(name) is None:
            fail(f"{question.source}: question {question.id!r}: profile item {item['id']!r} is missing field "
                 f"'{name}' needed by task {task.name}")
    return out


def sort_by_time(items: list) -> list:
    """Items sorted by ``date`` when all dates are comparable; else as given (stable either way)."""
    dates = [item.get("date") for item in items]
    numbers = all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in dates)
    iso = all(isinstance(d, str) and _ISO_DATE.match(d) for d in dates)
    if items and (numbers or iso):
        return sorted(items, key=lambda item: item["date"])
    return list(items)


# ----------------------------------------------------------------------------------------------------------
# Splits

def split_users(users: list, n_test: int, base_frac: float, candidate_frac: float, reserve_frac: float,
                seed: int) -> dict:
    """{"test", "base", "candidate", "reserve", "unused"} -> users (see the module docstring)."""
    fractions = {"--base_frac": base_frac, "--candidate_frac": candidate_frac, "--reserve_frac": reserve_frac}
    for flag, value in fractions.items():
        if not 0 <= value <= 1:
            fail(f"{flag} must be between 0 and 1, got {value}")
    if base_frac + candidate_frac + reserve_frac > 1 + 1e-9:
        fail(f"--base_frac + --candidate_frac + --reserve_frac must be at most 1, got "
             f"{base_frac + candidate_frac + reserve_frac:g}")
    if n_test < 0:
        fail(f"--n_test must be at least 0, got {n_test}")
    if n_test >= len(users):
        fail(f"only {len(users)} users found, and --n_test {n_test} would leave none for the base and "
             f"candidate splits; pass a smaller --n_test (e.g. --n_test {max(len(users) // 5, 1)})")
    by_length = sorted(users, key=lambda u: (-len(u["profile"]), u["user_id"]))
    test, rest = by_length[:n_test], sorted(by_length[n_test:], key=lambda u: u["user_id"])
    random.Random(seed).shuffle(rest)
    cuts = [_round_half_up(len(rest) * f) for f in
            (base_frac, base_frac + candidate_frac, base_frac + candidate_frac + reserve_frac)]
    cuts = [min(c, len(rest)) for c in cuts]
    return {"test": test, "base": rest[:cuts[0]], "candidate": rest[cuts[0]:cuts[1]],
            "reserve": rest[cuts[1]:cuts[2]], "unused": rest[cuts[2]:]}


def _round_half_up(x: float) -> int:
    return int(x + 0.5 + 1e-9)


# ----------------------------------------------------------------------------------------------------------
# The whole step

def prepare_lamp(task_name: str, lamp_dir, out_dir="data", n_test: int = 100, seed: int = 0,
                 base_frac: float = 0.5, candidate_frac: float = 0.4, reserve_frac: float = 0.1,
                 citation_field: str = "abstract", verbose: bool = True) -> dict:
    """Convert one task's raw LaMP files; returns the summary (and prints it when ``verbose``)."""
    task = get_task(task_name)
    if citation_field not in ("abstract", "title"):
        fail(f"--citation_field must be 'abstract' or 'title', got {citation_field!r}")
    questions = read_questions(lamp_dir, task)
    grouping = group_questions(questions)
    users = [build_user(qs, task, citation_field) for qs in grouping.users]
    splits = split_users(users, n_test, base_frac, candidate_frac, reserve_frac, seed)
    layout = Layout(Path(out_dir), task)
    for split in ("base", "candidate", "test", "reserve"):
        path = layout.split_path(split)
        validate_users(splits[split], path, task, need_gold=True)
        write_json_atomic(path, splits[split])
    golds = [{"id": q["id"], "output": q["gold"]} for user in splits["test"] for q in user["query"]]
    write_json_atomic(layout.golds, {"task": task.lamp_id, "golds": golds})
    summary = _summary(task, lamp_dir, questions, grouping, splits, layout)
    if verbose:
        print(format_summary(summary))
    return summary


def _summary(task, lamp_dir, questions, grouping, splits, layout) -> dict:
    per_source: dict = {}
    for q in questions:
        per_source[q.source] = per_source.get(q.source, 0) + 1
    files = {}
    for split in ("base", "candidate", "test", "reserve"):
        lengths = [len(u["profile"]) for u in splits[split]]
        files[split] = {"path": str(layout.split_path(split)), "users": len(lengths),
                        "queries": sum(len(u["query"]) for u in splits[split]),
                        "history_min": min(lengths, default=0),
                        "history_median": statistics.median(lengths) if lengths else 0,
                        "history_max": max(lengths, default=0)}
    return {"task": task.name, "lamp_dir": str(lamp_dir), "questions": per_source,
            "users": len(grouping.users), "prefix_conflicts": grouping.prefix_conflicts,
            "empty_profiles": grouping.empty_profiles, "unused_users": len(splits["unused"]), "files": files}


def format_summary(summary: dict) -> str:
    sources = ", ".join(f"{n} in {name}" for name, n in summary["questions"].items())
    lines = [f"{summary['task']}: {sum(summary['questions'].values())} questions ({sources}) -> "
             f"{summary['users']} users ({summary['prefix_conflicts']} prefix conflicts kept as separate users, "
             f"{summary['empty_profiles']} with an empty profile, {summary['unused_users']} left out by the "
             f"fractions)"]
    for split, info in summary["files"].items():
        lines.append(f"  {split:<9} {info['users']:>5} users {info['queries']:>6} queries  history "
                     f"min/median/max {info['history_min']}/{info['history_median']:g}/{info['history_max']}"
                     f"  {info['path']}")
        if info["users"] == 0:
            lines.append(f"  warning: the {split} split is empty")
    return "\n".join(lines)
