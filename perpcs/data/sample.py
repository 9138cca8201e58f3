"""Synthetic sample data in raw LaMP format, in which personalization is measurable.

Users belong to a few latent groups (``n_groups``, default ``N_GROUPS`` = 4, at most ``MAX_GROUPS`` = 6) that
share habits their history reveals:
- classification tasks: each text is *ambiguous* (it belongs to a "family" whose texts fit 2-4 labels)
  and each group has its own pick per family (which tag, which news category);
- product_rating: each group maps the same sentiment to its own score (harsh, generous, ...);
- citation: each group prefers one family of methods, so of two references on the same topic the
  researcher picks the one using their group's method;
- generation tasks: each group phrases headlines / titles / tweets with its own template.
History items follow the habit with probability ``HABIT_RATE`` (people are not perfectly
consistent); query golds always follow it. Texts are built from templates and word banks
(``resources/sample_words.json``) so that they read like the real tasks while staying short (20-60 words).

Time-based-split shape (as LaMP's time split): a user has ``n_history`` dated history items; query j
(j = 0 .. n_queries-1) sees the first ``n_history - n_queries + 1 + j`` of them, so the profiles of one
user's questions are prefixes of one another; the query texts themselves never appear in a profile.
Each user's last question goes to ``dev_*``, the others to ``train_*``.

Everything is drawn from one ``random.Random(seed)``: the same arguments give byte-identical files.
"""
from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass
from datetime import date, timedelta
from importlib import resources
from pathlib import Path

from perpcs.atomic import write_json_atomic
from perpcs.data.tasks import MOVIE_TAGS, NEWS_CATEGORIES, Task, get_task
from perpcs.errors import fail

N_GROUPS = 4              # the default; the demo's sample
MAX_GROUPS = 6            # every habit table below has a pick per group up to this many
HABIT_RATE = 0.9          # share of history items that follow the group's habit; query golds always do

# Query prefixes, verbatim from LaMP (the label lists in LaMP's own order).
MOVIE_PROMPT = ("Which tag does this movie relate to among the following tags? Just answer with the tag name "
                "without further explanation. tags: [" + ", ".join(MOVIE_TAGS) + "] description: ")
NEWS_PROMPT = ("Which category does this article relate to among the following categories? Just answer with "
               "the category name without further explanation. categories: [" + ", ".join(NEWS_CATEGORIES)
               + "] article: ")
RATING_PROMPT = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
                 "or 5 without further explanation. review: ")
HEADLINE_PROMPT = "Generate a headline for the following article: "
TITLE_PROMPT = "Generate a title for the following abstract of a paper: "
TWEET_PROMPT = "Paraphrase the following tweet without any explanation before or after it: "
CITATION_PROMPT = ('For an author who has written the paper with the title "{title}", which reference is related? '
                   'Just answer with [1] or [2] without explanation. [1]: "{first}" [2]: "{second}"')

