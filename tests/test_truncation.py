"""Prompts and training examples too long for --max_seq_len: what they lose first, and that every stage says how
many it shortened (issue 12 item 8).

The order a too-long prompt loses parts in (retrieved history, lowest BM25 rank first; then the article's last
words; then the profile; never the instruction around the article or the answer) is checked against prompts
written out by hand from the movie_tagging template.
"""
import json

import pytest

import OPPU
import task_LoRA
from perpcs.data.prompts import UserHistory, history_examples, query_example
from perpcs.data.tasks import get_task
from perpcs.engine.training import IGNORE_INDEX, tokenize_example
from pipeline_fixture import DEVICE, load_script, one_thread, sample_layout  # noqa: F401  (one_thread: fixture)
from pipeline_fixture import run_stage as run

MOVIE = get_task("movie_tagging")
HEAD = ("### User Instruction:\nWhich tag does this movie relate to among the following tags? Just answer with the "
        "tag name without further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, "
        "dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, social commentary, "
        "violence, true story]\nDescription: ")
TAIL = " Tag:"
PROFILE = "likes robots and space and long quiet films about lonely machines"
ARTICLE = ("robot war in deep space where a lonely machine learns to love the people it was built to fight and "
           "the crew of a broken ship " * 3).strip()
HISTORY = [{"id": str(i), "description": d, "tag": t} for i, (d, t) in enumerate([
    ("a robot war in deep space", "sci-fi"), ("two friends open a bakery in Paris", "comedy"),
    ("a lonely machine falls in love in space", "romance"), ("the crew of a broken ship fights a robot", "action"),
    ("a detective hunts a killer", "violence")])]
