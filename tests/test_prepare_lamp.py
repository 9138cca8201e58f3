"""Raw LaMP -> project layout: grouping into users, splits, golds, citation mapping, errors, end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from perpcs.data.layout import Layout
from perpcs.errors import PerpcsError
from perpcs.data.lamp_files import Question
from perpcs.data.prepare import (DOCUMENT_FIELD, LABELLED_DOCUMENT_TASKS, build_user, group_questions, prepare_lamp,
                                  split_users)
from perpcs.data.tasks import TASKS, get_task

ROOT = Path(__file__).resolve().parents[1]
MOVIE = get_task("movie_tagging")
SPLITS = ("base", "candidate", "test", "reserve")


def _item(i, day=None, item_id=None):
    """A movie history item; its content is fixed by i, its id by the question (LaMP numbers items per question)."""
    item = {"id": str(i) if item_id is None else item_id, "description": f"A film numbered {i}.", "tag": "comedy"}
    if day is not None:
        item["date"] = f"2020-01-{day:02d}"
    return item


def _input(document):
    return f"Which tag does this movie relate to among the following tags? [comedy, action] description: {document}"


def _question(qid, item_ids, dates=None, document=None):
    """A question whose items get per-question ids (qid-k), as in LaMP; its own document is 'film <qid>'."""
    profile = [_item(i, None if dates is None else dates[k], f"{qid}-{k}") for k, i in enumerate(item_ids)]
    return {"id": qid, "input": _input(document or f"film {qid}"), "profile": profile}


def _doc_item(text, item_id):
    return {"id": item_id, "description": text, "tag": "action"}


def _write_raw(directory, train, dev=(), task="LaMP_2M", drop_output=None):
    directory.mkdir(parents=True, exist_ok=True)
    for split, questions in (("train", train), ("dev", dev)):
        if not questions:
            continue
        (directory / f"{split}_questions.json").write_text(json.dumps(list(questions)))
        golds = [{"id": q["id"], "output": f"gold-{q['id']}"} for q in questions if q["id"] != drop_output]
        (directory / f"{split}_outputs.json").write_text(json.dumps({"task": task, "golds": golds}))


def _hand_made(directory):
    """A: 3 prefix questions over train+dev plus c1, which shares A's first items without extending them;
    B: the other long user; D: one question; E: dates out of order; F: user-based split (each question's
    profile is the user's other documents); G: two documents, each question's profile is the other one
    (nothing shared: two users)."""
    docs = {f"F{i}": f"Film F{i} is a long story about a family." for i in range(1, 5)}
    docs.update({"G1": "Film G1 is about a dog.", "G2": "Film G2 is about a cat."})
    train = [
        _question("a2", [1, 2, 3]),
        _question("b1", [10, 11]),
        _question("a1", [1, 2]),
        _question("c1", [1, 2, 5]),
        _question("d1", [20]),
        _question("e1", [30, 31, 32], dates=[5, 1, 9]),
        {"id": "f1", "input": _input(docs["F1"]),
         "profile": [_doc_item(docs[d], f"f1-{k}") for k, d in enumerate(["F2", "F3", "F4"])]},
        {"id": "f2", "input": _input(docs["F2"]),
         "profile": [_doc_item(docs[d], f"f2-{k}") for k, d in enumerate(["F1", "F3", "F4"])]},
        {"id": "g1", "input": _input(docs["G1"]), "profile": [_doc_item(docs["G2"], "g1-0")]},
        {"id": "g2", "input": _input(docs["G2"]), "profile": [_doc_item(docs["G1"], "g2-0")]},
    ]
    dev = [_question("b2", [10, 11, 12, 13, 14]), _question("a3", [1, 2, 3, 4])]
    _write_raw(directory, train, dev)
    return docs


def _by_id(users):
    return {u["user_id"]: u for u in users}


def _descriptions(user):
    return [it["description"] for it in user["profile"]]


def test_grouping_by_content_from_train_and_dev_and_both_lamp_splits(tmp_path, capsys):
    docs = _hand_made(tmp_path / "raw")
    summary = prepare_lamp("movie_tagging", tmp_path / "raw", tmp_path / "out", n_test=2, seed=0)
    out = capsys.readouterr().out
    assert summary["users"] == 7
    assert summary["joined_by_history"] == 5                                          # A: 3, B: 1, F: 1
    assert summary["query_documents_removed"] == 2 and "2 query documents removed" in out       # F1, F2
    layout = Layout(tmp_path / "out", MOVIE)
    users = {}
    for split in SPLITS:
        users.update(_by_id(layout.load_split(split, need_gold=True)))
    assert set(users) == {"ua1", "ub1", "ud1", "ue1", "uf1", "ug1", "ug2"}
    a = users["ua1"]
    assert _descriptions(a) == [f"A film numbered {i}." for i in (1, 2, 3, 4, 5)]   # union, longest first
    assert [it["id"] for it in a["profile"]][:4] == ["a3-0", "a3-1", "a3-2", "a3-3"]
    assert [q["id"] for q in a["query"]] == ["a1", "a2", "c1", "a3"]                 # train and dev merged
    assert [q["gold"] for q in a["query"]] == ["gold-a1", "gold-a2", "gold-c1", "gold-a3"]
    assert _descriptions(users["ue1"]) == ["A film numbered 31.", "A film numbered 30.", "A film numbered 32."]
    # user-based split: the user's own query documents (with their labels) are not left in its history
    assert _descriptions(users["uf1"]) == [docs["F3"], docs["F4"]]
    assert [q["id"] for q in users["uf1"]["query"]] == ["f1", "f2"]
    assert _descriptions(users["ug1"]) == [docs["G2"]] and _descriptions(users["ug2"]) == [docs["G1"]]
    # Test users are the longest (A and B: 5 items; ties by user id).
    assert [u["user_id"] for u in layout.load_split("test")] == ["ua1", "ub1"]


def test_group_questions_unit():
    def q(qid, contents, document=""):
        return Question(qid, "x", "g", tuple({"id": f"{qid}{k}", "description": f"d{c}", "tag": "t"}
                                             for k, c in enumerate(contents)), "train_questions.json", document)
    grouping = group_questions([q("3", [1, 2, 3]), q("1", [1]), q("2", [1, 2]), q("4", [1, 3]), q("5", []),
                                q("6", [7, 8, 9, 10]), q("7", [9, 11, 12, 13]), q("8", [20], "d21"),
                                q("9", [21])])
    # 1-4 overlap by half or more; 6 and 7 share 1 of 4 items: not one user; 8's own document being 9's item
    # is no evidence (two users can tag one movie)
    assert [[x.id for x in u] for u in grouping.users] == [["5"], ["1", "2", "4", "3"], ["8"], ["9"], ["6"], ["7"]]
    assert grouping.joined_by_history == 3 and grouping.empty_profiles == 1


def test_an_item_in_too_many_profiles_proves_nothing(monkeypatch):
    import perpcs.data.prepare as prepare

    monkeypatch.setattr(prepare, "MAX_POSTINGS", 2)
    questions = [Question(str(i), "x", "g", ({"id": f"{i}a", "description": "boilerplate", "tag": "t"},),
                          "train_questions.json") for i in range(3)]
    grouping = group_questions(questions)
    assert len(grouping.users) == 3 and grouping.common_items == 1


def test_real_lamp_questions_are_grouped_and_their_documents_leave_the_history(tmp_path, lamp2_full_rows):
    """Five real LaMP-2 (news) questions (../shared/lamp_real, CC BY-NC-SA 4.0, see SOURCES.md there): item ids
    are renumbered per question, one author's questions hold each other's articles with their categories."""
    rows = lamp2_full_rows
    questions = [{"id": r["id"], "input": r["question"], "profile": r["profile"]} for r in rows]
    # no golds are published with these questions: any valid category serves
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dev_questions.json").write_text(json.dumps(questions))
    (raw / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_2", "golds": [
        {"id": r["id"], "output": "politics"} for r in rows]}))
    summary = prepare_lamp("news_categorize", raw, tmp_path / "out", n_test=1, verbose=False)
    assert summary["users"] == 2
    task = get_task("news_categorize")
    layout = Layout(tmp_path / "out", task)
    users = [u for s in SPLITS for u in layout.load_split(s, need_gold=True)]
    assert sorted(sorted(q["id"] for q in u["query"]) for u in users) == [["110", "111", "112"], ["113", "114"]]
    articles = {" ".join(task.parse_query(q["input"])[0].split()) for u in users for q in u["query"]}
    history = [" ".join(it["text"].split()) for u in users for it in u["profile"]]
    assert history and not articles & set(history)      # no query's own article is left in any history
    assert summary["query_documents_removed"] == 5      # each article was in a sibling's profile


def test_profile_without_comparable_dates_keeps_given_order(tmp_path):
    train = [_question("x1", [3, 1, 2])]
    train[0]["profile"][0]["date"] = "2020-01-01"           # only one item dated: keep the given order
    train.append(_question("y1", [7, 8]))
    train.append(_question("z1", [9]))
    _write_raw(tmp_path / "raw", train)
    prepare_lamp("movie_tagging", tmp_path / "raw", tmp_path / "out", n_test=1, verbose=False)
    test = Layout(tmp_path / "out", MOVIE).load_split("test")
    assert _descriptions(test[0]) == ["A film numbered 3.", "A film numbered 1.", "A film numbered 2."]


def _many_users(directory, n_users):
    """n_users single-question users with history lengths 1..n_users (in a scrambled file order)."""
    train = [_question(f"q{k:03d}", [1000 * k + i for i in range(1 + (k * 7) % n_users)]) for k in range(n_users)]
    _write_raw(directory, train)
    return {f"uq{k:03d}": 1 + (k * 7) % n_users for k in range(n_users)}


def test_test_users_are_longest_and_fractions_are_honoured(tmp_path):
    lengths = _many_users(tmp_path / "raw", 50)
    summary = prepare_lamp("movie_tagging", tmp_path / "raw", tmp_path / "out", n_test=10, seed=0,
                           base_frac=0.5, candidate_frac=0.4, reserve_frac=0.1, verbose=False)
    layout = Layout(tmp_path / "out", MOVIE)
    splits = {s: layout.load_split(s, need_gold=True) for s in SPLITS}
    assert [len(splits[s]) for s in SPLITS] == [20, 16, 10, 4]
    assert summary["files"]["test"]["users"] == 10 and summary["unused_users"] == 0
    shortest_test = min(lengths[u["user_id"]] for u in splits["test"])
    others = [u for s in ("base", "candidate", "reserve") for u in splits[s]]
    assert shortest_test >= max(lengths[u["user_id"]] for u in others)
    assert sorted(u["user_id"] for s in SPLITS for u in splits[s]) == sorted(lengths)   # each user once
    # Fractions that leave users out; another seed draws other base users.
    prepare_lamp("movie_tagging", tmp_path / "raw", tmp_path / "out2", n_test=10, seed=1,
                 base_frac=0.25, candidate_frac=0.25, reserve_frac=0.0, verbose=False)
    other = Layout(tmp_path / "out2", MOVIE)
    assert len(other.load_split("base")) == 10 and len(other.load_split("candidate")) == 10
    assert other.load_split("reserve") == []
    assert {u["user_id"] for u in other.load_split("base")} != {u["user_id"] for u in splits["base"]}


def test_golds_file_matches_test_queries(tmp_path):
    _hand_made(tmp_path / "raw")
    prepare_lamp("movie_tagging", tmp_path / "raw", tmp_path / "out", n_test=2, verbose=False)
    layout = Layout(tmp_path / "out", MOVIE)
    golds = layout.load_golds()
    assert golds["task"] == "LaMP_2M"
    expected = [{"id": q["id"], "output": q["gold"]} for u in layout.load_split("test") for q in u["query"]]
    assert golds["golds"] == expected and len(expected) == 4 + 2      # users A and B


def test_rerun_is_byte_identical(tmp_path):
    _many_users(tmp_path / "raw", 30)
    for out in ("a", "b"):
        prepare_lamp("movie_tagging", tmp_path / "raw", tmp_path / out, n_test=5, seed=3, verbose=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.json"))
    assert len(files) == 5
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    text = (tmp_path / "a" / "movie_tagging" / "user_base_LLM.json").read_text(encoding="utf-8")
    assert text.startswith("[\n {\n  \"user_id\"")           # indent=1


def _citation_raw(directory):
    train = []
    for k in range(3):
        profile = [{"id": f"{k}-{i}", "title": f"Paper {k}-{i}", "abstract": f"We study thing {k}-{i}.",
                    "date": 2000 + i} for i in range(k + 1)]
        train.append({"id": f"c{k}", "profile": profile,
                      "input": 'For an author who has written the paper with the title "T", which reference is '
                               'related? Just answer with [1] or [2] without explanation. [1]: "A" [2]: "B"'})
    train[0]["profile"][0]["citation"] = "already there"
    _write_raw(directory, train, task="LaMP_1")


@pytest.mark.parametrize("field", ["abstract", "title"])
def test_citation_field_mapping(tmp_path, field):
    _citation_raw(tmp_path / "raw")
    prepare_lamp("citation", tmp_path / "raw", tmp_path / "out", n_test=1, citation_field=field, verbose=False)
    layout = Layout(tmp_path / "out", get_task("citation"))
    items = [it for s in SPLITS for u in layout.load_split(s) for it in u["profile"]]
    assert len(items) == 6
    for item in items:
        assert item["title"].startswith("Paper") and item["abstract"].startswith("We study")   # originals kept
        expected = "already there" if item["id"] == "0-0" else item[field]
        assert item["citation"] == expected


def test_build_user_does_not_mutate_input():
    items = ({"id": "1", "title": "T", "abstract": "A", "date": 2001}, {"id": "0", "title": "U", "abstract": "B",
                                                                        "date": 2000})
    question = Question("q", "x", "[1]", items, "train_questions.json")
    user, removed = build_user([question], get_task("citation"))
    assert removed == 0
    assert [it["id"] for it in user["profile"]] == ["0", "1"]
    assert all("citation" not in it for it in items) and [it["id"] for it in items] == ["1", "0"]


def test_citation_keeps_the_query_paper_in_its_authors_history():
    """LaMP-1 as downloaded: a question's profile is its author's papers (title, abstract), the paper it asks about
    among them (every real LaMP_1 question in ../shared/lamp_real). No item says which reference a paper cites,
    so that item hands nothing to BM25 or OPPU: it stays, as LaMP gives it (other tasks' items hold the answer)."""
    query = ('For an author who has written the paper with the title "Routing  around a rectangle", which reference '
             'is related? Just answer with [1] or [2] without explanation. [1]: "A" [2]: "B"')
    items = ({"id": "00", "title": "Graph drawing", "abstract": "We draw."},
             {"id": "01", "title": "Routing around a rectangle", "abstract": "We route."})
    task = get_task("citation")
    question = Question("000", query, "[1]", items, "train_questions.json",
                        " ".join(task.parse_query(query)[0].split()))
    user, removed = build_user([question], task)
    assert removed == 0 and [it["title"] for it in user["profile"]] == ["Graph drawing", "Routing around a rectangle"]
    # a labelled document (news: the article with its category) still leaves its user's history
    news = get_task("news_categorize")
    article = "Vote counts are in."
    sibling = Question("1", _news_input(article), "politics",
                       ({"id": "10", "text": article, "title": "t", "category": "politics"},
                        {"id": "11", "text": "Other.", "title": "u", "category": "sports"}), "train_questions.json",
                       article)
    user, removed = build_user([sibling], news)
    assert removed == 1 and [it["text"] for it in user["profile"]] == ["Other."]


def _news_input(article):
    return ("Which category does this article relate to among the following categories? Just answer with the "
            f"category name without further explanation. categories: [politics, sports] article: {article}")


def test_real_lamp_1_users_keep_every_paper_of_their_profile(tmp_path, lamp_real_dir):
    """Real LaMP_1 (user-based: one question per author): each user's history is its question's whole profile."""
    lamp = lamp_real_dir / "LaMP_1"
    summary = prepare_lamp("LaMP_1", lamp, tmp_path / "out", n_test=2, verbose=False)
    assert summary["users"] == 8 and summary["query_documents_removed"] == 0
    raw = {q["id"]: len(q["profile"]) for split in ("train", "dev")
           for q in json.loads((lamp / split / f"{split}_questions.json").read_text())}
    layout = Layout(tmp_path / "out", get_task("citation"))
    users = [u for s in SPLITS for u in layout.load_split(s, need_gold=True)]
    assert {u["user_id"]: len(u["profile"]) for u in users} == {f"u{q}": n for q, n in raw.items()}
    board = layout.load_split("leaderboard")
    test_raw = {q["id"]: len(q["profile"]) for q in json.loads((lamp / "test" / "test_questions.json").read_text())}
    assert {u["user_id"]: len(u["profile"]) for u in board} == {f"u{q}": n for q, n in test_raw.items()}


def test_missing_output_exits_2_and_names_the_id(tmp_path):
    _hand_made(tmp_path / "raw")
    _write_raw(tmp_path / "raw", [_question("a1", [1]), _question("lonely7", [9])], drop_output="lonely7")
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "prepare_lamp.py"), "--task_name", "movie_tagging",
                           "--lamp_dir", str(tmp_path / "raw"), "--out_dir", str(tmp_path / "out"), "--n_test", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "lonely7" in proc.stderr and "train_questions.json" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_too_few_users_suggests_n_test(tmp_path):
    _hand_made(tmp_path / "raw")
    with pytest.raises(PerpcsError, match="--n_test"):
        prepare_lamp("movie_tagging", tmp_path / "raw", tmp_path / "out", n_test=100, verbose=False)


def test_wrong_task_and_bad_fractions_are_errors(tmp_path):
    _hand_made(tmp_path / "raw")
    with pytest.raises(PerpcsError, match="LaMP_2M"):
        prepare_lamp("product_rating", tmp_path / "raw", tmp_path / "out", n_test=1, verbose=False)
    with pytest.raises(PerpcsError, match="at most 1"):
        split_users([{"user_id": str(i), "profile": []} for i in range(5)], 1, 0.6, 0.5, 0.0, 0)


@pytest.mark.parametrize("task_name", list(TASKS))
def test_make_sample_then_prepare_end_to_end(tmp_path, task_name):
    raw, out = tmp_path / "raw", tmp_path / "data"
    run = [sys.executable, str(ROOT / "data" / "make_sample.py"), "--task_name", task_name, "--out_dir", str(raw),
           "--n_users", "12", "--n_history", "6", "--n_queries", "3", "--seed", "0"]
    subprocess.run(run, check=True, capture_output=True, cwd=tmp_path)
    prep = subprocess.run([sys.executable, str(ROOT / "data" / "prepare_lamp.py"), "--task_name", task_name,
                           "--lamp_dir", str(raw), "--out_dir", str(out), "--n_test", "3"],
                          check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "12 users (" in prep.stdout
    task = get_task(task_name)
    layout = Layout(out, task)
    splits = {s: layout.load_split(s, need_gold=True) for s in SPLITS}
    assert [len(splits[s]) for s in SPLITS] == [5, 3, 3, 1]   # 9 non-test users: 4.5 rounds up
    info = json.loads((raw / "sample_info.json").read_text())
    groups = {f"u{u['question_ids'][0]}": u["question_ids"] for u in info["users"]}
    raw_questions = {q["id"]: q for split in ("train", "dev")
                     for q in json.loads((raw / f"{split}_questions.json").read_text())}
    field = DOCUMENT_FIELD[task_name]
    removed = 0
    for users in splits.values():
        for user in users:
            assert [q["id"] for q in user["query"]] == groups[user["user_id"]]     # users recovered exactly
            # the whole history (the last question's profile, items renumbered per question) but the
            # user's own query documents: the template generator sometimes repeats one of them
            own = ({" ".join(task.parse_query(q["input"])[0].split()) for q in user["query"]}
                   if task_name in LABELLED_DOCUMENT_TASKS else set())
            full = raw_questions[user["query"][-1]["id"]]["profile"]
            kept = [it for it in full if " ".join(it[field].split()) not in own]
            assert [it[field] for it in user["profile"]] == [it[field] for it in kept]
            removed += len(full) - len(kept)
            for q in user["query"]:
                task.parse_query(q["input"], q["id"])
    assert len(layout.load_golds()["golds"]) == 3 * 3
    assert f" {removed} query documents removed" in prep.stdout


def test_questions_file_is_streamed_in_chunks_as_json_reads_it(tmp_path):
    """The questions file is decoded element by element from chunks (LaMP-3's is GBs): any chunk size, numbers
    and strings cut at a chunk's end, whitespace and nesting give what json.load gives; malformed files fail with
    read_json's message."""
    import random

    from perpcs.data.lamp_files import _question_list, _stream_json_list
    rng = random.Random(0)
    path = tmp_path / "q.json"
    for trial in range(60):
        data = [{"id": str(i), "input": "w\u00e9 \"q\"\n" * rng.randint(0, 9), "profile": [{"id": 7, "x": -1.5e-7}]}
                for i in range(rng.randint(0, 5))] + [rng.choice([123456, -2.5e10, "s", None, True, [], {}])]
        path.write_text(" \n" * (trial % 2) + json.dumps(data, indent=trial % 3 or None, ensure_ascii=trial % 2 == 0)
                        + "\n" * (trial % 2), encoding="utf-8")
        for chunk in (1, 2, 3, 5, 1 << 20):
            assert list(_stream_json_list(path, chunk)) == data, (trial, chunk)
    for text, message in (("[1, 2", "malformed JSON at line 1, column 6"), ("[1 2]", "malformed JSON"),
                          ("[1]]", "malformed JSON"), ("", "malformed JSON"),
                          ('{"id": 1}', "expected a JSON list of questions")):
        path.write_text(text)
        with pytest.raises(PerpcsError, match=message):
            list(_question_list(path))


def test_an_items_copies_in_several_profiles_share_their_values(tmp_path):
    """LaMP repeats a user's items in every question's profile (another id each time): the values are kept once,
    which bounds prepare's memory on LaMP-sized files; ids stay each copy's own."""
    from perpcs.data.lamp_files import read_questions
    prompt = "without further explanation. review: "
    long_text = " ".join(f"word{i}" for i in range(200))
    questions = [{"id": str(q), "input": prompt + f"query {q}",
                  "profile": [{"id": f"{q}{k}", "text": f"{long_text} {k}", "score": "4"} for k in range(3 + q)]}
                 for q in range(3)]
    (tmp_path / "train_questions.json").write_text(json.dumps(questions))
    (tmp_path / "train_outputs.json").write_text(json.dumps(
        {"task": "LaMP_3", "golds": [{"id": str(q), "output": "5"} for q in range(3)]}))
    read = read_questions(tmp_path, get_task("product_rating"))
    first, last = read[0].profile, read[2].profile
    assert [it["id"] for it in last] == [f"2{k}" for k in range(5)]
    for k in range(3):
        assert last[k] == {"id": f"2{k}", "text": f"{long_text} {k}", "score": "4"}
        assert last[k]["text"] is first[k]["text"]      # one string for all copies
        assert read[2].item_keys[k] is read[0].item_keys[k]


# ---- every download shape LaMP ships ----------------------------------------------------------------------

def _lamp_download(root, based: str, subfolders: bool, with_dev: bool, with_test: bool = True,
                   with_train: bool = True) -> dict:
    """A tiny LaMP task folder in one of its shapes; returns {split: [question ids]}.
    time-based: the same users in every split, each split's profile extending the previous one (prefixes);
    user-based: every question is a user of its own, its profile that user's other documents."""
    if based == "time":
        def question(user, split, n):
            base = {"A": 1, "B": 10}[user]
            return _question(f"{split[:2]}{user}", list(range(base, base + n)))
        splits = {"train": [question(u, "train", 2) for u in "AB"], "dev": [question(u, "dev", 3) for u in "AB"],
                  "test": [question(u, "test", 4) for u in "AB"]}
    else:
        def question(qid):
            return {"id": qid, "input": _input(f"film {qid} is new"),
                    "profile": [_doc_item(f"Film {qid}-{k} of user {qid}.", f"{qid}-{k}") for k in range(2)]}
        splits = {"train": [question(q) for q in ("t1", "t2", "t3")], "dev": [question("d1")],
                  "test": [question("x1"), question("x2")]}
    kept = {s: qs for s, qs in splits.items()
            if {"train": with_train, "dev": with_dev, "test": with_test}[s]}
    for split, questions in kept.items():
        folder = root / split if subfolders else root
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}_questions.json").write_text(json.dumps(questions))
        if split != "test":   # LaMP publishes no test outputs
            golds = [{"id": q["id"], "output": "comedy"} for q in questions]
            (folder / f"{split}_outputs.json").write_text(json.dumps({"task": "LaMP_2", "golds": golds}))
    return {split: [q["id"] for q in qs] for split, qs in kept.items()}


@pytest.mark.parametrize("based", ["user", "time"])
@pytest.mark.parametrize("subfolders", [True, False], ids=["train-dev-test-folders", "flat"])
@pytest.mark.parametrize("with_dev", [True, False], ids=["with-dev", "no-dev"])
def test_every_lamp_download_shape_prepares(tmp_path, based, subfolders, with_dev):
    ids = _lamp_download(tmp_path / "raw", based, subfolders, with_dev)
    summary = prepare_lamp("LaMP_2", tmp_path / "raw", tmp_path / "out", n_test=1, verbose=False)
    layout = Layout(tmp_path / "out", MOVIE)
    users = [u for split in SPLITS for u in layout.load_split(split, need_gold=True)]
    queries = sorted(q["id"] for u in users for q in u["query"])
    assert queries == sorted(ids["train"] + ids.get("dev", []))
    board = layout.load_split("leaderboard")
    if based == "time":   # the same two users in train and dev (grouped by their shared history); test apart
        assert len(users) == 2 and summary["leaderboard"]["users"] == len(board) == 2
        assert sorted(len(u["query"]) for u in users) == ([2, 2] if with_dev else [1, 1])
    else:                 # one user per question
        assert len(users) == len(queries) and len(board) == 2
    assert sorted(q["id"] for u in board for q in u["query"]) == sorted(ids["test"])
    assert all(q.get("gold") is None for u in board for q in u["query"])


@pytest.mark.parametrize("subfolders", [True, False], ids=["test-folder", "flat"])
def test_a_test_only_download_writes_the_leaderboard_split_alone(tmp_path, subfolders, capsys):
    ids = _lamp_download(tmp_path / "raw", "time", subfolders, with_dev=False, with_train=False)
    summary = prepare_lamp("movie_tagging", tmp_path / "raw", tmp_path / "out", n_test=1)
    layout = Layout(tmp_path / "out", MOVIE)
    board = layout.load_split("leaderboard")
    assert summary["leaderboard_only"] and len(board) == 2
    assert sorted(q["id"] for u in board for q in u["query"]) == sorted(ids["test"])
    assert not any(layout.split_path(s).exists() for s in SPLITS) and not layout.golds.exists()
    assert "test questions only" in capsys.readouterr().out


def test_a_test_only_download_leaves_the_prepared_splits_alone(tmp_path):
    _lamp_download(tmp_path / "full", "time", True, with_dev=True, with_test=False)
    prepare_lamp("movie_tagging", tmp_path / "full", tmp_path / "out", n_test=1, verbose=False)
    layout = Layout(tmp_path / "out", MOVIE)
    before = {s: layout.split_path(s).read_bytes() for s in SPLITS}
    _lamp_download(tmp_path / "test_only", "time", True, with_dev=False, with_train=False)
    prepare_lamp("movie_tagging", tmp_path / "test_only", tmp_path / "out", n_test=1, verbose=False)
    assert {s: layout.split_path(s).read_bytes() for s in SPLITS} == before
    assert len(layout.load_split("leaderboard")) == 2


@pytest.mark.parametrize("task_name", ["LaMP_2", "movie_tagging"])
def test_a_folder_without_question_files_says_they_are_missing_first(tmp_path, task_name):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "README.txt").write_text("download the files here")
    with pytest.raises(PerpcsError) as err:
        prepare_lamp(task_name, tmp_path / "raw", tmp_path / "out", n_test=1, verbose=False)
    message = str(err.value)
    assert message.startswith("no LaMP questions files in") and "README.txt" in message
    assert "prompt" not in message and "LaMP_2M" not in message   # not LaMP_2's "which task?" question
    with pytest.raises(PerpcsError, match="no such folder"):
        prepare_lamp(task_name, tmp_path / "nowhere", tmp_path / "out", n_test=1, verbose=False)


@pytest.mark.parametrize("placeholder", ["No reference found", " no reference  FOUND ", ""])
def test_placeholder_golds_are_refused_naming_the_file(tmp_path, placeholder):
    _lamp_download(tmp_path / "raw", "user", True, with_dev=True)
    outputs = tmp_path / "raw" / "dev" / "dev_outputs.json"
    outputs.write_text(json.dumps({"task": "LaMP_2", "golds": [{"id": "d1", "output": placeholder}]}))
    with pytest.raises(PerpcsError) as err:
        prepare_lamp("movie_tagging", tmp_path / "raw", tmp_path / "out", n_test=1, verbose=False)
    assert str(outputs) in str(err.value) and "placeholder" in str(err.value) and "'d1'" in str(err.value)
    assert not (tmp_path / "out").exists()
