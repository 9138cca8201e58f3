"""Reading and validating the data layout of docs/method.md section 3, and writing files atomically.

Loaded data is never changed in place: truncation and formatting make new strings (the original
truncated fields in place and crashed on integer ``date`` fields).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from perpcs.data.tasks import Task
from perpcs.errors import fail
from perpcs.paths import ID_RULE, is_safe_id


def read_json(path, what: str = "file"):
    """Parse a JSON file; a missing file or malformed JSON names the file (and line and column)."""
    path = Path(path)
    if not path.is_file():
        fail(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        fail(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}")
    except UnicodeDecodeError as err:
        fail(f"{path}: not UTF-8 text ({err})")


def _user_ref(index: int, user) -> str:
    uid = user.get("user_id", "?") if isinstance(user, dict) else "?"
    return f"user #{index} (user_id {uid!r})"


def _user_label(path, index: int, user) -> str:
    return f"{path}: {_user_ref(index, user)}"


def _json_type(value) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_text_or_number(value) -> bool:
    """Strings and numbers format as themselves in a prompt; null, booleans, lists and objects do not."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def validate_users(users, path, task: Task, need_gold: bool = False) -> list:
    """Check a users file's structure and field types; returns the same list (validated, unchanged).

    Query ids must be unique within the file (predictions and golds are matched by id), and so must user ids
    (per-user outputs are named user_<id>), which must also be safe file names (perpcs.paths.SAFE_ID).
    """
    if not isinstance(users, list):
        fail(f"{path}: expected a JSON list of users, got {type(users).__name__}")
    seen_ids: dict = {}                  # query id (as a string) -> (user index, query index)
    seen_users: dict = {}                # user id (as a string) -> user index
    for ui, user in enumerate(users):
        where = _user_label(path, ui, user)
        if not isinstance(user, dict):
            fail(f"{where}: expected an object with user_id, profile, query")
        for key in ("user_id", "profile", "query"):
            if key not in user:
                fail(f"{where}: missing field '{key}'")
        if not isinstance(user["user_id"], (str, int)) or isinstance(user["user_id"], bool):
            fail(f"{where}: field 'user_id' must be a string or an integer, got {_json_type(user['user_id'])}")
        if not is_safe_id(user["user_id"]):
            fail(f"{where}: field 'user_id' is not a safe id: {ID_RULE}")
        if str(user["user_id"]) in seen_users:
            fail(f"{where}: user_id {str(user['user_id'])!r} is also the id of user #{seen_users[str(user['user_id'])]}"
                 f"; user ids must be unique in a users file")
        seen_users[str(user["user_id"])] = ui
        if not isinstance(user["profile"], list):
            fail(f"{where}: field 'profile' must be a list of history items")
        if not isinstance(user["query"], list):
            fail(f"{where}: field 'query' must be a list")
        for hi, item in enumerate(user["profile"]):
            if not isinstance(item, dict):
                fail(f"{where}: profile item #{hi} is not an object")
            for fname in task.history_fields:
                if fname not in item or item[fname] is None:
                    fail(f"{where}: profile item #{hi} (id {item.get('id', '?')!r}) is missing field "
                         f"'{fname}' needed by task {task.name}")
                if not _is_text_or_number(item[fname]):
                    fail(f"{where}: profile item #{hi} (id {item.get('id', '?')!r}): field '{fname}' must be "
                         f"a string or a number, got {_json_type(item[fname])}")
        for qi, q in enumerate(user["query"]):
            if not isinstance(q, dict):
                fail(f"{where}: query #{qi} is not an object")
            for key in ("id", "input") + (("gold",) if need_gold else ()):
                if key not in q:
                    fail(f"{where}: query #{qi} (id {q.get('id', '?')!r}) is missing field '{key}'")
            qid = q["id"]
            if not isinstance(qid, (str, int)) or isinstance(qid, bool):
                fail(f"{where}: query #{qi}: field 'id' must be a string or an integer, got {_json_type(qid)}")
            if not isinstance(q["input"], str):
                fail(f"{where}: query #{qi} (id {qid!r}): field 'input' must be a string, "
                     f"got {_json_type(q['input'])}")
            if (need_gold or q.get("gold") is not None) and not _is_text_or_number(q.get("gold")):
                fail(f"{where}: query #{qi} (id {qid!r}): field 'gold' must be a string or a number, "
                     f"got {_json_type(q.get('gold'))}")
            text_id = str(qid)
            if text_id in seen_ids:
                pu, pq = seen_ids[text_id]
                other = "the same user" if pu == ui else _user_ref(pu, users[pu])
                fail(f"{where}: query #{qi}: id {text_id!r} is also the id of query #{pq} of {other}; "
                     f"query ids must be unique in a users file")
            seen_ids[text_id] = (ui, qi)
    return users


