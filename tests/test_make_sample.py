"""The synthetic LaMP sample: format, determinism, time-split shape, and a real personalization signal."""
import json
import re
from collections import Counter, defaultdict
from datetime import date

import pytest

from perpcs.data.sample import MAX_GROUPS, N_GROUPS, generate, style_of, write_sample
from perpcs.data.tasks import TASKS, get_task

MAIN_FIELD = {"citation": "title", "movie_tagging": "description", "news_categorize": "text",
              "product_rating": "text", "news_headline": "text", "scholarly_title": "abstract",
              "tweet_paraphrase": "text"}
LABEL_FIELD = {"movie_tagging": "tag", "news_categorize": "category", "product_rating": "score"}
OUTPUT_FIELD = {"news_headline": "title", "scholarly_title": "title", "tweet_paraphrase": "text"}


def _questions(files):
    """All questions with their gold, by id."""
    golds = {}
    questions = {}
    for split in ("train", "dev"):
        golds.update({g["id"]: g["output"] for g in files[f"{split}_outputs.json"]["golds"]})
        questions.update({q["id"]: q for q in files[f"{split}_questions.json"]})
    return questions, golds


def _users(files):
    """(group, [questions in time order], golds) per user, from sample_info."""
    questions, golds = _questions(files)
    return [(u["group"], [questions[qid] for qid in u["question_ids"]], [golds[qid] for qid in u["question_ids"]])
            for u in files["sample_info.json"]["users"]]


def _words(text):
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for run in ("a", "b"):
        write_sample("news_headline", tmp_path / run, n_users=6, n_history=5, n_queries=2, seed=3)
    write_sample("news_headline", tmp_path / "c", n_users=6, n_history=5, n_queries=2, seed=4)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["dev_outputs.json", "dev_questions.json", "sample_info.json", "train_outputs.json",
                     "train_questions.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train_questions.json").read_bytes() != \
        (tmp_path / "c" / "train_questions.json").read_bytes()


@pytest.mark.parametrize("task_name", list(TASKS))
def test_inputs_parse_and_golds_are_valid(task_name):
    task = get_task(task_name)
    files = generate(task_name, n_users=8, n_history=6, n_queries=3, seed=1)
    assert files["train_outputs.json"]["task"] == task.lamp_id
    questions, golds = _questions(files)
    assert len(questions) == 8 * 3
    for qid, q in questions.items():
        parsed = task.parse_query(q["input"], qid)
        assert all(part.strip() for part in parsed)
        if task.labels:
            assert golds[qid] in task.labels
        else:
            assert golds[qid].strip()
        for item in q["profile"]:
            assert all(isinstance(item[f], str) and item[f] for f in task.history_fields if f != "citation")
            if task_name == "citation":     # raw LaMP-1 items: title + abstract (prepare_lamp adds citation)
                assert item["abstract"] and "citation" not in item
            if task.labels and task_name != "citation":
                assert item[LABEL_FIELD[task_name]] in task.labels
    # Texts read like the task: short sentences of words, not random tokens.
    lengths = [len(q["profile"][0][MAIN_FIELD[task_name]].split()) for q in questions.values()]
    assert max(lengths) <= 60


@pytest.mark.parametrize("task_name", list(TASKS))
def test_time_split_shape(task_name):
    n_history, n_queries = 7, 3
    files = generate(task_name, n_users=6, n_history=n_history, n_queries=n_queries, seed=2)
    task = get_task(task_name)
    dev_ids = {q["id"] for q in files["dev_questions.json"]}
    all_history = []

    def content(items):
        return [{k: v for k, v in item.items() if k != "id"} for item in items]

    for _group, questions, _golds in _users(files):
        assert questions[-1]["id"] in dev_ids and not any(q["id"] in dev_ids for q in questions[:-1])
        full = questions[-1]["profile"]
        for j, q in enumerate(questions):
            assert content(q["profile"]) == content(full[:n_history - n_queries + 1 + j])   # time-based prefixes
            assert [item["id"] for item in q["profile"]] == [f"{q['id']}-{k}" for k in range(len(q["profile"]))]
        all_history.extend(json.dumps(item, sort_keys=True) for item in content(full))
        dates = [item["date"] for item in full]
        assert dates == sorted(dates)
        if task_name in ("citation", "scholarly_title"):
            assert all(isinstance(d, int) for d in dates)
        else:
            assert all(date.fromisoformat(d) for d in dates)
        history_texts = {item[MAIN_FIELD[task_name]] for item in full}
        for q in questions:     # query texts are fresh: never a history item of the user
            assert task.parse_query(q["input"])[0] not in history_texts
    assert len(all_history) == len(set(all_history)) == 6 * n_history     # no item shared by two users


