"""Raw LaMP files (``*_questions.json`` + ``*_outputs.json``) -> the users files of docs/method.md section 3.

The authors never published this step (docs/method.md section 10); the choices made here:
- Questions of ``train`` and ``dev`` (whichever exist) are merged; each gets its gold by id. Every query input
  is parsed (task marker) here, so a broken file fails now and not at stage 1.
- Users: LaMP questions carry no user id, and LaMP numbers profile items per question (question 110's items
  are 1100, 1101, ...), so the same history item has another id in each question of its user. Items are
  therefore compared by content (every field but ``id``). Two questions belong to one user when at least
  half of the smaller profile's items are in the other profile (time-based split: profiles are prefixes of
  one another; user-based split: each question's profile is the user's other documents); users are the
  connected groups. An item found in more than MAX_POSTINGS questions' profiles is boilerplate and proves
  nothing; a question with an empty profile is a user of its own. Not used as evidence: a question's own
  document found in another profile (different users tag the same movie, review the same product), so a
  user-based user with only two documents stays two users.
- ``user_id`` = "u" + the id of the user's question with the shortest profile (ties: smaller id): stable when
  more questions of the same users are added (dev after train). User ids name files, so a question whose
  "u" + id is not a safe id (perpcs.paths.SAFE_ID) is refused when it is read, before anything is written.
- A user's profile is the union of its questions' profiles (for prefixes: the longest one) *without the
  user's own query documents* (the article / description / review / abstract / tweet of a query input): in
  LaMP one question's document is a labelled item of its siblings' profiles, and left there it would hand BM25
  and OPPU the gold answer. Not for citation (LABELLED_DOCUMENT_TASKS): LaMP-1's profile holds the question's
  own paper, unlabelled (no item says what a paper cites), and it stays. Sorted by ``date`` when every item has a
  comparable date (all numbers, or all ISO ``YYYY[-MM[-DD]]`` strings; stable), else longest profile's order
  first. Queries: all the user's questions, shortest profile first, with gold.
- Test users: the ``n_test`` users with the longest history (ties: smaller user_id first). The rest
  is shuffled with ``random.Random(seed)`` and cut at the cumulative fractions base, candidate,
  reserve (rounded half up); users beyond the fractions' sum are left out.
- Input: a LaMP task folder as downloaded: flat (``train_questions.json`` ... in one folder) or LaMP's layout
  with ``train/``, ``dev/``, ``test/`` subfolders holding the same names (user- and time-based releases alike).
  Pointed at one split subfolder (its parent holds the others) it stops and names the parent, so dev is never
  dropped silently. ``LaMP_2`` (both versions carry that name) is resolved from the questions' prompt.
- Leaderboard: LaMP's test questions (``test_questions.json``, no outputs) are grouped into users the same way,
  among themselves only, and written as the separate ``leaderboard`` split (queries without gold); they never
  join the train/dev users. A test-only download (test questions, no train/dev) writes the leaderboard split
  alone and leaves the other splits as they are (prepare train/dev into the same --out_dir for the stages).
- Shapes: user-based and time-based releases (same file names; the grouping handles both), with or without dev,
  flat or in subfolders, test-only. A folder with no questions files is reported as such first (before LaMP_2's
  prompt detection). Placeholder golds ("No reference found", empty) are refused, naming the file.
- Citation: raw LaMP-1 history items carry ``title`` and ``abstract``; the published prompts read
  ``title`` and ``citation``. ``citation`` is set from ``citation_field`` (default the abstract)
  unless an item already has one; the original fields are kept.
"""
from __future__ import annotations

import random
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from perpcs.atomic import write_json_atomic
from perpcs.data.lamp_files import (SPLIT_FILES, Question, check_has_questions, detect_lamp_2, normalize,
                                    read_leaderboard_questions, read_questions, user_id_of)
from perpcs.data.layout import Layout, validate_users
from perpcs.data.tasks import TASKS, Task, get_task, is_ambiguous_lamp_2
from perpcs.errors import fail

