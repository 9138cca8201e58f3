"""Turning users into prompts (docs/method.md section 4): truncation, BM25 history, profile text, training examples.

An :class:`Example` is a prompt and the answer text the model should continue it with; the training and
composition code masks the loss/scores to the answer tokens. Examples built here also carry the prompt's
parts (:class:`PromptParts`), so that one too long for ``--max_seq_len`` can lose the least needed parts first
(perpcs/truncation.py).
"""
from __future__ import annotations

import string
from dataclasses import dataclass

from perpcs.data.retrieval import PrefixBM25
from perpcs.data.tasks import Task
from perpcs.errors import fail

QUERY_WORDS = 768      # query article and training items
HISTORY_WORDS = 368    # history items written into prompts / indexed by BM25


@dataclass(frozen=True)
class PromptParts:
    """What a prompt is made of (docs/method.md section 4): [profile section] + [history section] + instruction, the instruction
    being ``head + article + tail`` (the article: the query's article/title, or the history item's text)."""
    profile: str | None
    retrieved: tuple      # history strings in BM25 rank order, best first
    head: str
    article: str
    tail: str

    def render(self) -> str:
        return context_prefix(self.profile, list(self.retrieved)) + self.head + self.article + self.tail


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    source: str = ""   # e.g. "item 3" or "query 110": names the example in warnings
    parts: PromptParts | None = None   # None: a prompt of unknown make (only cut from the left when too long)

    @staticmethod
    def of(parts: PromptParts, answer: str, source: str = "") -> "Example":
        return Example(parts.render(), answer, source, parts)


def truncate_words(text, n_words: int) -> str:
    return " ".join(str(text).split()[:n_words])


def truncated_item(item: dict, n_words: int) -> dict:
    """A copy of a history item with its string fields cut to n_words (ids, dates and numbers untouched)."""
    return {k: truncate_words(v, n_words) if isinstance(v, str) and k not in ("id", "date") else v
            for k, v in item.items()}


def history_string(task: Task, item: dict) -> str:
    return task.prompts["retrieval_history"].format(**truncated_item(item, HISTORY_WORDS))


def context_prefix(profile: str | None, retrieved: list) -> str:
    """Profile section, then history section (docs/method.md section 4); retrieved strings are joined with no separator."""
    text = ""
    if profile is not None:
        text += f"### User Profile:\n{profile}\n\n"
    if retrieved:
        text += "### User History:\n" + "".join(retrieved) + "\n\n"
    return text


class UserHistory:
    """One user's history with a BM25 index over its ``retrieval_history`` strings, as written (trailing newline
    included: docs/method.md section 4 tokenizes documents and queries with ``split(" ")``, see retrieval.py)."""

    def __init__(self, task: Task, items: list):
        self.task = task
        self.items = items
        self.strings = [history_string(task, it) for it in items]
        self._bm25 = None

    @property
    def bm25(self) -> PrefixBM25:
        if self._bm25 is None:
            self._bm25 = PrefixBM25(self.strings)
        return self._bm25

    def retrieve(self, query: str, k: int, before: int | None = None) -> list:
        """The k best history strings for a query among the first ``before`` items (all by default)."""
        n = len(self.items) if before is None else before
        if k <= 0 or n == 0:
            return []
        return [self.strings[i] for i in self.bm25.top_k(query, k, n)]


def query_args(task: Task, raw_input: str, query_id: str) -> tuple:
    return tuple(truncate_words(a, QUERY_WORDS) for a in task.parse_query(raw_input, query_id))


_MARK = "\x00article\x00"   # stands for the article while a template is filled, to find what surrounds it


def _around_article(marked: str) -> tuple:
    """(head, tail) of a filled template holding _MARK once where the article goes."""
    head, tail = marked.split(_MARK)
    return head, tail


def article_field(task: Task) -> str | None:
    """The history field ``OPPU_input`` shows (the item's article); None when it shows none (tweets)."""
    names = [name for _, name, _, _ in string.Formatter().parse(task.prompts["OPPU_input"]) if name]
    return names[0] if names else None


