"""The data layer: the authors' processed files drop in as they are; validation names file, user and field."""
import json

import pytest

from perpcs.data.layout import Layout, check_queries, golds_from_users, load_users, validate_users
from perpcs.atomic import write_json_atomic
from perpcs.errors import PerpcsError
from perpcs.data.tasks import get_task

TASK = get_task("product_rating")
QUERY = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
         "without further explanation. review: Solid blender.")


def authors_style_users():
    """Like the authors' processed zip: extra fields, integer dates and scores."""
    return [{"user_id": 17, "extra": "kept", "profile": [{"id": "1", "text": "good", "score": 5, "date": 2011,
                                                          "asin": "B00"}],
             "query": [{"id": "31", "input": QUERY, "gold": "4"}]},
            {"user_id": "u2", "profile": [], "query": [{"id": "32", "input": QUERY, "gold": "2"}]}]


def test_authors_files_drop_in_and_golds_are_derived(tmp_path, capsys):
    layout = Layout(tmp_path, TASK)
    users = authors_style_users()
    write_json_atomic(layout.test_users, users)
    loaded = layout.load_split("test", check=True)
    assert loaded == users                               # validated, not changed
    golds = layout.load_golds()
    assert golds == {"task": "LaMP_3", "golds": [{"id": "31", "output": "4"}, {"id": "32", "output": "2"}]}
    assert "derived" in capsys.readouterr().out


@pytest.mark.parametrize("mutate,expected", [
    (lambda u: u[1].pop("user_id"), r"user #1 \(user_id '\?'\): missing field 'user_id'"),
    (lambda u: u[0].pop("query"), r"user #0 \(user_id 17\): missing field 'query'"),
    (lambda u: u[0]["profile"][0].pop("score"), r"user #0 .*profile item #0 \(id '1'\) is missing field 'score'"),
])
def test_validation_names_file_user_and_field(tmp_path, mutate, expected):
    users = authors_style_users()
    mutate(users)
    path = tmp_path / "users.json"
    path.write_text(json.dumps(users))
    with pytest.raises(PerpcsError, match=expected) as err:
        load_users(path, TASK)
    assert str(path) in str(err.value)


def set_field(user: int, where: str, index: int, field: str, value):
    """A mutation for the parametrized checks: users[user][where][index][field] = value."""
    return lambda u: u[user][where][index].__setitem__(field, value)


@pytest.mark.parametrize("mutate,expected", [
    (set_field(0, "query", 0, "gold", None), r"user #0 \(user_id 17\): query #0 \(id '31'\): field 'gold' must be "
                                             r"a string or a number, got null"),
    (set_field(1, "query", 0, "gold", ["2"]), r"user #1 \(user_id 'u2'\): query #0 \(id '32'\): field 'gold' .*"
                                              r"got a list"),
    (set_field(1, "query", 0, "gold", True), r"user #1 .*query #0 \(id '32'\): field 'gold' .*got a boolean"),
    (set_field(0, "query", 0, "input", None), r"user #0 .*query #0 \(id '31'\): field 'input' must be a string, "
                                              r"got null"),
    (set_field(1, "query", 0, "input", {"review": "x"}), r"user #1 .*query #0 \(id '32'\): field 'input' .*object"),
    (set_field(1, "query", 0, "id", ["32"]), r"user #1 \(user_id 'u2'\): query #0: field 'id' must be a string or "
                                             r"an integer, got a list"),
    (set_field(0, "profile", 0, "text", ["a", "b"]), r"user #0 \(user_id 17\): profile item #0 \(id '1'\): field "
                                                     r"'text' must be a string or a number, got a list"),
    (set_field(0, "profile", 0, "text", {"a": 1}), r"user #0 .*profile item #0 \(id '1'\): field 'text' .*object"),
    (set_field(0, "profile", 0, "score", False), r"user #0 .*profile item #0 \(id '1'\): field 'score' .*boolean"),
    (lambda u: u[1].update(user_id=["u2"]), r"user #1 .*field 'user_id' must be a string or an integer, got a list"),
    (lambda u: u[1].update(user_id=True), r"user #1 .*field 'user_id' must be a string or an integer, got a boolean"),
], ids=["null-gold", "list-gold", "bool-gold", "null-input", "object-input", "list-id", "list-text", "object-text",
        "bool-score", "list-user_id", "bool-user_id"])