_ISO_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
# The history field that holds what a query's input holds (its "document"), per task.
DOCUMENT_FIELD = {t.name: t.document_field for t in TASKS.values()}
# Tasks whose history items hold the answer to a query about their own document: a query's document is left out
# of its user's history (Task.keeps_own_document says why not citation's).
LABELLED_DOCUMENT_TASKS = frozenset(t.name for t in TASKS.values() if not t.keeps_own_document)
MAX_POSTINGS = 1000


@dataclass
class Grouping:
    users: list = field(default_factory=list)       # lists of questions, shortest profile first
    joined_by_history: int = 0      # merges of two groups because their profiles overlap
    common_items: int = 0           # items in more than MAX_POSTINGS profiles, not used as evidence
    empty_profiles: int = 0


def item_document(item: dict, task: Task) -> str:
    value = item.get(task.document_field)
    return normalize(value) if isinstance(value, str) else ""


# ----------------------------------------------------------------------------------------------------------
# Users

def group_questions(questions: list) -> Grouping:
    """Questions -> users: the connected groups of overlapping profiles (see the module docstring)."""
    parent = list(range(len(questions)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> bool:
        a, b = root(i), root(j)
        if a == b:
            return False
        parent[max(a, b)] = min(a, b)
        return True

    grouping = Grouping()
    keys = [set(q.item_keys) for q in questions]
    holders = defaultdict(list)                   # item key -> questions whose profile holds it
    for qi, item_keys in enumerate(keys):
        for key in item_keys:
            holders[key].append(qi)
    shared = Counter()
    for qs in holders.values():
        if len(qs) > MAX_POSTINGS:
            grouping.common_items += 1
            continue
        for x in range(len(qs)):
            for y in range(x + 1, len(qs)):
                shared[qs[x], qs[y]] += 1
    for (i, j), n in sorted(shared.items()):
        if 2 * n >= min(len(keys[i]), len(keys[j])):
            grouping.joined_by_history += join(i, j)
    users = defaultdict(list)
    for qi, q in enumerate(questions):
        users[root(qi)].append(q)
    def shortest_first(q: Question) -> tuple:
        return len(q.profile), q.id

    grouping.users = sorted((sorted(qs, key=shortest_first) for qs in users.values()),
                            key=lambda qs: shortest_first(qs[0]))
    grouping.empty_profiles = sum(1 for q in questions if not q.profile)
    return grouping


def build_user(questions: list, task: Task, citation_field: str = "abstract") -> tuple:
    """(users-file entry, own documents removed): the union of the questions' profiles (longest first, items
    by content) without the user's query documents, in time order; every query with gold."""
    seen, items = set(), []
    for question in sorted(questions, key=lambda q: (-len(q.profile), q.id)):
        for item, key in zip(question.profile, question.item_keys):
            if key not in seen:
                seen.add(key)
                items.append((item, question))
    own = {q.document for q in questions if q.document} if not task.keeps_own_document else set()
    kept = [(item, q) for item, q in items if item_document(item, task) not in own]
    profile = [_project_item(item, q, task, citation_field) for item, q in kept]
    user = {"user_id": user_id_of(questions[0].id), "profile": sort_by_time(profile),
            "query": [{"id": q.id, "input": q.input, **({} if q.gold is None else {"gold": q.gold})}
                      for q in questions]}
    return user, len(items) - len(kept)


def _project_item(item: dict, question: Question, task: Task, citation_field: str) -> dict:
    out = dict(item)
    if task.answer_from_flag and task.answer_field not in out:
        if citation_field not in item:
            fail(f"{question.source}: question {question.id!r}: profile item {item['id']!r} has no "
                 f"'{citation_field}' to use as its citation (--citation_field)")
        out[task.answer_field] = item[citation_field]
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
    found = check_has_questions(lamp_dir)   # before the task: a missing download is the first thing to say
    task = detect_lamp_2(lamp_dir) if is_ambiguous_lamp_2(task_name) else get_task(task_name)
    if citation_field not in ("abstract", "title"):
        fail(f"--citation_field must be 'abstract' or 'title', got {citation_field!r}")
    if not any(split in found for split in SPLIT_FILES):
        return _prepare_leaderboard_only(task, lamp_dir, out_dir, citation_field, verbose)
    questions = read_questions(lamp_dir, task)
    board_questions = read_leaderboard_questions(lamp_dir, task, questions)
    grouping = group_questions(questions)
    built = [build_user(qs, task, citation_field) for qs in grouping.users]
    users = [user for user, _ in built]
    removed = sum(n for _, n in built)
    # the test questions: grouped among themselves only, never mixed into the users above
    board = [build_user(qs, task, citation_field)[0] for qs in group_questions(board_questions).users]
    splits = split_users(users, n_test, base_frac, candidate_frac, reserve_frac, seed)
    layout = Layout(Path(out_dir), task)
    for split in ("base", "candidate", "test", "reserve"):
        path = layout.split_path(split)
        validate_users(splits[split], path, task, need_gold=True)
        write_json_atomic(path, splits[split])
    golds = [{"id": q["id"], "output": q["gold"]} for user in splits["test"] for q in user["query"]]
    write_json_atomic(layout.golds, {"task": task.lamp_id, "golds": golds})
    if board_questions:
        validate_users(board, layout.leaderboard_users, task)
        write_json_atomic(layout.leaderboard_users, board)
    summary = _summary(task, lamp_dir, questions, grouping, splits, layout, removed)
    if board_questions:
        summary["leaderboard"] = {"path": str(layout.leaderboard_users), "questions": len(board_questions),
                                  "users": len(board)}
    if verbose:
        print(format_summary(summary))
    return summary


def _prepare_leaderboard_only(task: Task, lamp_dir, out_dir, citation_field: str, verbose: bool) -> dict:
    """A test-only download: LaMP's test questions become the leaderboard split; nothing else is written."""
    board_questions = read_leaderboard_questions(lamp_dir, task, [])
    board = [build_user(qs, task, citation_field)[0] for qs in group_questions(board_questions).users]
    layout = Layout(Path(out_dir), task)
    validate_users(board, layout.leaderboard_users, task)
    write_json_atomic(layout.leaderboard_users, board)
    summary = {"task": task.name, "lamp_dir": str(lamp_dir), "leaderboard_only": True,
               "leaderboard": {"path": str(layout.leaderboard_users), "questions": len(board_questions),
                               "users": len(board)}}
    if verbose:
        missing = [s for s in ("base", "candidate", "test") if not layout.split_path(s).is_file()]
        print(f"{task.name}: test questions only -> {len(board)} leaderboard users ({len(board_questions)} "
              f"questions, no golds) {layout.leaderboard_users}; the train/dev splits were not touched"
              + (f" (none yet: {', '.join(missing)} missing; prepare LaMP's train/dev files into the same "
                 f"--out_dir before running the stages)" if missing else ""))
    return summary


def _summary(task, lamp_dir, questions, grouping, splits, layout, removed) -> dict:
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
            "users": len(grouping.users), "joined_by_history": grouping.joined_by_history,
            "common_items": grouping.common_items,
            "query_documents_removed": removed, "empty_profiles": grouping.empty_profiles,
            "unused_users": len(splits["unused"]), "files": files}


def format_summary(summary: dict) -> str:
    sources = ", ".join(f"{n} in {name}" for name, n in summary["questions"].items())
    lines = [f"{summary['task']}: {sum(summary['questions'].values())} questions ({sources}) -> "
             f"{summary['users']} users ({summary['joined_by_history']} joins by shared history items; "
             f"{summary['query_documents_removed']} query documents removed from their users' profiles; "
             f"{summary['empty_profiles']} with an empty profile, {summary['unused_users']} left out by the "
             f"fractions)"]
    if summary["common_items"]:
        lines.append(f"  note: {summary['common_items']} items appear in more than {MAX_POSTINGS} questions' "
                     f"profiles and were not used to group questions")
    for split, info in summary["files"].items():
        lines.append(f"  {split:<9} {info['users']:>5} users {info['queries']:>6} queries  history "
                     f"min/median/max {info['history_min']}/{info['history_median']:g}/{info['history_max']}"
                     f"  {info['path']}")
        if info["users"] == 0:
            lines.append(f"  warning: the {split} split is empty")
    if "leaderboard" in summary:
        board = summary["leaderboard"]
        lines.append(f"  leaderboard {board['users']:>3} users {board['questions']:>6} queries  (LaMP's test questions, "
                     f"no golds)  {board['path']}")
    return "\n".join(lines)
