"""LaMP as downloaded (train/ dev/ test/ subfolders, LaMP ids, LaMP_2 detection) and the leaderboard file."""
import json
import shutil
from pathlib import Path

import pytest

from perpcs.data.layout import Layout, all_splits_users, user_id
from perpcs.data.prepare import prepare_lamp
from perpcs.data.sample import write_sample
from perpcs.data.tasks import get_task
from perpcs.errors import PerpcsError

MOVIE = get_task("movie_tagging")
OURS = ("base", "candidate", "test", "reserve")


def official_layout(root: Path, task_name="movie_tagging", n_users=10, n_board=3, seed=0) -> dict:
    """make_sample's flat files rearranged as LaMP's download: train/ and dev/ with outputs, and test/ holding the
    questions of the last ``n_board`` users without outputs. Returns {"board": [question ids per user], ...}."""
    flat = root / "flat"
    write_sample(task_name, flat, n_users=n_users, n_history=6, n_queries=2, seed=seed)
    info = json.loads((flat / "sample_info.json").read_text())
    board_ids = {qid for u in info["users"][-n_board:] for qid in u["question_ids"]}
    lamp = root / "LaMP"
    test = []
    for split in ("train", "dev"):
        questions = json.loads((flat / f"{split}_questions.json").read_text())
        outputs = json.loads((flat / f"{split}_outputs.json").read_text())
        test += [q for q in questions if q["id"] in board_ids]
        (lamp / split).mkdir(parents=True)
        (lamp / split / f"{split}_questions.json").write_text(
            json.dumps([q for q in questions if q["id"] not in board_ids]))
        outputs["golds"] = [g for g in outputs["golds"] if g["id"] not in board_ids]
        (lamp / split / f"{split}_outputs.json").write_text(json.dumps(outputs))
    (lamp / "test").mkdir()
    (lamp / "test" / "test_questions.json").write_text(json.dumps(test))
    train_dev = {q["id"] for s in ("train", "dev") for q in json.loads((flat / f"{s}_questions.json").read_text())}
    return {"lamp": lamp, "flat": flat, "board": [u["question_ids"] for u in info["users"][-n_board:]],
            "ours": train_dev - board_ids, "board_ids": board_ids}


def query_ids(users) -> set:
    return {q["id"] for u in users for q in u["query"]}


def test_official_layout_train_dev_become_users_test_becomes_the_leaderboard(tmp_path, capsys):
    made = official_layout(tmp_path)
    summary = prepare_lamp("LaMP_2M", made["lamp"], tmp_path / "data", n_test=2, verbose=True)
    layout = Layout(tmp_path / "data", MOVIE)
    ours = [u for s in OURS for u in layout.load_split(s, need_gold=True)]
    assert query_ids(ours) == made["ours"]                     # both train and dev questions, no test question
    dev_ids = {q["id"] for q in json.loads((made["lamp"] / "dev" / "dev_questions.json").read_text())}
    assert dev_ids and dev_ids <= query_ids(ours)
    board = layout.load_split("leaderboard")
    assert query_ids(board) == made["board_ids"]
    assert all("gold" not in q for u in board for q in u["query"])
    # grouped into users as train/dev questions are: the sample's users, recovered exactly
    assert sorted([q["id"] for q in u["query"]] for u in board) == sorted(made["board"])
    assert summary["leaderboard"]["questions"] == len(made["board_ids"])
    assert "leaderboard" in capsys.readouterr().out
    # profile generation reads the leaderboard users too (the profile variants need their texts)
    assert {user_id(u) for u in board} <= {user_id(u) for u in all_splits_users(layout)}