def test_wrong_field_types_are_refused(tmp_path, mutate, expected):
    """A null gold would train on " None"; a list or object field would reach the prompt as a Python repr."""
    users = authors_style_users()
    mutate(users)
    path = tmp_path / "users.json"
    path.write_text(json.dumps(users))
    with pytest.raises(PerpcsError, match=expected) as err:
        load_users(path, TASK, need_gold=True)
    assert str(path) in str(err.value)


def test_numbers_are_accepted_where_natural():
    """Integer or float scores, dates and golds are fine; so is an absent gold when none is needed."""
    users = authors_style_users()
    users[0]["profile"][0].update(score=4.5, text=12)
    users[0]["query"][0]["gold"] = 4
    users[1]["query"][0]["id"] = 32
    assert validate_users(users, "u.json", TASK, need_gold=True) is users
    del users[1]["query"][0]["gold"]
    users[0]["query"][0]["gold"] = None
    assert validate_users(users, "u.json", TASK) is users
    with pytest.raises(PerpcsError, match=r"user #0 \(user_id '17'\) query '31' has no 'gold'"):
        golds_from_users(users, TASK)


def test_duplicate_query_ids_name_both_users(tmp_path):
    users = authors_style_users()
    users[1]["query"][0]["id"] = 31                      # "31" in user #0: ids compare as text
    path = tmp_path / "users.json"
    path.write_text(json.dumps(users))
    with pytest.raises(PerpcsError, match=r"users.json: user #1 \(user_id 'u2'\): query #0: id '31' is also the id "
                                          r"of query #0 of user #0 \(user_id 17\)"):
        load_users(path, TASK)


def test_duplicate_user_ids_are_refused(tmp_path):
    users = authors_style_users()
    users[1]["user_id"] = "17"                           # user #0 has 17: per-user outputs would collide
    with pytest.raises(PerpcsError, match=r"t.json: user #1 \(user_id '17'\): user_id '17' is also the id of "
                                          r"user #0"):
        validate_users(users, tmp_path / "t.json", TASK)


def test_duplicate_query_ids_within_one_user(tmp_path):
    users = authors_style_users()
    users[1]["query"].append({"id": "32", "input": QUERY, "gold": "3"})
    with pytest.raises(PerpcsError, match=r"t.json: user #1 \(user_id 'u2'\): query #1: id '32' is also the id of "
                                          r"query #0 of the same user"):
        validate_users(users, tmp_path / "t.json", TASK)


def test_malformed_json_gives_line_and_column(tmp_path):
    path = tmp_path / "users.json"
    path.write_text('[\n {"user_id": "a",\n  "profile": [}\n]')
    with pytest.raises(PerpcsError, match=r"users.json: malformed JSON at line 3, column 15"):
        load_users(path, TASK)


def test_a_query_without_the_marker_is_caught_at_load_time(tmp_path):
    users = authors_style_users()
    users[1]["query"][0]["input"] = "Rate this: Solid blender."
    with pytest.raises(PerpcsError, match=r"user #1 \(user_id 'u2'\).*query 32.*expected the marker"):
        check_queries(users, tmp_path / "t.json", TASK)


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    write_json_atomic(tmp_path / "a" / "b.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_golds_with_a_duplicate_id_are_refused(tmp_path):
    layout = Layout(tmp_path, TASK)
    write_json_atomic(layout.golds, {"task": "LaMP_3", "golds": [{"id": "1", "output": "4"},
                                                                  {"id": "1", "output": "5"}]})
    with pytest.raises(PerpcsError, match=r"golds.json: id '1' appears more than once \(entry #1\)"):
        layout.load_golds()