QUERY = {"id": "q1", "input": "Which tag does this movie relate to among the following tags? Just answer with the tag "
         "name without further explanation. tags: [sci-fi, comedy] description: " + ARTICLE, "gold": "sci-fi"}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def n_tokens(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


def by_hand(profile, retrieved: list, article: str) -> str:
    """A movie_tagging prompt written out from docs/method.md section 4 (no builder)."""
    text = f"### User Profile:\n{profile}\n\n" if profile is not None else ""
    if retrieved:
        text += "### User History:\n" + "".join(retrieved) + "\n\n"
    return text + HEAD + article + TAIL


def generated_prompts(tok, monkeypatch, max_seq_len: int, k: int = 4, max_new_tokens: int = 4) -> tuple:
    """(the prompts generation receives for the query's variants with profile, the counts it reports)."""
    import perpcs.engine.generation as generation
    seen = []

    def spy(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return [""] * len(prompts)

    monkeypatch.setattr(generation, "generate", spy)
    user = {"user_id": "u1", "profile": HISTORY, "query": [QUERY]}
    counts = {}
    preds = generation.predict_variants(None, tok, MOVIE, [user], {"u1": PROFILE}, "cpu", k_list=(k,),
                                        max_new_tokens=max_new_tokens, shortened=counts, max_seq_len=max_seq_len)
    stems = [stem for stem in preds]
    return dict(zip(stems, seen)), counts


def retrieved_strings(k: int) -> list:
    """The k history lines BM25 ranks highest for the query, best first (as the prompt lists them)."""
    history = UserHistory(MOVIE, HISTORY)
    return history.retrieve(MOVIE.prompts["retrieval_query_wokey"].format(ARTICLE), k)


# ------------------------------------------------------------------------------------------- what goes first

def test_a_too_long_profile_prompt_loses_the_lowest_ranked_history_item_first(tok, monkeypatch):
    top = retrieved_strings(4)
    assert len(top) == 4
    full, three = by_hand(PROFILE, top, ARTICLE), by_hand(PROFILE, top[:3], ARTICLE)
    budget = n_tokens(tok, three)                     # the 4-item prompt does not fit, the 3-item one does
    assert n_tokens(tok, full) > budget
    prompts, counts = generated_prompts(tok, monkeypatch, max_seq_len=budget + 4)
    assert prompts["k4-profile"] == three
    assert prompts["kNP-profile"] == by_hand(PROFILE, [], ARTICLE)          # fits: unchanged
    too_long = [p for p in (by_hand(None, [], ARTICLE), by_hand(None, top, ARTICLE), by_hand(PROFILE, [], ARTICLE),
                            full) if n_tokens(tok, p) > budget]
    assert counts["shortened"] == len(too_long) and counts["history"] == len(too_long) and counts["article"] == 0


def test_then_the_article_loses_its_last_words_and_profile_and_instruction_stay(tok, monkeypatch):
    words = ARTICLE.split()
    budget = n_tokens(tok, by_hand(PROFILE, [], ARTICLE)) - 12   # no history and the whole article: too long
    assert n_tokens(tok, by_hand(None, [], ARTICLE)) <= budget       # without the profile it fits
    prompts, counts = generated_prompts(tok, monkeypatch, max_seq_len=budget + 4)
    assert prompts["kNP"] == prompts["k4"] == by_hand(None, [], ARTICLE)   # k4: its history went, nothing else
    for stem in ("k4-profile", "kNP-profile"):
        prompt = prompts[stem]
        assert n_tokens(tok, prompt) <= budget
        prefix = f"### User Profile:\n{PROFILE}\n\n" + HEAD
        assert prompt.startswith(prefix) and prompt.endswith(TAIL)          # profile and instruction whole
        kept = prompt[len(prefix):-len(TAIL)].split(" ")
        assert 0 < len(kept) < len(words) and kept == words[:len(kept)]     # the article's first words
        assert n_tokens(tok, by_hand(PROFILE, [], " ".join(words[:len(kept) + 1]))) > budget   # as many as fit
    assert counts["shortened"] == 3 and counts["history"] == 2 and counts["article"] == 2
    assert counts["profile"] == 0 and counts["left"] == 0


def test_the_profile_goes_only_after_the_whole_article(tok, monkeypatch):
    budget = n_tokens(tok, by_hand("likes robots", [], ""))   # the profile's first two words, no article
    prompts, counts = generated_prompts(tok, monkeypatch, max_seq_len=budget + 4)
    assert prompts["k4-profile"] == prompts["kNP-profile"] == by_hand("likes robots", [], "")
    assert (counts["shortened"], counts["history"], counts["article"], counts["profile"], counts["left"]) == \
        (4, 2, 4, 2, 0)
    for stem in ("kNP", "k4"):                         # no profile to lose: only the article gets shorter
        assert prompts[stem].startswith(HEAD) and prompts[stem].endswith(TAIL) and prompts[stem] != HEAD + TAIL
        assert n_tokens(tok, prompts[stem]) <= budget and ARTICLE.startswith(prompts[stem][len(HEAD):-len(TAIL)])


def test_training_keeps_profile_instruction_and_answer_and_loses_history_then_article(tok):
    examples = history_examples(MOVIE, HISTORY, PROFILE)
    ex = examples[-1]                                  # the last item with its BM25 top-1 past and the profile
    assert ex.prompt.startswith(f"### User Profile:\n{PROFILE}\n\n### User History:\n")
    eos = 1
    no_history = by_hand(PROFILE, [], "a detective hunts a killer")
    limit = n_tokens(tok, no_history + ex.answer) + eos
    t = tokenize_example(tok, ex, limit)
    text = tok.decode(t.input_ids, skip_special_tokens=True)
    assert text == no_history + " violence" and len(t.input_ids) <= limit
    assert t.input_ids[0] == tok.bos_token_id and t.input_ids[-1] == tok.eos_token_id
    assert tok.decode([x for x in t.labels if x != IGNORE_INDEX], skip_special_tokens=True) == " violence"
    assert t.cut == ("history",)

    t = tokenize_example(tok, ex, limit - 3)            # the history is gone already: the article shortens
    text = tok.decode(t.input_ids, skip_special_tokens=True)
    assert len(t.input_ids) <= limit - 3 and t.cut == ("history", "article")
    assert text.startswith(f"### User Profile:\n{PROFILE}\n\n" + HEAD) and text.endswith(TAIL + " violence")
    assert "a detective" in text and "killer" not in text


def test_prompts_and_examples_that_fit_are_unchanged_and_counted_as_such(tok, monkeypatch):
    prompts, counts = generated_prompts(tok, monkeypatch, max_seq_len=100_000)
    for k in (0, 4):
        for profile in (None, PROFILE):
            stem = ("kNP" if k == 0 else f"k{k}") + ("-profile" if profile else "")
            assert prompts[stem] == by_hand(profile, retrieved_strings(k), ARTICLE)
    assert counts["total"] == 4 and counts["shortened"] == 0 and counts["max_seq_len"] == 100_000
    ex = query_example(MOVIE, QUERY, UserHistory(MOVIE, HISTORY), 4, PROFILE)
    t = tokenize_example(tok, ex, 100_000)
    assert t.input_ids == tok(by_hand(PROFILE, retrieved_strings(4), ARTICLE) + " sci-fi")["input_ids"] + \
        [tok.eos_token_id]
    assert t.cut == ()


# ------------------------------------------------------------------------------------------- stages say so

MAX_SEQ_LEN = 500   # on the sample data some of the tiny tokenizer's examples/prompts are longer, most are not
GEN_LEN = 4


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_model_dir):
    """Sample data, and stage 1 run at MAX_SEQ_LEN: (root, layout, its printed output)."""
    import io
    from contextlib import redirect_stdout

    from pipeline_fixture import single_thread
    root = tmp_path_factory.mktemp("trunc")
    layout = sample_layout("movie_tagging", root, 16, 8, 2, 3)
    argv = ["--task_name", "movie_tagging", "--llama_model_path", str(tiny_model_dir), "--device", DEVICE,
            "--data_dir", str(root / "data"), "--output_dir", str(root / "task"), "--max_step", "1",
            "--max_seq_len", str(MAX_SEQ_LEN), "--k_list", "1", "--temperature", "0", "--max_gen_len", str(GEN_LEN)]
    buf = io.StringIO()
    with redirect_stdout(buf), single_thread():
        task_LoRA.main(argv)
    return root, layout, buf.getvalue()


def too_long_examples(tok, examples) -> int:
    return sum(1 for ex in examples if n_tokens(tok, ex.prompt + ex.answer) + 1 > MAX_SEQ_LEN)


def too_long_prompts(tok, users, profiles, profiles_path) -> int:
    from perpcs.engine.generation import variant_names, variant_prompts
    return sum(1 for _, k, with_profile in variant_names([1])
               for _, p in variant_prompts(MOVIE, users, k, with_profile, profiles, profiles_path)
               if n_tokens(tok, p) > MAX_SEQ_LEN - GEN_LEN)


def test_stage1_counts_shortened_examples_and_prompts_in_its_log_and_summary(stage1, tok):
    from perpcs.stages.task_lora import task_lora_examples
    root, layout, out = stage1
    profiles = layout.load_profiles()
    n_examples = too_long_examples(tok, task_lora_examples(MOVIE, layout.load_split("base"), profiles,
                                                           layout.profiles))
    n_prompts = too_long_prompts(tok, layout.load_split("test"), profiles, layout.profiles)
    assert 0 < n_examples < 14 and 0 < n_prompts < 24          # the setting shortens some, not all
    assert f"task LoRA training: {n_examples} of 14 examples shortened to fit --max_seq_len {MAX_SEQ_LEN}" in out
    assert f"task LoRA predictions: {n_prompts} of 24 prompts shortened to fit --max_seq_len {MAX_SEQ_LEN}" in out
    summary = json.loads((root / "task" / "summary.json").read_text())["truncated"]
    assert summary["examples"] == {"max_seq_len": MAX_SEQ_LEN, "total": 14, "shortened": n_examples,
                                   "history": n_examples, "article": 0, "profile": 0, "left": 0}
    assert summary["prompts"]["total"] == 24 and summary["prompts"]["shortened"] == n_prompts
    assert summary["prompts"]["profile"] == 0 and summary["prompts"]["left"] == 0


def test_stage1_infer_keeps_the_training_counts_and_updates_the_prompt_counts(stage1, tiny_model_dir, tmp_path,
                                                                                capsys):
    import shutil
    root, _, _ = stage1
    shutil.copytree(root / "task", tmp_path / "task")
    argv = ["--task_name", "movie_tagging", "--llama_model_path", str(tiny_model_dir), "--device", DEVICE,
            "--data_dir", str(root / "data"), "--output_dir", str(tmp_path / "task"), "--infer",
            "--max_seq_len", "100000", "--k_list", "1", "--temperature", "0", "--max_gen_len", str(GEN_LEN)]
    out = run(task_LoRA.main, argv, capsys)
    assert "task LoRA predictions: 0 of 24 prompts shortened to fit --max_seq_len 100000" in out
    before = json.loads((root / "task" / "summary.json").read_text())["truncated"]
    after = json.loads((tmp_path / "task" / "summary.json").read_text())["truncated"]
    assert after["examples"] == before["examples"] and after["prompts"]["shortened"] == 0


def test_oppu_counts_per_user_in_its_log_rows_lines_and_summary(stage1, tiny_model_dir, tok, tmp_path, capsys):
    root, layout, _ = stage1
    profiles = layout.load_profiles()
    users = layout.load_split("test")
    argv = ["--task_name", "movie_tagging", "--llama_model_path", str(tiny_model_dir), "--device", DEVICE,
            "--data_dir", str(root / "data"), "--lora_ckpt", str(root / "task"), "--output_dir", str(tmp_path),
            "--max_step", "1", "--max_seq_len", str(MAX_SEQ_LEN), "--k_list", "1", "--temperature", "0",
            "--max_gen_len", str(GEN_LEN)]
    out = run(OPPU.main, argv, capsys)
    rows = {json.loads(line)["user_id"]: json.loads(line) for line in
            (tmp_path / "users_log.jsonl").read_text().splitlines()}
    total_examples = total_prompts = 0
    for user in users:
        uid = user["user_id"]
        own = history_examples(MOVIE, user["profile"], profiles[uid])
        n_examples = too_long_examples(tok, own)
        n_prompts = too_long_prompts(tok, [user], profiles, layout.profiles)
        entry = rows[uid]["truncated"]
        assert entry["examples"]["shortened"] == n_examples and entry["examples"]["total"] == len(own)
        assert entry["prompts"]["shortened"] == n_prompts and entry["prompts"]["total"] == 4 * len(user["query"])
        line = f"user {uid}: {n_examples} of {len(own)} examples shortened to fit --max_seq_len {MAX_SEQ_LEN}"
        assert (line in out) == (n_examples > 0)
        total_examples += n_examples
        total_prompts += n_prompts
    assert total_examples > 0
    n_all = sum(len(history_examples(MOVIE, u["profile"], profiles[u["user_id"]])) for u in users)
    assert f"OPPU: {total_examples} of {n_all} examples shortened to fit --max_seq_len {MAX_SEQ_LEN}" in out
    assert f"OPPU: {total_prompts} of {sum(4 * len(u['query']) for u in users)} prompts shortened" in out
    summary = json.loads((tmp_path / "summary.json").read_text())["truncated"]
    assert summary["examples"]["shortened"] == total_examples and summary["examples"]["total"] == n_all
    assert summary["prompts"]["shortened"] == total_prompts and summary["examples"]["users"] == len(users)


def test_gen_profile_counts_the_prompts_that_left_out_history_items(stage1, tiny_model_dir, tok, tmp_path, capsys):
    from perpcs.data.layout import all_splits_users
    from perpcs.stages.profiles import profile_prompt
    gen_profile = load_script("data/gen_profile.py")
    root, layout, _ = stage1
    out_file = tmp_path / "profiles.json"
    budget_len = 540   # the sample users' prompts of their last 3 items: some longer, some shorter
    out = run(gen_profile.main, ["--task_name", "movie_tagging", "--data_dir", str(root / "data"), "--model_path",
                                 str(tiny_model_dir), "--device", DEVICE, "--k", "3", "--max_gen_len", "2",
                                 "--max_seq_len", str(budget_len), "--batch_size", "4", "--output_file",
                                 str(out_file)], capsys)
    users = {u["user_id"]: u for u in all_splits_users(layout)}
    long_ones = [uid for uid, u in users.items()
                 if n_tokens(tok, profile_prompt(MOVIE, u["profile"], 3)) > budget_len - 2]
    assert 0 < len(long_ones) < len(users)
    assert f"profile prompts: {len(long_ones)} of {len(users)} prompts shortened to fit --max_seq_len 540" in out
    summary = json.loads((tmp_path / "profiles.summary.json").read_text())
    assert summary["truncated"]["prompts"]["shortened"] == len(long_ones)
    assert sorted(uid for uid, cut in summary["prompt_cuts"].items() if cut) == sorted(long_ones)