def test_official_layout_gives_the_same_users_as_the_flat_files(tmp_path):
    made = official_layout(tmp_path, n_board=1)
    # the flat folder without the test users' questions = the official layout's train and dev
    flat = tmp_path / "flat_same"
    flat.mkdir()
    for split in ("train", "dev"):
        for kind in ("questions", "outputs"):
            shutil.copy(made["lamp"] / split / f"{split}_{kind}.json", flat / f"{split}_{kind}.json")
    prepare_lamp("movie_tagging", flat, tmp_path / "a", n_test=2, verbose=False)
    prepare_lamp("movie_tagging", made["lamp"], tmp_path / "b", n_test=2, verbose=False)
    for split in OURS:
        rel = Layout(tmp_path / "a", MOVIE).split_path(split).relative_to(tmp_path / "a")
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert not Layout(tmp_path / "a", MOVIE).leaderboard_users.exists()   # no test questions, no leaderboard


def test_a_split_subfolder_is_refused_naming_its_parent(tmp_path):
    made = official_layout(tmp_path)
    with pytest.raises(PerpcsError, match=r"pass the parent, --lamp_dir .*LaMP\b") as err:
        prepare_lamp("movie_tagging", made["lamp"] / "train", tmp_path / "data", n_test=2, verbose=False)
    assert "dev/" in str(err.value)
    assert not (tmp_path / "data").exists()


def test_flat_and_subfolder_copies_of_one_split_are_ambiguous(tmp_path):
    made = official_layout(tmp_path)
    shutil.copy(made["lamp"] / "dev" / "dev_questions.json", made["lamp"] / "dev_questions.json")
    with pytest.raises(PerpcsError, match="keep one of them"):
        prepare_lamp("movie_tagging", made["lamp"], tmp_path / "data", n_test=2, verbose=False)


@pytest.mark.parametrize("task_name, detected", [("movie_tagging", "movie_tagging"),
                                                 ("news_categorize", "news_categorize")])
def test_lamp_2_is_detected_from_the_prompt(tmp_path, capsys, task_name, detected):
    made = official_layout(tmp_path, task_name)
    summary = prepare_lamp("LaMP_2", made["lamp"], tmp_path / "data", n_test=2, verbose=False)
    assert summary["task"] == detected
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and detected in out and get_task(detected).lamp_id in out
    assert Layout(tmp_path / "data", get_task(detected)).leaderboard_users.is_file()


def test_lamp_2_with_prompts_of_neither_or_both_versions_names_the_two_choices(tmp_path):
    made = official_layout(tmp_path, "movie_tagging")
    news = official_layout(tmp_path / "news", "news_categorize")
    # test questions of the other version: the files no longer say which task they are
    shutil.copy(news["lamp"] / "test" / "test_questions.json", made["lamp"] / "test" / "test_questions.json")
    with pytest.raises(PerpcsError, match="LaMP_2M.*LaMP_2N"):
        prepare_lamp("LaMP_2", made["lamp"], tmp_path / "data", n_test=2, verbose=False)
    with pytest.raises(PerpcsError, match="LaMP_2M.*LaMP_2N"):
        get_task("LaMP_2")


@pytest.mark.parametrize("name, expected", [("LaMP_1", "citation"), ("lamp_2m", "movie_tagging"),
                                            ("LaMP-2N", "news_categorize"), ("LAMP_3", "product_rating"),
                                            ("lamp-4", "news_headline"), ("LaMP_5", "scholarly_title"),
                                            ("LaMP_7", "tweet_paraphrase")])
def test_lamp_ids_in_any_spelling(name, expected):
    assert get_task(name).name == expected


def test_lamp_6_is_not_public():
    with pytest.raises(PerpcsError, match="not public"):
        get_task("LaMP_6")


def test_test_question_ids_must_differ_from_train_and_dev(tmp_path):
    made = official_layout(tmp_path)
    test = json.loads((made["lamp"] / "test" / "test_questions.json").read_text())
    test[0]["id"] = next(iter(sorted(made["ours"])))
    (made["lamp"] / "test" / "test_questions.json").write_text(json.dumps(test))
    with pytest.raises(PerpcsError, match="appears in both"):
        prepare_lamp("movie_tagging", made["lamp"], tmp_path / "data", n_test=2, verbose=False)