def query_example(task: Task, query: dict, history: UserHistory, k: int, profile: str | None) -> Example:
    """A test (or task-LoRA training) query: [profile] + [BM25 top-k history] + ``prompt``; answer = gold."""
    qid = str(query.get("id", "?"))
    args = query_args(task, query["input"], qid)
    retrieved = history.retrieve(task.prompts["retrieval_query_wokey"].format(args[0]), k)
    prompt = task.prompts["prompt"].format(*args)
    gold = str(query.get("gold", ""))
    answer = task.prompts["full_prompt"].format(*args, gold)[len(prompt):]
    head, tail = _around_article(task.prompts["prompt"].format(_MARK, *args[1:]))
    return Example.of(PromptParts(profile, tuple(retrieved), head, args[0], tail), answer, f"query {qid}")


def history_examples(task: Task, items: list, profile: str | None, recent_k: int | None = None,
                     augment: bool = True) -> list:
    """Training examples from a user's own history (sharer LoRA, gates, composition, OPPU).

    Each item i in ``OPPU_full`` form; and, for tasks other than citation and tweet_paraphrase, items i >= 1
    once more with the profile text and the BM25 top-1 among ``items[:i]`` - the item's past in the *full*
    history even when only the last ``recent_k`` items are used (the original counted i inside the slice).
    """
    history = UserHistory(task, items)
    start = 0 if recent_k is None else max(0, len(items) - recent_k)
    prompts = task.prompts
    field = article_field(task)
    examples = []
    for i in range(start, len(items)):
        item = truncated_item(items[i], QUERY_WORDS)
        prompt = prompts["OPPU_input"].format(**item)
        answer = prompts["OPPU_full"].format(**item)[len(prompt):]
        if field is None:
            head, article, tail = prompt, "", ""
        else:
            article = str(item[field])
            head, tail = _around_article(prompts["OPPU_input"].format(**{**item, field: _MARK}))
        name = f"item {i} (id {items[i].get('id', '?')})"
        examples.append(Example.of(PromptParts(None, (), head, article, tail), answer, name))
        if augment and task.uses_profile_in_history_training and i >= 1:
            retrieved = history.retrieve(prompts["retrieval_query"].format(**item), 1, before=i)
            examples.append(Example.of(PromptParts(profile, tuple(retrieved), head, article, tail), answer,
                                       f"{name} with history"))
    return examples


def frame_words(template: str) -> int:
    """Words of a prompt template with every field left empty: what any prompt made from it holds."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    positional = sum(1 for name in fields if name == "")
    return len(template.format(*[""] * positional, **{name: "" for name in fields if name}).split())


def min_seq_len(template: str, new_tokens: int) -> int:
    """The fewest tokens a ``--max_seq_len`` can be for prompts made from ``template``: BOS, the template's own
    words and ``new_tokens``. Each word is at least one token for Llama's sentencepiece and byte-level BPE
    tokenizers (both split at whitespace before merging), so this is a lower bound known without the tokenizer;
    below it the instruction itself is cut (from the left, after BOS), whatever the article, history or profile."""
    return 1 + frame_words(template) + new_tokens


# the --help of every --max_seq_len that bounds a task prompt (the configs' fields carry it)
MAX_SEQ_LEN_HELP = ("tokens of a prompt and its new tokens (of an example and its answer in training); at least 1 "
                    "(BOS) + the words of the task's instruction + --max_gen_len (or the task's answer length), e.g. "
                    "59 for movie_tagging, 99 for tweet_paraphrase")


def check_max_seq_len(task: Task, max_seq_len: int, max_gen_len: int | None = None, template: str | None = None,
                      what: str = "the task's instruction") -> None:
    """Refuse a ``--max_seq_len`` with no room for the instruction of ``task`` (its query ``prompt`` unless
    ``template`` is given) and ``--max_gen_len`` new tokens (the task's own length when None)."""
    new_tokens = max_gen_len or task.max_gen_len
    template = task.prompts["prompt"] if template is None else template
    least = min_seq_len(template, new_tokens)
    if max_seq_len < least:
        gen = f"--max_gen_len {max_gen_len}" if max_gen_len else f"{task.name}'s answer length {new_tokens}"
        fail(f"--max_seq_len {max_seq_len} is too small for {task.name}: at least {least} = 1 (BOS) + "
             f"{least - 1 - new_tokens} (the words of {what}, at least a token each) + {new_tokens} ({gen})")
