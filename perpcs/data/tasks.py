"""The seven LaMP tasks: ids, history fields, query parsing, labels, metrics, prompt templates.

Prompt templates are the published Per-Pcs ones (``resources/prompts.json``), used verbatim.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from perpcs.errors import fail

MOVIE_TAGS = [
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
]
NEWS_CATEGORIES = [
    "travel", "education", "parents", "style & beauty", "entertainment", "food & drink",
    "science & technology", "business", "sports", "healthy living", "women", "politics", "crime",
    "culture & arts", "religion",
]


@lru_cache(maxsize=1)
def load_prompt_file() -> dict:
    text = resources.files("perpcs").joinpath("resources/prompts.json").read_text(encoding="utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class Task:
    name: str                      # the project's name, e.g. "movie_tagging"
    lamp_id: str                   # LaMP's name, e.g. "LaMP_2M"
    history_fields: tuple          # fields every history item must carry
    answer_field: str              # the history field the model learns to produce (OPPU_full)
    metric: str                    # "classification" | "regression" | "generation"
    max_gen_len: int               # default number of new tokens at test time
    marker: str = ""               # the article starts after this text in a raw LaMP input
    labels: tuple = field(default=())
    document_field: str = "text"   # the history field that holds what a query's input holds (its "document")
    # False: history items hold the answer to a query about their own document (its tag, category, rating,
    # headline, title, ...), so data/prepare.py leaves a query's document out of its user's history. True
    # (citation): a LaMP-1 profile is the author's papers, the one a question asks about among them, and no item
    # says which reference a paper cites, so that item is kept as LaMP gives it.
    keeps_own_document: bool = False
    answer_from_flag: bool = False          # LaMP-1's items carry no 'citation': prepare takes --citation_field
    profile_in_history_training: bool = True   # docs/method.md section 4: sharer/gate data get BM25+profile copies
    year_dates: bool = False       # the history's dates are integer years (data/sample.py, as processed LaMP)

    @property
    def prompts(self) -> dict:
        return load_prompt_file()["task_prompts"][self.name]

    @property
    def profile_prompts(self) -> dict:
        return load_prompt_file()["profile_prompts"][self.name]

    @property
    def uses_profile_in_history_training(self) -> bool:
        """docs/method.md section 4: sharer/gate data get BM25+profile copies except for citation and tweets."""
        return self.profile_in_history_training

    def parse_query(self, text: str, query_id: str = "?") -> tuple:
        """The positional arguments of the ``prompt`` template for a raw LaMP query input.

        (article,) for most tasks; (title, option1, option2) for citation.
        """
        if not isinstance(text, str):
            fail(f"task {self.name}: query {query_id}: 'input' must be a string, got {type(text).__name__}")
        if self.name == "citation":
            title = _CITATION_TITLE.search(text)
            # options after the title only: a title may itself contain '[1]: "'
            options = _CITATION_OPTIONS.search(text, title.end()) if title else None
            if not title or not options:
                fail(f"task citation: query {query_id}: expected 'written the paper with the title \"...\"' "
                     f"and options '[1]: \"...\" [2]: \"...\"' in the input, got: {text[:120]!r}")
            return (title.group(1), options.group(1), options.group(2))
        pos = text.find(self.marker)
        if pos < 0:
            fail(f"task {self.name}: query {query_id}: expected the marker {self.marker!r} in the input, "
                 f"got: {text[:120]!r}")
        return (text[pos + len(self.marker):],)


_CITATION_TITLE = re.compile(r'written the paper with the title "(.*?)"(?:,\s*which reference|\s*$)', re.S)
_CITATION_OPTIONS = re.compile(r'\[1\]:\s*"(.*)"\s*\[2\]:\s*"(.*)"', re.S)

TASKS = {
    t.name: t for t in [
        Task("citation", "LaMP_1", ("title", "citation"), "citation", "classification", 4,
             labels=("[1]", "[2]"), document_field="title", keeps_own_document=True, answer_from_flag=True,
             profile_in_history_training=False, year_dates=True),
        Task("movie_tagging", "LaMP_2M", ("description", "tag"), "tag", "classification", 10,
             marker="] description: ", labels=tuple(MOVIE_TAGS), document_field="description"),
        Task("news_categorize", "LaMP_2N", ("text", "title", "category"), "category", "classification", 10,
             marker="] article: ", labels=tuple(NEWS_CATEGORIES)),
        Task("product_rating", "LaMP_3", ("text", "score"), "score", "regression", 4,
             marker="without further explanation. review: ", labels=("1", "2", "3", "4", "5")),
        Task("news_headline", "LaMP_4", ("text", "title"), "title", "generation", 40,
             marker="Generate a headline for the following article: "),
        Task("scholarly_title", "LaMP_5", ("abstract", "title"), "title", "generation", 48,
             marker="Generate a title for the following abstract of a paper: ", document_field="abstract",
             year_dates=True),
        Task("tweet_paraphrase", "LaMP_7", ("text",), "text", "generation", 80,
             marker="Paraphrase the following tweet without any explanation before or after it: ",
             profile_in_history_training=False),
    ]
}
BY_LAMP_ID = {t.lamp_id: t for t in TASKS.values()}


AMBIGUOUS_LAMP_2 = ("movie_tagging", "news_categorize")   # LaMP's own files call both "LaMP_2"


def _lamp_key(name: str) -> str:
    """LaMP_2M, lamp_2m, LaMP-2M, lamp2m -> "lamp2m": the spellings of a LaMP id people use."""
    return name.strip().lower().replace("-", "").replace("_", "")


def is_ambiguous_lamp_2(name: str) -> bool:
    return _lamp_key(name) == "lamp2"


def get_task(name: str) -> Task:
    """Accepts the project name (movie_tagging) or the LaMP id (LaMP_2M; also lamp_2m, LaMP-2M)."""
    if name in TASKS:
        return TASKS[name]
    if name in BY_LAMP_ID:
        return BY_LAMP_ID[name]
    key = _lamp_key(name)
    for task in TASKS.values():
        if key == _lamp_key(task.lamp_id):
            return task
    if key == "lamp2":
        fail(f"task {name!r} is ambiguous: LaMP_2 is movie tagging (LaMP_2M, movie_tagging) or news "
             f"categorization (LaMP_2N, news_categorize); pass one of those")
    if key == "lamp6":
        fail(f"task {name!r} (LaMP-6, email subject generation) is not public and not supported here")
    fail(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or LaMP ids {', '.join(BY_LAMP_ID)})")


TASK_NAMES_HELP = ", ".join(TASKS) + " (or the LaMP id)"   # --task_name's help in every stage script