# The word banks and templates: data, not code (resources/sample_words.json, shipped inside the package).
_WORDS = json.loads(resources.files("perpcs").joinpath("resources/sample_words.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# Filling templates

def fill(rng: random.Random, template: str, bank: dict, **fixed) -> str:
    """Fill ``{slot}`` from ``fixed`` or a random choice of ``bank[slot]``; ``{slot_cap}`` capitalizes.

    A slot used twice in one template gets the same value both times.
    """
    values = dict(fixed)
    out = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        base = name[:-4] if name.endswith("_cap") else name
        if base not in values:
            if base not in bank:
                raise KeyError(f"template slot {base!r} has no word bank")
            values[base] = rng.choice(bank[base])
        text = values[base]
        out.append(text[:1].upper() + text[1:] if name.endswith("_cap") else text)
    return "".join(out)


_SMALL_WORDS = {"a", "an", "the", "of", "for", "and", "on", "in", "to", "with", "at", "by", "via", "or"}


def title_case(text: str) -> str:
    """Headline capitalization: every word capitalized except small words that are not first."""
    words = text.split(" ")
    return " ".join(w if (i and w in _SMALL_WORDS) else "-".join(p[:1].upper() + p[1:] for p in w.split("-"))
                    for i, w in enumerate(words))


def _habit(rng: random.Random, options, pick: str) -> str:
    """The group's pick, or (1 - HABIT_RATE of the time) another plausible option."""
    if rng.random() < HABIT_RATE:
        return pick
    return rng.choice([o for o in options if o != pick])


def _balanced(rng: random.Random, options: list, n: int) -> list:
    """n choices in shuffled rounds of all options, so every prefix of a history covers them evenly."""
    seq: list = []
    while len(seq) < n:
        block = list(options)
        rng.shuffle(block)
        seq.extend(block)
    return seq[:n]


# ----------------------------------------------------------------------------------------------------------
# Classification tasks: ambiguous families with one pick per group

@dataclass(frozen=True)
class Family:
    name: str
    options: tuple      # every label the texts of this family plausibly fit
    picks: tuple        # the label each group gives them (one per group)
    templates: tuple
    bank: dict


def _family(entry: dict) -> Family:
    return Family(entry["name"], tuple(entry["options"]), tuple(entry["picks"]), tuple(entry["templates"]),
                  entry["bank"])


MOVIE_FAMILIES = tuple(_family(f) for f in _WORDS["movie_families"])
NEWS_FAMILIES = tuple(_family(f) for f in _WORDS["news_families"])
_NEWS_TITLES = _WORDS["news_titles"]   # family -> article titles (news_categorize items carry one)


def _family_text(rng: random.Random, family_name: str):
    family = _FAMILY_BY_NAME[family_name]
    return family, fill(rng, rng.choice(family.templates), family.bank)


_FAMILY_BY_NAME = {f.name: f for f in MOVIE_FAMILIES + NEWS_FAMILIES}


# ----------------------------------------------------------------------------------------------------------
# Product rating: one sentiment, a group-specific score

# sentiment -> (plausible scores, score per group: harsh, generous, extreme, steady, low, centre)
RATING_HABITS = {s: (tuple(h["options"]), tuple(h["score_per_group"])) for s, h in _WORDS["rating_habits"].items()}
PRODUCTS = [(p["name"], p["aspects"]) for p in _WORDS["products"]]
REVIEW_TEMPLATES = {sentiment: tuple(t) for sentiment, t in _WORDS["review_templates"].items()}
REVIEW_BANK = _WORDS["review_bank"]


def _review(rng, sentiment: str) -> str:
    product, aspects = rng.choice(PRODUCTS)
    a1, a2 = rng.sample(aspects, 2)
    return fill(rng, rng.choice(REVIEW_TEMPLATES[sentiment]), REVIEW_BANK, product=product, a1=a1, a2=a2)


# ----------------------------------------------------------------------------------------------------------
# Citation: each group prefers one family of methods

# per group: (name in titles, phrase in abstracts) of each method of the group's family
CITATION_METHODS = tuple(tuple(tuple(m) for m in group) for group in _WORDS["citation_methods"])
CITATION_TOPICS = _WORDS["citation_topics"]
PAPER_TITLES = tuple(_WORDS["paper_titles"])
NEUTRAL_TITLES = tuple(_WORDS["neutral_titles"])
PAPER_ABSTRACT = _WORDS["paper_abstract"]
PAPER_BANK = _WORDS["paper_bank"]


def _paper_title(rng, method: str, topic: str) -> str:
    return title_case(rng.choice(PAPER_TITLES).format(method=method, topic=topic))


# ----------------------------------------------------------------------------------------------------------
# Generation tasks: one template per group

HEADLINE_STYLES = tuple(_WORDS["headline_styles"])     # one per group
HEADLINE_SUBJECTS = _WORDS["headline_subjects"]
ARTICLE_TEMPLATES = tuple(_WORDS["article_templates"])
ARTICLE_BANK = _WORDS["article_bank"]

TITLE_STYLES = tuple(_WORDS["title_styles"])           # one per group
TITLE_SUBJECTS = _WORDS["title_subjects"]
TITLE_METHODS = _WORDS["title_methods"]
ABSTRACT_TEMPLATE = _WORDS["abstract_template"]
ABSTRACT_BANK = _WORDS["abstract_bank"]

TWEET_STYLES = tuple(_WORDS["tweet_styles"])           # one per group
TWEET_NEUTRAL = tuple(_WORDS["tweet_neutral"])
TWEET_EVENTS = [(e["event"], e["tag"]) for e in _WORDS["tweet_events"]]
TWEET_FEELINGS = _WORDS["tweet_feelings"]

GENERATION_STYLES = {"news_headline": HEADLINE_STYLES, "scholarly_title": TITLE_STYLES,
                     "tweet_paraphrase": TWEET_STYLES}


def _style_pattern(template: str) -> re.Pattern:
    parts = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append("(.+?)")
    return re.compile("^" + "".join(parts) + "$", re.S)


_STYLE_PATTERNS = {task: [_style_pattern(t) for t in styles] for task, styles in GENERATION_STYLES.items()}


def style_of(task_name: str, text: str):
    """The index of the group template that produced a headline / title / tweet (None if none matches).

    For analysis and tests: it shows that a user's history reveals the template of their query golds.
    """
    matches = [i for i, pattern in enumerate(_STYLE_PATTERNS[get_task(task_name).name]) if pattern.match(text)]
    return matches[0] if len(matches) == 1 else None


def _styled(rng, user) -> int:
    """The group's template index, or (1 - HABIT_RATE of the time) another group's."""
    return int(_habit(rng, [str(i) for i in range(user.n_groups)], str(user.group)))


# ----------------------------------------------------------------------------------------------------------
# Per-task item makers: history_item -> (fields, family); query_item -> (input, gold, family)

@dataclass
class SampleUser:
    index: int
    group: int
    topics: tuple = ()        # research topics (citation, scholarly_title)
    n_groups: int = N_GROUPS  # the sample's groups: "another group's habit" is drawn among these


def _history_item(task: Task, rng: random.Random, user: SampleUser, family: str | None):
    name = task.name
    if name in ("movie_tagging", "news_categorize"):
        fam, text = _family_text(rng, family)
        label = _habit(rng, fam.options, fam.picks[user.group])
        if name == "movie_tagging":
            return {"description": text, "tag": label}, family
        return {"text": text, "title": rng.choice(_NEWS_TITLES[family]), "category": label}, family
    if name == "product_rating":
        options, picks = RATING_HABITS[family]
        return {"text": _review(rng, family), "score": _habit(rng, options, picks[user.group])}, family
    if name == "citation":
        group = int(_habit(rng, [str(g) for g in range(user.n_groups)], str(user.group)))
        method, phrase = rng.choice(CITATION_METHODS[group])
        topic = rng.choice(user.topics)
        abstract = fill(rng, PAPER_ABSTRACT, PAPER_BANK, topic=topic, phrase=phrase)
        return {"title": _paper_title(rng, method, topic), "abstract": abstract}, None
    if name == "news_headline":
        subject = rng.choice(HEADLINE_SUBJECTS)
        title = title_case(HEADLINE_STYLES[_styled(rng, user)].format(subject=subject))
        return {"text": fill(rng, rng.choice(ARTICLE_TEMPLATES), ARTICLE_BANK, subject=subject), "title": title}, None
    if name == "scholarly_title":
        abstract, title = _paper(rng, user, _styled(rng, user))
        return {"abstract": abstract, "title": title}, None
    if name == "tweet_paraphrase":
        _neutral, tweet = _tweet(rng, _styled(rng, user))
        return {"text": tweet}, None
    raise AssertionError(name)


def _query_item(task: Task, rng: random.Random, user: SampleUser, family: str | None):
    name = task.name
    if name in ("movie_tagging", "news_categorize"):
        fam, text = _family_text(rng, family)
        label = fam.picks[user.group]
        return (MOVIE_PROMPT if name == "movie_tagging" else NEWS_PROMPT) + text, label, family
    if name == "product_rating":
        return RATING_PROMPT + _review(rng, family), RATING_HABITS[family][1][user.group], family
    if name == "citation":
        return _citation_query(rng, user)
    if name == "news_headline":
        subject = rng.choice(HEADLINE_SUBJECTS)
        article = fill(rng, rng.choice(ARTICLE_TEMPLATES), ARTICLE_BANK, subject=subject)
        return HEADLINE_PROMPT + article, title_case(HEADLINE_STYLES[user.group].format(subject=subject)), None
    if name == "scholarly_title":
        abstract, title = _paper(rng, user, user.group)
        return TITLE_PROMPT + abstract, title, None
    if name == "tweet_paraphrase":
        neutral, tweet = _tweet(rng, user.group)
        return TWEET_PROMPT + neutral, tweet, None
    raise AssertionError(name)


def _citation_query(rng, user: SampleUser):
    """Two references on the user's topic; the one using the user's group's methods is the gold."""
    topic = rng.choice(user.topics)
    other = rng.choice([g for g in range(user.n_groups) if g != user.group])
    own_title = _paper_title(rng, rng.choice(CITATION_METHODS[user.group])[0], topic)
    other_title = _paper_title(rng, rng.choice(CITATION_METHODS[other])[0], topic)
    own_first = rng.random() < 0.5
    first, second = (own_title, other_title) if own_first else (other_title, own_title)
    first_group, second_group = (user.group, other) if own_first else (other, user.group)
    title = title_case(rng.choice(NEUTRAL_TITLES).format(topic=topic))
    family = f"methods {first_group} vs {second_group}"
    return CITATION_PROMPT.format(title=title, first=first, second=second), "[1]" if own_first else "[2]", family


def _paper(rng, user: SampleUser, style: int):
    subject, method = rng.choice(user.topics), rng.choice(TITLE_METHODS)
    abstract = fill(rng, ABSTRACT_TEMPLATE, ABSTRACT_BANK, subject=subject, method=method)
    return abstract, title_case(TITLE_STYLES[style].format(subject=subject, method=method))


def _tweet(rng, style: int):
    event, tag = rng.choice(TWEET_EVENTS)
    feeling = rng.choice(TWEET_FEELINGS)
    neutral = rng.choice(TWEET_NEUTRAL).format(event=event, feeling=feeling)
    return neutral, fill(rng, TWEET_STYLES[style], {}, event=event, feeling=feeling, tag=tag)


def _families(task: Task):
    """The ambiguity families a task's history is drawn from (None: the task draws without families)."""
    if task.name == "movie_tagging":
        return [f.name for f in MOVIE_FAMILIES]
    if task.name == "news_categorize":
        return [f.name for f in NEWS_FAMILIES]
    if task.name == "product_rating":
        return list(RATING_HABITS)
    return None


def group_habits(task: Task, n_groups: int = N_GROUPS) -> dict:
    """What each of the sample's groups does, for sample_info.json."""
    if task.name in ("movie_tagging", "news_categorize"):
        families = MOVIE_FAMILIES if task.name == "movie_tagging" else NEWS_FAMILIES
        return {f.name: {"options": list(f.options), "pick_per_group": list(f.picks[:n_groups])} for f in families}
    if task.name == "product_rating":
        return {s: {"options": list(o), "score_per_group": list(p[:n_groups])} for s, (o, p) in RATING_HABITS.items()}
    if task.name == "citation":
        return {"method_family_per_group": [[name for name, _ in methods] for methods in CITATION_METHODS[:n_groups]]}
    return {"template_per_group": list(GENERATION_STYLES[task.name][:n_groups])}


# ----------------------------------------------------------------------------------------------------------
# Dates and the whole sample

def _dates(rng: random.Random, n: int, years: bool) -> list:
    """n non-decreasing dates: integer years, or ISO date strings."""
    if years:
        year, out = rng.randint(1998, 2012), []
        for _ in range(n):
            out.append(year)
            year += rng.random() < 0.35
        return out
    day, out = date(2012, 1, 1) + timedelta(days=rng.randrange(2000)), []
    for _ in range(n):
        out.append(day.isoformat())
        day += timedelta(days=rng.randint(1, 45))
    return out


class _SampleBuilder:
    """Collects users' history and questions, with ids unique across the sample."""

    def __init__(self, task: Task, rng: random.Random, n_history: int, n_queries: int, n_groups: int = N_GROUPS):
        self.task, self.rng, self.n_history, self.n_queries = task, rng, n_history, n_queries
        self.n_groups = n_groups
        self.digit = task.lamp_id.split("_")[1][0]        # LaMP ids start with the task's digit
        self.families = _families(task)
        self.questions = {"train": [], "dev": []}
        self.golds = {"train": [], "dev": []}
        self.info_users, self.item_families = [], {}
        self.next_question = {"train": 0, "dev": 0}

    def _family_sequence(self, n: int) -> list:
        return _balanced(self.rng, self.families, n) if self.families else [None] * n

    def add_user(self, index: int, group: int) -> None:
        task, rng = self.task, self.rng
        topics = tuple(rng.sample(CITATION_TOPICS if task.name == "citation" else TITLE_SUBJECTS, 3))
        user = SampleUser(index, group, topics, self.n_groups)
        history = []     # (fields, family) in time order
        dates = _dates(rng, self.n_history, task.year_dates)
        for family, when in zip(self._family_sequence(self.n_history), dates):
            fields, family = _history_item(task, rng, user, family)
            history.append(({**fields, "date": when}, family))
        question_ids = []
        for j, family in enumerate(self._family_sequence(self.n_queries)):
            split = "dev" if j == self.n_queries - 1 else "train"
            qid = f"{self.digit}{0 if split == 'train' else 1}{self.next_question[split]}"
            self.next_question[split] += 1
            text, gold, family = _query_item(task, rng, user, family)
            # as in LaMP, items are numbered per question (question id + position): one item, several ids
            profile = []
            for k, (fields, item_family) in enumerate(history[:self.n_history - self.n_queries + 1 + j]):
                profile.append({"id": f"{qid}-{k}", **fields})
                if item_family:
                    self.item_families[f"{qid}-{k}"] = item_family
            self.questions[split].append({"id": qid, "input": text, "profile": profile})
            self.golds[split].append({"id": qid, "output": gold})
            question_ids.append(qid)
            if family:
                self.item_families[qid] = family
        self.info_users.append({"index": index, "group": group, "question_ids": question_ids,
                                **({"topics": list(topics)} if task.year_dates else {})})

    def files(self, info: dict) -> dict:
        files = {"sample_info.json": {**info, "group_habits": group_habits(self.task, self.n_groups), "users": self.info_users,
                                      "families": self.item_families}}
        for split in ("train", "dev"):
            order = list(range(len(self.questions[split])))
            self.rng.shuffle(order)     # LaMP files do not list one user's questions together
            if order:
                files[f"{split}_questions.json"] = [self.questions[split][i] for i in order]
                files[f"{split}_outputs.json"] = {"task": self.task.lamp_id,
                                                  "golds": [self.golds[split][i] for i in order]}
        return files


def generate(task_name: str, n_users: int = 60, n_history: int = 30, n_queries: int = 4, seed: int = 0,
             n_groups: int = N_GROUPS) -> dict:
    """The sample's files as objects: {file name: JSON object} (train/dev questions and outputs, sample_info)."""
    task = get_task(task_name)
    if n_users < 1 or n_queries < 1:
        fail(f"--n_users ({n_users}) and --n_queries ({n_queries}) must be at least 1")
    if n_history < n_queries:
        fail(f"--n_history ({n_history}) must be at least --n_queries ({n_queries}): query j sees the first "
             f"n_history - n_queries + 1 + j history items, so the first query needs at least one")
    if not 2 <= n_groups <= MAX_GROUPS:
        fail(f"--n_groups ({n_groups}) must be between 2 and {MAX_GROUPS}: the habit tables of perpcs/data/sample.py "
             f"have a pick for {MAX_GROUPS} groups, and a habit needs another group to deviate to")
    rng = random.Random(seed)
    groups = [i % n_groups for i in range(n_users)]    # balanced groups, in random order
    rng.shuffle(groups)
    builder = _SampleBuilder(task, rng, n_history, n_queries, n_groups)
    for index, group in enumerate(groups):
        builder.add_user(index, group)
    return builder.files({"task": task.name, "lamp_id": task.lamp_id, "seed": seed, "n_users": n_users,
                          "n_history": n_history, "n_queries": n_queries, "n_groups": n_groups,
                          "habit_rate": HABIT_RATE})


GROUPS_FORMAT = "perpcs-sample-groups/1"


def sample_groups(info: dict) -> dict:
    """The latent group of every user, keyed by the user id prepare_lamp gives it ("u" + the id of the user's
    question with the shortest profile, i.e. its first question): the truth routing is checked against.

    A side file for diagnostics only; no stage reads it."""
    return {"format": GROUPS_FORMAT, "task": info["task"], "seed": info["seed"], "n_groups": info["n_groups"],
            "keyed_by": "prepare_lamp user id: 'u' + the id of the user's first question",
            "users": {f"u{u['question_ids'][0]}": u["group"] for u in info["users"]}}


def write_sample(task_name: str, out_dir, n_users: int = 60, n_history: int = 30, n_queries: int = 4,
                 seed: int = 0, n_groups: int = N_GROUPS) -> dict:
    """Generate the sample and write its files under ``out_dir``; returns the generated objects."""
    files = generate(task_name, n_users, n_history, n_queries, seed, n_groups)
    for name, obj in files.items():
        write_json_atomic(Path(out_dir) / name, obj)
    return files