def _majority(values):
    return Counter(values).most_common(1)[0][0] if values else None


@pytest.mark.parametrize("task_name", ["movie_tagging", "news_categorize", "product_rating"])
def test_history_beats_group_blind_answer(task_name):
    files = generate(task_name, n_users=40, n_history=24, n_queries=4, seed=0)
    families = files["sample_info.json"]["families"]
    label = LABEL_FIELD[task_name]
    users = _users(files)
    by_family = defaultdict(list)
    for _group, questions, golds in users:
        for q, gold in zip(questions, golds):
            by_family[families[q["id"]]].append(gold)
    blind_answer = {fam: _majority(golds) for fam, golds in by_family.items()}   # best group-blind rule
    blind, personal, found_family, n = 0, 0, 0, 0
    blind_err, personal_err = 0.0, 0.0
    for _group, questions, golds in users:
        for q, gold in zip(questions, golds):
            fam = families[q["id"]]
            # The family is visible in the text: the most word-similar history item shares it.
            query_words = _words(q["input"].split("description: ")[-1].split("article: ")[-1].split("review: ")[-1])
            nearest = max(q["profile"], key=lambda it: len(query_words & _words(it[MAIN_FIELD[task_name]])))
            found_family += families[nearest["id"]] == fam
            # History rule: the user's most frequent label among past items of the same family.
            guess = _majority([it[label] for it in q["profile"] if families[it["id"]] == fam])
            personal += guess == gold
            blind += blind_answer[fam] == gold
            if task_name == "product_rating":
                personal_err += abs(int(guess) - int(gold))
                blind_err += abs(int(blind_answer[fam]) - int(gold))
            n += 1
    if task_name != "product_rating":       # rating families (sentiments) share product words on purpose
        assert found_family / n >= 0.9
    assert personal / n >= 0.9
    assert blind / n <= 0.6
    assert personal / n - blind / n >= 0.3
    if task_name == "product_rating":
        assert personal_err / n + 0.4 <= blind_err / n


def test_similar_users_share_habits():
    """Users of one group mostly give the same answer per family, and groups differ: sharers' habits transfer."""
    _check_group_habits(N_GROUPS, generate("movie_tagging", n_users=24, n_history=24, n_queries=2, seed=5))


@pytest.mark.parametrize("n_groups", [2, 5, MAX_GROUPS])
def test_other_numbers_of_groups_have_distinct_habits(n_groups):
    files = generate("movie_tagging", n_users=6 * n_groups, n_history=24, n_queries=2, seed=7, n_groups=n_groups)
    assert sorted({u["group"] for u in files["sample_info.json"]["users"]}) == list(range(n_groups))
    _check_group_habits(n_groups, files)


def _check_group_habits(n_groups, files):
    families = files["sample_info.json"]["families"]
    user_habits = []        # (group, {family: the user's most frequent tag})
    for group, questions, _golds in _users(files):
        per_family = defaultdict(list)
        for item in questions[-1]["profile"]:
            per_family[families[item["id"]]].append(item["tag"])
        user_habits.append((group, {f: _majority(tags) for f, tags in per_family.items()}))
    consensus = {}
    for group in range(n_groups):
        members = [h for g, h in user_habits if g == group]
        consensus[group] = {f: _majority([h[f] for h in members]) for f in members[0]}
    agree = [h[f] == consensus[g][f] for g, h in user_habits for f in h]
    assert sum(agree) / len(agree) >= 0.9
    assert len({tuple(sorted(c.items())) for c in consensus.values()}) == n_groups


