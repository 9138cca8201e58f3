"""The data layer: the authors' processed files drop in as they are; validation names file, user and field."""
import json

import pytest

from perpcs.data import Layout, check_queries, load_users, write_json_atomic
from perpcs.errors import PerpcsError
from perpcs.tasks import get_task

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