def load_users(path, task: Task, need_gold: bool = False) -> list:
    return validate_users(read_json(path, "users file"), path, task, need_gold)


def check_queries(users: list, path, task: Task) -> None:
    """Parse every query input now, so a malformed one stops the run before any model is loaded."""
    from perpcs.errors import PerpcsError
    for ui, user in enumerate(users):
        for q in user["query"]:
            try:
                task.parse_query(q["input"], q.get("id", "?"))
            except PerpcsError as err:
                fail(f"{_user_label(path, ui, user)}: {err}")


def user_id(user) -> str:
    return str(user["user_id"])


def load_profiles(path) -> dict:
    """``profile-id2text.json``: {user_id: profile text}."""
    profiles = read_json(path, "profile file")
    if not isinstance(profiles, dict):
        fail(f"{path}: expected a JSON object {{user_id: profile text}}")
    for uid, text in profiles.items():
        if not isinstance(text, str):
            fail(f"{path}: profile of user {uid!r} must be a string")
    return profiles


def gen_profile_command(task_name: str, data_dir) -> str:
    """``python data/gen_profile.py --task_name <task> --data_dir <data_dir>``, shell-quoted, as it is run from the
    repository root (the script's default model; see its --help for --model_path)."""
    import shlex
    return shlex.join(["python", "data/gen_profile.py", "--task_name", task_name, "--data_dir", str(data_dir)])


def profile_text(profiles: dict, user, path, index: int | None = None) -> str:
    uid = user_id(user)
    if uid not in profiles:
        who = f"user #{index} " if index is not None else "user "
        path = Path(path)   # <data_dir>/<task>/profile-id2text.json: the command that (re)writes it
        fail(f"{path}: no profile text for {who}(user_id {uid!r}); write the profiles of every user with: "
             f"{gen_profile_command(path.parent.name, path.parent.parent)} (or leave the profile variants out)")
    return profiles[uid]


def outputs_by_id(lamp: dict, what: str) -> dict:
    """A LaMP file {"task", "golds": [{"id", "output"}]} -> {id (as a string): output}.

    Duplicate ids and outputs that are not text are errors; numbers are accepted as text.
    """
    if not isinstance(lamp, dict) or not isinstance(lamp.get("golds"), list):
        fail(f"{what}: expected a LaMP file {{\"task\": ..., \"golds\": [{{\"id\", \"output\"}}]}}")
    outputs = {}
    for position, entry in enumerate(lamp["golds"]):
        if not isinstance(entry, dict) or "id" not in entry or "output" not in entry:
            fail(f"{what}: entry #{position} needs 'id' and 'output'")
        key, output = str(entry["id"]), entry["output"]
        if key in outputs:
            fail(f"{what}: id {key!r} appears more than once (entry #{position})")
        if isinstance(output, (int, float)) and not isinstance(output, bool):
            output = str(output)
        if not isinstance(output, str):
            fail(f"{what}: entry #{position} (id {key!r}): 'output' must be a string, "
                 f"got {type(output).__name__}")
        outputs[key] = output
    return outputs


