"""Reading one task's raw LaMP files as downloaded (``*_questions.json`` + ``*_outputs.json``, flat or in LaMP's
``train/``, ``dev/``, ``test/`` subfolders) into questions with their golds and own documents, checked as they are
read. What becomes of them (users, splits, the files written) is perpcs.data.prepare, whose docstring gives the
choices made.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from perpcs.data.layout import read_json
from perpcs.data.tasks import AMBIGUOUS_LAMP_2, Task, get_task
from perpcs.errors import PerpcsError, fail
from perpcs.paths import ID_RULE, is_safe_id

SPLIT_FILES = ("train", "dev")
LEADERBOARD_FILE = "test"      # LaMP's test questions: no outputs are published
# golds that stand for "no gold" (copies of LaMP made by other tools write them for the unpublished test outputs):
# training or scoring on them would be silently wrong, so they are refused (compared case- and space-blind)
PLACEHOLDER_GOLDS = ("no reference found", "")


@dataclass(frozen=True)
class Question:
    id: str
    input: str
    gold: str | None        # None: a LaMP test question (leaderboard split)
    profile: tuple          # the raw history items, as given
    source: str             # the questions file it came from, for messages
    document: str = ""      # the question's own document (whitespace-normalized), see prepare.DOCUMENT_FIELD
    item_keys: tuple = field(init=False, repr=False)   # item_key of each profile item, computed once

    def __post_init__(self):
        object.__setattr__(self, "item_keys", tuple(item_key(item) for item in self.profile))


def normalize(text) -> str:
    return " ".join(str(text).split())


def user_id_of(question_id: str) -> str:
    """The user id named after one of its questions (see perpcs.data.prepare's docstring)."""
    return f"u{question_id}"


def item_key(item: dict) -> bytes:
    """An item's identity by content: every field but the id (LaMP numbers items per question). A digest, not
    the text: LaMP-3 holds millions of profile items, most of them long reviews."""
    content = json.dumps({k: v for k, v in item.items() if k != "id"}, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(content.encode("utf-8"), digest_size=16).digest()


def split_folder(lamp_dir, split: str) -> Path | None:
    """The folder holding ``<split>_questions.json``: the task folder itself (flat) or its ``<split>/`` subfolder
    (LaMP's download layout); None when neither has it. Both having it is an error (which one is meant?)."""
    lamp_dir = Path(lamp_dir)
    name = f"{split}_questions.json"
    found = [d for d in (lamp_dir, lamp_dir / split) if (d / name).is_file()]
    if len(found) > 1:
        fail(f"{lamp_dir}: both {found[0] / name} and {found[1] / name} exist; keep one of them")
    return found[0] if found else None


def check_task_folder(lamp_dir) -> None:
    """Pointed at one split subfolder of LaMP's layout (``LaMP_2/train``), the other splits would be silently
    left out: stop and name the folder to pass instead."""
    lamp_dir = Path(lamp_dir).resolve()
    splits = SPLIT_FILES + (LEADERBOARD_FILE,)
    if lamp_dir.name in splits:
        siblings = [s for s in splits if s != lamp_dir.name and (lamp_dir.parent / s).is_dir()]
        if siblings:
            fail(f"{lamp_dir} is the {lamp_dir.name}/ split folder of a LaMP download (its parent also holds "
                 f"{', '.join(s + '/' for s in siblings)}); pass the parent, --lamp_dir {lamp_dir.parent}, so that "
                 f"train and dev both become users (and test the leaderboard split)")


def check_has_questions(lamp_dir) -> dict:
    """{split: folder} of the question files there (train, dev, test), refusing a folder with none: checked first,
    so that a missing download is reported as such (not as a prompt that tells no task)."""
    lamp_dir = Path(lamp_dir)
    if not lamp_dir.is_dir():
        fail(f"--lamp_dir {lamp_dir}: {'not a folder' if lamp_dir.exists() else 'no such folder'}; pass the task's "
             f"LaMP folder as downloaded (train/ dev/ test/ subfolders, or the *_questions.json files directly)")
    check_task_folder(lamp_dir)
    found = {split: split_folder(lamp_dir, split) for split in SPLIT_FILES + (LEADERBOARD_FILE,)}
    found = {split: folder for split, folder in found.items() if folder is not None}
    if not found:
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in lamp_dir.iterdir())
        fail(f"no LaMP questions files in {lamp_dir} (it holds {', '.join(held[:12]) or 'nothing'}"
             f"{', ...' if len(held) > 12 else ''}): expected train_questions.json and/or dev_questions.json (with "
             f"train_outputs.json / dev_outputs.json), or test_questions.json alone, in that folder or in its "
             f"train/, dev/ and test/ subfolders")
    return found


def read_questions(lamp_dir, task: Task) -> list:
    """All questions of train and dev (whichever exist) with their golds and parsed own documents."""
    lamp_dir = Path(lamp_dir)
    check_task_folder(lamp_dir)
    questions, seen = [], {}
    found = False
    for split in SPLIT_FILES:
        folder = split_folder(lamp_dir, split)
        if folder is None:
            continue
        qpath, opath = folder / f"{split}_questions.json", folder / f"{split}_outputs.json"
        found = True
        if not opath.is_file():
            fail(f"{qpath} has no outputs file beside it: expected {opath}")
        golds = _read_golds(opath, task)
        for question in _read_question_file(qpath, golds, task):
            if question.id in seen:
                fail(f"question id {question.id!r} appears in both {seen[question.id]} and {question.source}")
            seen[question.id] = question.source
            questions.append(question)
    if not found:
        fail(f"no LaMP questions in {lamp_dir}: expected train_questions.json and/or dev_questions.json "
             f"(with train_outputs.json / dev_outputs.json), in that folder or in its train/ and dev/ subfolders")
    return questions


def read_leaderboard_questions(lamp_dir, task: Task, other: list) -> list:
    """LaMP's test questions (no golds), or [] when the folder has none; their ids must differ from ``other``'s
    (users are named after a question id, and profile texts are keyed by user)."""
    folder = split_folder(lamp_dir, LEADERBOARD_FILE)
    if folder is None:
        return []
    qpath = folder / f"{LEADERBOARD_FILE}_questions.json"
    sources = {q.id: q.source for q in other}
    questions = _read_question_file(qpath, None, task)
    for question in questions:
        if question.id in sources:
            fail(f"question id {question.id!r} appears in both {sources[question.id]} and {question.source}")
    return questions


def detect_lamp_2(lamp_dir) -> Task:
    """``LaMP_2`` is movie tagging or news categorization: the questions' prompt (the task's query marker) says."""
    lamp_dir = Path(lamp_dir)
    check_has_questions(lamp_dir)   # no files: say so, not that their prompt tells no task
    inputs = []
    for split in SPLIT_FILES + (LEADERBOARD_FILE,):
        folder = split_folder(lamp_dir, split)
        if folder is not None:
            raw = read_json(folder / f"{split}_questions.json", "LaMP questions file")
            inputs += [q["input"] for q in raw if isinstance(q, dict) and isinstance(q.get("input"), str)]
    tasks = [get_task(name) for name in AMBIGUOUS_LAMP_2]
    matching = [t for t in tasks if inputs and all(t.marker in text for text in inputs)]
    if len(matching) != 1:
        fail(f"--task_name LaMP_2 is movie tagging or news categorization, and the questions in {lamp_dir} do not "
             f"tell which (expected every input to hold {tasks[0].marker!r} or every one {tasks[1].marker!r}); "
             f"pass --task_name LaMP_2M (movie_tagging) or --task_name LaMP_2N (news_categorize)")
    print(f"--task_name LaMP_2: the questions' prompt is {matching[0].name}'s ({matching[0].lamp_id})")
    return matching[0]


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
    placeholders = [qid for qid, gold in golds.items()
                    if isinstance(gold, str) and normalize(gold).lower() in PLACEHOLDER_GOLDS]
    if placeholders:
        example = golds[placeholders[0]]
        fail(f"{path}: {len(placeholders)} of {len(golds)} golds are a placeholder, not an answer (e.g. question "
             f"{placeholders[0]!r}: {example!r}); LaMP publishes no test outputs, and a copy that fills them in "
             f"has no golds: train and score on LaMP's train/dev outputs, and put questions without golds in "
             f"test_questions.json (the leaderboard split)")
    return golds


def _stream_json_list(path: Path, chunk: int = 1 << 24):
    """The elements of a JSON list file, decoded one at a time from chunks: the file's text is never held whole
    (LaMP-3's questions file is GBs). None when the file does not start as a list; malformed JSON raises
    json.JSONDecodeError (the caller re-reads it with read_json for the message)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def at_next() -> bool:   # skip whitespace, reading on; False at the end of the file
            nonlocal buf, pos, eof
            while True:
                while pos < len(buf) and buf[pos] in " \t\n\r":
                    pos += 1
                if pos < len(buf) or eof:
                    return pos < len(buf)
                more = f.read(chunk)
                eof = not more
                buf, pos = buf[pos:] + more, 0

        if not at_next() or buf[pos] != "[":
            yield None
            return
        pos += 1
        first = True
        while True:
            if not at_next():
                raise json.JSONDecodeError("unterminated list", buf, pos)
            if buf[pos] == "]":
                pos += 1
                if at_next():
                    raise json.JSONDecodeError("extra data", buf, pos)
                return
            if not first:
                if buf[pos] != ",":
                    raise json.JSONDecodeError("expected ','", buf, pos)
                pos += 1
                at_next()
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof:
                        raise
                    more = f.read(chunk)   # the element goes on in the next chunk
                    eof = not more
                    buf, pos = buf[pos:] + more, 0
                    continue
                after = end
                while after < len(buf) and buf[after] in " \t\n\r":
                    after += 1
                # a number cut by the chunk decodes as a shorter one: unless ',' or ']' follows, decode it again
                if not eof and (after == len(buf) or buf[after] not in ",]"):
                    more = f.read(chunk)
                    eof = not more
                    buf, pos = buf[pos:] + more, 0
                    continue
                break
            pos, first = end, False
            yield value


def _question_list(path: Path):
    """The questions file's list, streamed (see _stream_json_list); anything unexpected is read again whole by
    read_json, so errors read as before."""
    n = 0
    try:
        items = _stream_json_list(path)
        first = next(items)
        if first is not None:
            n = 1
            yield first
            for value in items:
                n += 1
                yield value
            return
    except StopIteration:   # an empty list
        return
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    raw = read_json(path, "LaMP questions file")
    if not isinstance(raw, list):
        fail(f"{path}: expected a JSON list of questions {{\"id\", \"input\", \"profile\"}}")
    yield from raw[n:]   # only if the stream refused valid JSON


def _read_question_file(path: Path, golds: dict, task: Task) -> list:
    if not path.is_file():
        read_json(path, "LaMP questions file")   # its message
    questions = []
    # LaMP repeats a user's items in every question's profile: one copy of each item's values (all but the id)
    canon = {}
    for i, q in enumerate(_question_list(path)):
        if not isinstance(q, dict):
            fail(f"{path}: question #{i} is not an object")
        for key in ("id", "input", "profile"):
            if key not in q:
                fail(f"{path}: question #{i} (id {q.get('id', '?')!r}) is missing field '{key}'")
        qid = str(q["id"])
        if not is_safe_id(user_id_of(qid)):   # any question may name its user: refuse before anything is written
            fail(f"{path}: question #{i} (id {q['id']!r}) would name its user {user_id_of(qid)!r}, not a safe id: "
                 f"{ID_RULE}")
        if not isinstance(q["profile"], list):
            fail(f"{path}: question {qid!r}: 'profile' must be a list of history items")
        for k, item in enumerate(q["profile"]):
            if not isinstance(item, dict) or "id" not in item:
                fail(f"{path}: question {qid!r}: profile item #{k} needs an 'id'")
        if golds is not None and qid not in golds:
            fail(f"{path}: question {qid!r} has no output in {path.name.replace('_questions', '_outputs')}")
        try:
            document = normalize(task.parse_query(q["input"], qid)[0])
        except PerpcsError as err:
            fail(f"{path}: {err}")
        gold = golds[qid] if golds is not None else None
        question = Question(qid, q["input"], gold, tuple(q["profile"]), path.name, document)
        object.__setattr__(question, "item_keys", tuple(_share_values(item, key, canon)
                                                         for item, key in zip(question.profile, question.item_keys)))
        questions.append(question)
    return questions


def _share_values(item: dict, key: bytes, canon: dict) -> bytes:
    """Point the item's values (all but the id, equal by item_key) at the first copy's; returns the first copy's
    key object."""
    first = canon.get(key)
    if first is None:
        canon[key] = (key, item)
        return key
    first_key, first_item = first
    for name in item:
        if name != "id":
            item[name] = first_item[name]
    return first_key