def test_citation_history_picks_the_reference():
    files = generate("citation", n_users=40, n_history=20, n_queries=4, seed=0)
    families = files["sample_info.json"]["families"]
    users = _users(files)
    # Word document-frequency over everyone's history: words every researcher uses carry no signal.
    everyone = [_words(it["title"] + " " + it["abstract"]) for _g, qs, _ in users for it in qs[-1]["profile"]]
    df_all = Counter(w for words in everyone for w in words)
    by_family = defaultdict(list)
    for _group, questions, golds in users:
        for q, gold in zip(questions, golds):
            by_family[families[q["id"]]].append(gold)
    blind_answer = {fam: _majority(golds) for fam, golds in by_family.items()}
    overall = _majority([g for golds in by_family.values() for g in golds])
    personal, blind, blind_overall, n = 0, 0, 0, 0
    for _group, questions, golds in users:
        for q, gold in zip(questions, golds):
            task = get_task("citation")
            _title, first, second = task.parse_query(q["input"])
            past = [_words(it["title"] + " " + it["abstract"]) for it in q["profile"]]
            df_user = Counter(w for words in past for w in words)

            def lift(option, other):
                return sum(df_user[w] / len(past) - df_all[w] / len(everyone) for w in _words(option) - _words(other))
            guess = "[1]" if lift(first, second) > lift(second, first) else "[2]"
            personal += guess == gold
            blind += blind_answer[families[q["id"]]] == gold
            blind_overall += overall == gold
            n += 1
    assert personal / n >= 0.85
    assert max(blind, blind_overall) / n <= 0.7
    assert personal / n - max(blind, blind_overall) / n >= 0.25


@pytest.mark.parametrize("task_name", ["news_headline", "scholarly_title", "tweet_paraphrase"])
def test_group_template_recoverable_from_history(task_name):
    files = generate(task_name, n_users=24, n_history=16, n_queries=3, seed=0)
    out_field = OUTPUT_FIELD[task_name]
    hits, n = 0, 0
    gold_styles = Counter()
    mode_by_group = defaultdict(set)
    for group, questions, golds in _users(files):
        for q, gold in zip(questions, golds):
            history_styles = [style_of(task_name, it[out_field]) for it in q["profile"]]
            assert None not in history_styles       # every output follows exactly one template
            mode = Counter(history_styles).most_common(1)[0][0]
            hits += mode == style_of(task_name, gold)
            gold_styles[style_of(task_name, gold)] += 1
            n += 1
        mode_by_group[group].add(mode)
    best_blind = gold_styles.most_common(1)[0][1] / n      # one template for everyone
    assert hits / n >= 0.9
    assert best_blind <= 0.5
    assert all(len(modes) == 1 for modes in mode_by_group.values())    # the group shares its template


@pytest.mark.parametrize("task_name", ["product_rating", "news_categorize", "citation", "news_headline",
                                       "scholarly_title", "tweet_paraphrase"])
def test_every_task_tells_six_groups_apart(task_name):
    """With the most groups, the query golds of a group's users still follow that group's habit alone: the
    groups' answers to the same kind of query differ (labels per family; templates per group)."""
    files = generate(task_name, n_users=4 * MAX_GROUPS, n_history=12, n_queries=3, seed=11, n_groups=MAX_GROUPS)
    habits = files["sample_info.json"]["group_habits"]
    if "template_per_group" in habits:
        templates = habits["template_per_group"]
        assert len(set(templates)) == MAX_GROUPS
        for group, _questions_, golds in _users(files):
            assert [style_of(task_name, g) for g in golds] == [group] * len(golds)
    elif "method_family_per_group" in habits:
        names = [n for family in habits["method_family_per_group"] for n in family]
        assert len(habits["method_family_per_group"]) == MAX_GROUPS and len(set(names)) == len(names)
    else:
        key = "score_per_group" if task_name == "product_rating" else "pick_per_group"
        vectors = {tuple(h[key][g] for h in habits.values()) for g in range(MAX_GROUPS)}
        assert len(vectors) == MAX_GROUPS
        for h in habits.values():
            assert set(h[key]) <= set(h["options"])


@pytest.mark.parametrize("n_groups", [1, MAX_GROUPS + 1])
def test_n_groups_out_of_range_is_refused(n_groups):
    with pytest.raises(Exception, match="--n_groups"):
        generate("movie_tagging", n_users=8, n_history=4, n_queries=2, n_groups=n_groups)