def golds_from_users(users, task: Task) -> dict:
    """A LaMP golds file built from the test users' query golds (when golds.json is absent)."""
    golds = []
    for ui, user in enumerate(users):
        for q in user["query"]:
            if q.get("gold") is None:
                fail(f"no golds.json and user #{ui} (user_id {user_id(user)!r}) query {q.get('id')!r} "
                     f"has no 'gold' to derive it from")
            golds.append({"id": str(q["id"]), "output": q["gold"]})
    return {"task": task.lamp_id, "golds": golds}


@dataclass(frozen=True)
class Layout:
    """Paths of one task's data directory (docs/method.md section 3)."""

    data_dir: Path
    task: Task

    @property
    def root(self) -> Path:
        return Path(self.data_dir) / self.task.name

    @property
    def base_users(self) -> Path:
        return self.root / "user_base_LLM.json"

    @property
    def candidate_users(self) -> Path:
        return self.root / "user_anchor_candidate.json"

    @property
    def test_users(self) -> Path:
        return self.root / "test_100" / "user_test_100.json"

    @property
    def leaderboard_users(self) -> Path:
        """LaMP's test questions grouped into users (no golds): what a leaderboard submission predicts."""
        return self.root / "leaderboard" / "user_leaderboard.json"

    @property
    def reserve_users(self) -> Path:
        return self.root / "user_reserve_10_percent.json"

    @property
    def profiles(self) -> Path:
        return self.root / "profile-id2text.json"

    @property
    def golds(self) -> Path:
        return self.root / "test_100" / "golds.json"

    def split_path(self, split: str) -> Path:
        return {"base": self.base_users, "candidate": self.candidate_users, "test": self.test_users,
                "reserve": self.reserve_users, "leaderboard": self.leaderboard_users}[split]

    def load_split(self, split: str, need_gold: bool = False, check: bool = False) -> list:
        """A split's users; ``check`` also parses every query (for stages that build query prompts)."""
        users = load_users(self.split_path(split), self.task, need_gold=need_gold)
        if check:
            check_queries(users, self.split_path(split), self.task)
        return users

    def load_targets(self, split: str = "test") -> tuple:
        """(users, golds or None) of the users a stage predicts: ``test`` (with golds) or ``leaderboard`` (LaMP's
        test questions: none; the only split whose queries may lack a gold)."""
        if split == "test":
            users = self.load_split("test", check=True)
            return users, self.load_golds(users)
        if split != "leaderboard":
            fail(f"--test_split must be 'test' or 'leaderboard', got {split!r}")
        if not self.leaderboard_users.is_file():
            fail(f"{self.leaderboard_users} not found: run data/prepare_lamp.py --task_name {self.task.name} on the "
                 f"LaMP folder that holds test_questions.json (or its test/ subfolder)")
        return self.load_split("leaderboard", check=True), None

    def gen_profile_command(self) -> str:
        """The command that writes this layout's profile file (data/gen_profile.py, its default --output_file)."""
        return gen_profile_command(self.task.name, self.data_dir)

    def load_profiles(self) -> dict:
        """The PAG profile texts; a missing file names the command that writes it."""
        if not self.profiles.is_file():
            fail(f"profile file not found: {self.profiles}; write it with: {self.gen_profile_command()}")
        return load_profiles(self.profiles)

    def load_golds(self, test_users=None) -> dict:
        """The test golds as a LaMP dict; derived from the test users' queries when golds.json is absent."""
        if self.golds.is_file():
            raw = read_json(self.golds, "golds file")
            outputs_by_id(raw, str(self.golds))
            return raw
        users = test_users if test_users is not None else self.load_split("test")
        print(f"note: {self.golds} not found; golds derived from the test users' query golds")
        return golds_from_users(users, self.task)


def all_splits_users(layout: Layout, splits=("base", "candidate", "test", "reserve", "leaderboard")) -> list:
    """Users of every split that exists (profile generation reads them all, the leaderboard's too)."""
    users = []
    for split in splits:
        path = layout.split_path(split)
        if path.is_file():
            users.extend(layout.load_split(split))
    return users


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