def test_stages_need_the_leaderboard_split_to_predict_it(tmp_path):
    made = official_layout(tmp_path)
    shutil.rmtree(made["lamp"] / "test")
    prepare_lamp("movie_tagging", made["lamp"], tmp_path / "data", n_test=2, verbose=False)
    with pytest.raises(PerpcsError, match="prepare_lamp.py"):
        Layout(tmp_path / "data", MOVIE).load_targets("leaderboard")


def test_leaderboard_file_checks_the_id_set(tmp_path):
    from perpcs.evaluation.leaderboard import write_leaderboard_file
    made = official_layout(tmp_path)
    prepare_lamp("movie_tagging", made["lamp"], tmp_path / "data", n_test=2, verbose=False)
    layout = Layout(tmp_path / "data", MOVIE)
    ids = sorted(made["board_ids"])
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"task": "LaMP_2M", "golds": [{"id": i, "output": "comedy"} for i in ids[1:]]}))
    with pytest.raises(PerpcsError, match=f"no prediction for 1 .*{ids[0]}"):
        write_leaderboard_file(layout, preds, tmp_path / "out.json")
    extra = [{"id": i, "output": "comedy"} for i in ids + ["not-a-test-id"]]
    preds.write_text(json.dumps({"task": "LaMP_2M", "golds": extra}))
    with pytest.raises(PerpcsError, match="not-a-test-id"):
        write_leaderboard_file(layout, preds, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_leaderboard_command_task_lora_on_the_tiny_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Done-when of issue 14: the official layout -> prepare -> `python -m perpcs leaderboard --method task-lora`
    (it runs stage 1 with --test_split leaderboard) -> LaMP's submission format, one entry per test question."""
    from perpcs.__main__ import main
    from perpcs.atomic import write_json_atomic
    made = official_layout(tmp_path, n_users=8, n_board=2)
    prepare_lamp("LaMP_2M", made["lamp"], tmp_path / "data", n_test=2, verbose=False)
    layout = Layout(tmp_path / "data", MOVIE)
    write_json_atomic(layout.profiles, {user_id(u): f"profile of {user_id(u)}" for u in all_splits_users(layout)})
    monkeypatch.chdir(tmp_path)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    stage = ["--llama_model_path", str(tiny_model_dir), "--device", "cpu", "--max_step", "1", "--max_seq_len",
             "256", "--k_list", "1", "--temperature", "0", "--max_gen_len", "4"]
    main(["leaderboard", "--task_name", "LaMP_2M", "--method", "task-lora", "--variant", "k1-profile",
          "--data_dir", "data", "--standalone", "--", *stage])   # no test run to inherit from
    out = tmp_path / "output" / "movie_tagging" / "leaderboard" / "task-lora-k1-profile" / "LaMP_2.json"
    board = json.loads(out.read_text())
    assert set(board) == {"task", "golds"} and board["task"] == "LaMP_2"
    assert all(set(e) == {"id", "output"} and isinstance(e["output"], str) for e in board["golds"])
    assert [e["id"] for e in board["golds"]] == [q["id"] for u in layout.load_split("leaderboard") for q in u["query"]]
    assert {e["id"] for e in board["golds"]} == made["board_ids"]
    stage_dir = tmp_path / "output" / "movie_tagging" / "task-base_LLM"
    # the leaderboard run wrote under leaderboard/, the test-split predictions were not made or touched
    assert (stage_dir / "leaderboard" / "predictions" / "k1-profile.json").is_file()
    assert not (stage_dir / "predictions").exists()
    # a second call finds the predictions and only writes the file (no stage run)
    capsys.readouterr()
    main(["leaderboard", "--task_name", "movie_tagging", "--method", "task-lora", "--variant", "kNP",
          "--output_file", "sub/LaMP_2.json", "--standalone"])
    printed = capsys.readouterr().out
    assert "running:" not in printed
    assert {e["id"] for e in json.loads((tmp_path / "sub" / "LaMP_2.json").read_text())["golds"]} == made["board_ids"]
