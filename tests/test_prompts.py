"""Task registry, query parsing, BM25 and prompt construction (docs/method.md sections 3 and 4)."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from perpcs.errors import PerpcsError
from perpcs.data.prompts import UserHistory, history_examples, query_example, truncated_item
from perpcs.data.retrieval import PrefixBM25
from perpcs.data.tasks import TASKS, get_task, load_prompt_file

SHARED = Path(__file__).resolve().parents[2] / "shared"

RAW_INPUTS = {
    "citation": ('For an author who has written the paper with the title "Deep "nested" nets", which reference is '
                 'related? Just answer with [1] or [2] without explanation. [1]: "Graph kernels" [2]: "Conv nets"',
                 ("Deep \"nested\" nets", "Graph kernels", "Conv nets")),
    "movie_tagging": ("Which tag does this movie relate to among the following tags? Just answer with the tag name "
                      "without further explanation. tags: [sci-fi, comedy] description: A robot learns to love.",
                      ("A robot learns to love.",)),
    "news_categorize": ("Which category does this article relate to among the following categories? Just answer "
                        "with the category name without further explanation. categories: [travel, crime] article: "
                        "Police arrest a man.", ("Police arrest a man.",)),
    "product_rating": ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, "
                       "4, or 5 without further explanation. review: Great blender.", ("Great blender.",)),
    "news_headline": ("Generate a headline for the following article: Rain falls in Paris.", ("Rain falls in Paris.",)),
    "scholarly_title": ("Generate a title for the following abstract of a paper: We study LoRA.", ("We study LoRA.",)),
    "tweet_paraphrase": ("Paraphrase the following tweet without any explanation before or after it: so tired lol",
                         ("so tired lol",)),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_parses_its_raw_input(name):
    text, expected = RAW_INPUTS[name]
    assert get_task(name).parse_query(text, "q1") == expected


@pytest.mark.parametrize("name", sorted(TASKS))
def test_parse_failure_names_task_query_and_expectation(name):
    with pytest.raises(PerpcsError) as err:
        get_task(name).parse_query("something else entirely", "q42")
    assert name in str(err.value) and "q42" in str(err.value) and "expected" in str(err.value)


def test_real_lamp_2n_questions_parse(lamp2_full_rows):
    rows = lamp2_full_rows
    assert len(rows) == 5
    task = get_task("LaMP_2N")
    for row in rows:
        (article,) = task.parse_query(row["question"], row["id"])
        assert article and row["question"].endswith(article) and "categories:" not in article


# sha256 of the project's reference/prompts.json (shared/ beside the checkout): checked without it too.
REFERENCE_PROMPTS_SHA256 = "b6877db638ca77586d72e9587500f13d8cebdb8a25982a2c555eddf132d4ca93"


def test_shipped_prompts_are_the_reference_verbatim():
    import hashlib
    shipped = Path(__file__).resolve().parents[1] / "perpcs" / "resources" / "prompts.json"
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == REFERENCE_PROMPTS_SHA256
    reference = SHARED / "reference" / "prompts.json"
    if reference.is_file():      # a checkout beside shared/: compare with the file itself
        assert load_prompt_file() == json.loads(reference.read_text())


def test_unknown_task_lists_known_ones():
    with pytest.raises(PerpcsError, match="movie_tagging"):
        get_task("movie_rating")
    assert get_task("LaMP_7").name == "tweet_paraphrase"


def test_bm25_equals_rank_bm25_over_single_space_tokens_on_every_prefix():
    """docs/method.md section 4: the rank_bm25 oracle given text.split(" ") of documents and query; the texts hold what that split
    keeps apart from a whitespace split: newline-glued words (a retrieval_history line's end), double spaces."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(25)]

    def text(n_words):
        out = ""
        for i in range(n_words):
            out += rng.choice(words) + ("\n" if rng.random() < 0.2 else "")
            if i < n_words - 1:
                out += "  " if rng.random() < 0.15 else " "
        return out + "\n"

    docs = [text(rng.randint(1, 15)) for _ in range(30)]
    assert any("  " in d for d in docs) and any("\n " in d for d in docs)
    bm = PrefixBM25(docs)
    for n in (1, 2, 3, 10, 30):
        for _ in range(4):
            query = text(7).rstrip("\n") + " unseen"
            expected = BM25Okapi([d.split(" ") for d in docs[:n]]).get_scores(query.split(" "))
            np.testing.assert_allclose(bm.scores(query, n), expected, rtol=1e-12, atol=1e-12)


def test_bm25_keeps_the_newline_in_the_last_token_of_a_history_line():
    """A tag is the last word of a movie_tagging retrieval_history line, so it is indexed as "comedy\n": a
    query word "comedy" matches only the item whose description says comedy (a whitespace split would pick the
    shorter item 0, tagged comedy)."""
    task = get_task("movie_tagging")
    fillers = [{"id": str(i), "description": f"story number {i} told at length here", "tag": "drama"}
               for i in range(2, 6)]
    items = [{"id": "0", "description": "a quiet film", "tag": "comedy"},
             {"id": "1", "description": "a comedy about two old friends", "tag": "drama"}] + fillers
    history = UserHistory(task, items)
    assert history.strings[0] == "Description: a quiet film Tag: comedy\n"
    query = task.prompts["retrieval_query_wokey"].format("comedy")
    assert history.retrieve(query, 1) == [history.strings[1]]
    unknown = task.prompts["retrieval_query_wokey"].format("zzz")
    assert history.bm25.scores(query)[0] == history.bm25.scores(unknown)[0]   # "comedy\n" is another term


def test_bm25_counts_the_empty_token_of_a_double_space():
    """"apple  pie" is 3 tokens (apple, "", pie): longer than "apple tart", so the later document wins the query
    "apple" (a whitespace split would tie them, and the tie rule would pick document 0)."""
    docs = ["apple  pie", "apple tart", "fig", "plum", "kiwi", "lime"]
    bm = PrefixBM25(docs)
    assert bm.top_k("apple", 1) == [1]
    assert bm.scores("apple")[0] < bm.scores("apple")[1]
    assert bm.scores("x  y")[0] > 0 == bm.scores("x y")[0]   # the query's "" matches the document's


def test_bm25_ties_go_to_the_earlier_document():
    bm = PrefixBM25(["apple pie", "banana", "apple pie", "cherry", "plum", "fig"])
    assert bm.scores("apple")[0] == bm.scores("apple")[2] > 0
    assert bm.top_k("apple", 2) == [0, 2]
    assert bm.top_k("nothing matches", 2) == [0, 1]


def _index_bytes(bm) -> int:
    """Bytes of every numpy array (dense or inside a scipy sparse matrix) an index object holds."""
    total = 0
    for value in vars(bm).values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif hasattr(value, "indptr"):   # scipy.sparse csr/csc
            total += value.data.nbytes + value.indices.nbytes + value.indptr.nbytes
    return total


def test_bm25_index_of_a_2000_item_user_is_sparse():
    """A LaMP-sized user (2,000 items, ~14,000 distinct words): the index holds memory in proportion to its
    non-zero counts; a documents x vocabulary float64 matrix would need 2,000 x 14,000 x 8 bytes = 224 MB (and
    the old index kept two). Scores stay rank_bm25's on a prefix and on the whole history."""
    import tracemalloc

    rng = random.Random(1)
    common = [f"c{i}" for i in range(40)]
    items = [{"id": str(i), "description": " ".join([f"u{i}x{j}" for j in range(7)] + rng.choices(common, k=30)),
              "tag": rng.choice(["drama", "comedy"])} for i in range(2000)]
    task = get_task("movie_tagging")
    tracemalloc.start()
    try:
        history = UserHistory(task, items)
        examples = history_examples(task, items, "likes films")   # item i retrieves among items[:i]
        bm = history.bm25
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense = bm.n_docs * len(bm.vocab) * 8
    assert len(bm.vocab) > 14000 and dense > 200 * 2**20
    assert _index_bytes(bm) < dense / 50
    assert peak < dense / 4            # building every item's examples (two indexes in turn) included
    assert len(examples) == 2 * 2000 - 1
    tokens = [s.split(" ") for s in history.strings]
    query = task.prompts["retrieval_query"].format(**items[1500])
    for n in (700, 2000):
        expected = BM25Okapi(tokens[:n]).get_scores(query.split(" "))
        np.testing.assert_allclose(bm.scores(query, n), expected, rtol=1e-12, atol=1e-12)


def test_one_bm25_index_per_user_serves_every_test_variant(tiny_model_dir, monkeypatch):
    """The 8 test-time variants retrieve from one index per user (built once, not once per variant), in the
    order variant_examples lists them."""
    import torch
    from transformers import AutoTokenizer

    import perpcs.data.prompts as prompts_module
    import perpcs.engine.generation as generation

    built = []

    class CountingBM25(PrefixBM25):
        def __init__(self, documents, *args, **kwargs):
            built.append(tuple(documents))
            super().__init__(documents, *args, **kwargs)

    seen = []

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return ["x"] * len(prompts)

    monkeypatch.setattr(prompts_module, "PrefixBM25", CountingBM25)
    monkeypatch.setattr(generation, "generate", fake_generate)
    task = get_task("movie_tagging")
    users = [{"user_id": f"u{u}", "profile": MOVIES[u:] + MOVIES[:u],
              "query": [{"id": f"{u}-{q}", "input": RAW_INPUTS["movie_tagging"][0].replace("robot", f"robot {q}")}
                        for q in range(2)]} for u in range(3)]
    profiles = {f"u{u}": f"profile {u}" for u in range(3)}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    preds = generation.predict_variants(None, tokenizer, task, users, profiles, torch.device("cpu"), max_new_tokens=4,
                                        max_seq_len=4096)
    assert sorted(built) == sorted(tuple(UserHistory(task, u["profile"]).strings) for u in users)
    assert len(built) == len(users)
    assert len(preds) == 8 and all(len(rows) == 6 for rows in preds.values())
    expected = [p for _, k, with_profile in generation.variant_names((1, 2, 4))
                for _, p in generation.variant_prompts(task, users, k, with_profile, profiles)]
    assert seen == expected


MOVIES = [{"id": str(i), "description": d, "tag": t, "date": 2000 + i} for i, (d, t) in enumerate([
    ("a robot war in deep space", "sci-fi"), ("two friends open a bakery", "comedy"),
    ("a robot falls in love in space", "romance"), ("a detective hunts a killer", "violence")])]


def test_query_prompt_sections_in_order():
    task = get_task("movie_tagging")
    query = {"id": "9", "input": RAW_INPUTS["movie_tagging"][0].replace("A robot learns to love.",
                                                                         "robot love in space war"), "gold": "sci-fi"}
    ex = query_example(task, query, UserHistory(task, MOVIES), 2, "likes robots")
    assert ex.prompt.startswith("### User Profile:\nlikes robots\n\n### User History:\n"
                                "Description: a robot war in deep space Tag: sci-fi\n"
                                "Description: a robot falls in love in space Tag: romance\n\n\n### User Instruction:")
    assert ex.prompt.endswith("Description: robot love in space war Tag:")
    assert ex.answer == " sci-fi"
    plain = query_example(task, query, UserHistory(task, MOVIES), 0, None)
    assert plain.prompt.startswith("### User Instruction:")


def test_citation_options_are_read_after_the_title():
    """A title that itself holds '[1]: "' must not be taken for the options."""
    text = ('For an author who has written the paper with the title "On [1]: "x" and [2]: "y" marks", which reference '
            'is related? Just answer with [1] or [2] without explanation. [1]: "Graph kernels" [2]: "Conv nets"')
    assert get_task("citation").parse_query(text, "q1") == ('On [1]: "x" and [2]: "y" marks', "Graph kernels",
                                                             "Conv nets")


def test_citation_prompt_uses_title_and_both_options():
    task = get_task("citation")
    query = {"id": "1", "input": RAW_INPUTS["citation"][0], "gold": "[2]"}
    ex = query_example(task, query, UserHistory(task, []), 1, None)
    assert 'Paper Title: Deep "nested" nets\nReference: [1] - Graph kernels [2] - Conv nets\nAnswer:' in ex.prompt
    assert ex.answer == " [2]"


def test_history_examples_use_the_past_in_the_full_history():
    task = get_task("movie_tagging")
    # the last item resembles item 0 most: its BM25 past must come from the full history, not the recent slice
    items = MOVIES + [{"id": "9", "description": "robot war in deep space again", "tag": "action"}]
    examples = history_examples(task, items, "P", recent_k=1)
    assert [e.answer for e in examples] == [" action", " action"]
    assert "Description: a robot war in deep space Tag: sci-fi" in examples[1].prompt
    full = history_examples(task, items, "P")
    assert len(full) == 2 * len(items) - 1          # plain for every item, augmented for items i >= 1
    assert "### User History:" not in full[0].prompt


def test_no_augmented_examples_for_citation_and_tweets():
    task = get_task("tweet_paraphrase")
    items = [{"id": str(i), "text": f"tweet number {i}"} for i in range(3)]
    examples = history_examples(task, items, "P")
    assert [e.prompt for e in examples] == ["Tweet:"] * 3
    assert [e.answer for e in examples] == [" tweet number 0", " tweet number 1", " tweet number 2"]


def test_truncation_never_mutates_and_keeps_integer_dates():
    item = {"id": "1", "date": 2011, "text": " ".join(["w"] * 1000), "score": 4}
    copy = json.loads(json.dumps(item))
    cut = truncated_item(item, 768)
    assert len(cut["text"].split()) == 768 and cut["date"] == 2011 and cut["score"] == 4
    assert item == copy


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sample_then_prepare_then_show_prompts(name, tmp_path, capsys):
    """For every task: make_sample -> prepare_lamp -> show-prompts gives the exact prompts (issue 2)."""
    from perpcs.__main__ import main
    from pipeline_fixture import sample_layout
    task = get_task(name)
    layout = sample_layout(name, tmp_path, n_users=10, n_history=5, n_queries=2, n_test=2, seed=1)
    test_users = layout.load_split("test")
    profiles = layout.load_profiles()
    main(["show-prompts", "--task_name", name, "--data_dir", str(tmp_path / "data"), "--n", "2", "--k", "1",
          "--profile"])
    out = capsys.readouterr().out
    first = test_users[0]
    expected = query_example(task, first["query"][0], UserHistory(task, first["profile"]), 1,
                             profiles[first["user_id"]])
    assert expected.prompt in out and out.count("----- gold:") == 2
    assert f"### User Profile:\nprofile of {first['user_id']}" in out and "### User History:\n" in out
    golds = layout.load_golds()
    assert {g["id"] for g in golds["golds"]} == {str(q["id"]) for u in test_users for q in u["query"]}


# The exact prompt of one query per task, written out by hand from the reference templates (no builder used):
# BM25 top-1 of a three-item history (with two items every idf is <= 0) and a profile text, in the order
# profile, history, instruction.
LITERAL_PROMPTS = {
    "product_rating": (
        [{"text": "Bad kettle.", "score": "2"}, {"text": "Great toaster.", "score": "4"},   # not "1": the
         {"text": "Loud fan.", "score": "3"}],                         # retrieval query holds "1 to 5?"
        "### User Profile:\nharsh rater\n\n### User History:\nReview: Great toaster. Score: 4\n\n\n"
        "### User Instruction:\nWhat is the score of the following review on a scale of 1 to 5? just answer with "
        "1, 2, 3, 4, or 5 without further explanation.\nReview: Great blender. Score:"),
    "news_headline": (
        [{"text": "Sun in Rome.", "title": "Sunny Rome"}, {"text": "Rain falls in Berlin.", "title": "Wet Berlin"},
         {"text": "Snow on Oslo.", "title": "Cold Oslo"}],
        "### User Profile:\nharsh rater\n\n### User History:\nArticle: Rain falls in Berlin. Headline: Wet Berlin\n"
        "\n\n### User Instruction:\nGenerate a headline for the following article.\nArticle: Rain falls in Paris. "
        "Headline:"),
    "scholarly_title": (
        [{"abstract": "We study LoRA ranks.", "title": "Ranks"}, {"abstract": "Cats sleep.", "title": "Cats"},
         {"abstract": "Dogs run.", "title": "Dogs"}],
        "### User Profile:\nharsh rater\n\n### User History:\nabstract: We study LoRA ranks. title: Ranks\n\n\n"
        "### User Instruction:\nGenerate a title for the following abstract of a paper.\nAbstract: We study LoRA. "
        "Title:"),
    "tweet_paraphrase": (
        [{"text": "so hungry lol"}, {"text": "nice day"}, {"text": "good morning"}],
        "### User Profile:\nharsh rater\n\n### User History:\nTweet: so hungry lol\n\n\n### User Instruction:\n"
        "Paraphrase the following text into tweet without any explanation before or after it.\nText: so tired lol "
        "Tweet:"),
    "news_categorize": (
        [{"text": "Police arrest a thief.", "title": "T", "category": "crime"},
         {"text": "Shares rise.", "title": "S", "category": "business"},
         {"text": "Team wins.", "title": "W", "category": "sports"}],
        "### User Profile:\nharsh rater\n\n### User History:\narticle: Police arrest a thief. category: crime\n\n\n"
        "Which category does this article relate to among the following categories? Just answer with the category "
        "name without further explanation. categories: [travel, education, parents, style & beauty, entertainment, "
        "food & drink, science & technology, business, sports, healthy living, women, politics, crime, culture & "
        "arts, religion]\n article: Police arrest a man. category:"),
}


@pytest.mark.parametrize("name", sorted(LITERAL_PROMPTS))
def test_the_exact_prompt_of_each_task_written_by_hand(name):
    task = get_task(name)
    items, expected = LITERAL_PROMPTS[name]
    items = [{"id": str(i), **item} for i, item in enumerate(items)]
    query = {"id": "q", "input": RAW_INPUTS[name][0], "gold": "x"}
    assert query_example(task, query, UserHistory(task, items), 1, "harsh rater").prompt == expected
