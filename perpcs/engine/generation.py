"""Batched generation and the test-time prediction files (no retrieval / BM25 k, without / with profile).

Prompts are sorted by length and left-padded, so a batch wastes little compute on padding and every row's
new tokens start at the same column; only the new tokens are decoded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from perpcs.atomic import write_json_atomic
from perpcs.data.layout import profile_text
from perpcs.data.prompts import UserHistory, query_example
from perpcs.data.tasks import Task
from perpcs.data.truncation import count_cuts, fit_example
from perpcs.models.devices import autocast_context

KV_CACHES = ("dynamic", "static")
STATIC_WIDTH_STEP = 64   # static cache: prompt widths rounded up to this, so few shapes get compiled
DEFAULT_MAX_SEQ_LEN = 3000


def prompt_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """Tokens a prompt may have so that it and its new tokens fit max_seq_len."""
    return max(1, max_seq_len - max_new_tokens)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, device: torch.device,
             temperature: float = 0.1, top_p: float = 0.9, seed: int = 0, batch_size: int = 16,
             max_seq_len: int = DEFAULT_MAX_SEQ_LEN, cpu_bf16: bool = False, show_progress: bool = False,
             kv_cache: str = "dynamic", add_special_tokens: bool = True) -> list:
    """Completions (new tokens only, stripped) for each prompt; greedy when temperature is 0.

    ``kv_cache="static"``: a preallocated KV cache, which transformers pairs with a torch.compile'd decoding
    step (CUDA graphs) on a GPU; the prompts' width is padded to a multiple of STATIC_WIDTH_STEP so that
    batches share a few shapes instead of compiling one graph per width. Same tokens as "dynamic".
    Sampling is temperature + top-p only, as published (transformers would add top-k 50 by default).
    ``add_special_tokens=False`` for prompts that already carry them (chat templates).
    """
    if not prompts:
        return []
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if not temperature >= 0:   # nan too
        raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    torch.manual_seed(seed)
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    max_prompt = prompt_budget(max_seq_len, max_new_tokens)   # callers with prompt parts fit them first (fit_prompts)
    encoded = [keep_bos_cut_left(ids, max_prompt, tokenizer.bos_token_id) for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = temperature > 0
    outputs = [None] * len(prompts)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not show_progress,
                      leave=False):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        if kv_cache == "static":
            width = -(-width // STATIC_WIDTH_STEP) * STATIC_WIDTH_STEP
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(encoded[i])
            ids[r, width - n:] = torch.tensor(encoded[i])
            mask[r, width - n:] = 1
        kwargs = dict(do_sample=sampling, temperature=temperature, top_p=top_p, top_k=0) if sampling else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if kv_cache == "static":
            kwargs["cache_implementation"] = "static"
        with autocast_context(device, cpu_bf16):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id, **kwargs)
        for r, i in enumerate(rows):
            outputs[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return outputs


def keep_bos_cut_left(ids: list, limit: int, bos_id) -> list:
    """At most ``limit`` ids, cut from the left after the BOS (as training cuts, last resort after fit_prompts):
    the end of the instruction stays, and the model still sees the BOS it was trained with."""
    if len(ids) <= limit:
        return ids
    keep = 1 if bos_id is not None and ids and ids[0] == bos_id and limit > 1 else 0
    return ids[:keep] + ids[len(ids) - limit + keep:]


def variant_names(k_list) -> list:
    """(file stem, k, with_profile) for the 8 test-time variants: kNP, k1, k2, k4, each +/- profile."""
    ks = [("kNP", 0)] + [(f"k{k}", k) for k in k_list]
    return [(stem + ("-profile" if prof else ""), k, prof) for prof in (False, True) for stem, k in ks]


def variant_examples(task: Task, users: list, k: int, with_profile: bool, profiles: dict | None,
                     profiles_path=None) -> list:
    """(query id, Example) for every query of every user under one variant."""
    rows = []
    for ui, user in enumerate(users):
        rows.extend(user_variant_examples(task, user, ui, UserHistory(task, user["profile"]), k, with_profile, profiles,
                                          profiles_path))
    return rows


def user_variant_examples(task: Task, user: dict, index: int, history: UserHistory, k: int, with_profile: bool,
                          profiles: dict | None, profiles_path=None) -> list:
    """(query id, Example) for every query of one user (#index) under one variant, retrieving from ``history``."""
    prof = profile_text(profiles, user, profiles_path, index) if with_profile else None
    return [(str(q["id"]), query_example(task, q, history, k, prof)) for q in user["query"]]


def all_variant_examples(task: Task, users: list, variants: list, profiles: dict | None, profiles_path=None) -> list:
    """(variant stem, query id, Example) for every variant, then every user, then every query (variant_examples'
    order); one BM25 index per user serves all the variants, and only one user's index is alive at a time."""
    rows = {stem: [] for stem, _, _ in variants}
    for ui, user in enumerate(users):
        history = UserHistory(task, user["profile"])
        for stem, k, with_profile in variants:
            rows[stem].extend(user_variant_examples(task, user, ui, history, k, with_profile, profiles, profiles_path))
    return [(stem, qid, ex) for stem, _, _ in variants for qid, ex in rows[stem]]


def variant_prompts(task: Task, users: list, k: int, with_profile: bool, profiles: dict | None,
                    profiles_path=None) -> list:
    """(query id, prompt) for every query of every user under one variant (before any fitting to a length)."""
    return [(qid, ex.prompt) for qid, ex in variant_examples(task, users, k, with_profile, profiles, profiles_path)]


def fit_prompts(tokenizer, examples: list, max_seq_len: int, max_new_tokens: int,
                add_special_tokens: bool = True) -> tuple:
    """([prompt], [cut]): each example's prompt fitted to max_seq_len - max_new_tokens tokens by the rule training
    uses (truncation.fit_example); a cut holding "left" is left to generate()'s cut from the left."""
    budget = prompt_budget(max_seq_len, max_new_tokens)

    def fits(ex) -> bool:
        return len(tokenizer(ex.prompt, add_special_tokens=add_special_tokens)["input_ids"]) <= budget

    fitted = [fit_example(ex, fits) for ex in examples]
    return [ex.prompt for ex, _ in fitted], [cut for _, cut in fitted]


def write_predictions(path: Path, task: Task, rows: list) -> None:
    """A LaMP-format predictions file from (query id, output) rows."""
    write_json_atomic(path, {"task": task.lamp_id, "golds": [{"id": i, "output": o} for i, o in rows]})


def predict_variants(model, tokenizer, task: Task, users: list, profiles: dict | None, device: torch.device,
                     k_list=(1, 2, 4), max_new_tokens: int | None = None, profiles_path=None,
                     shortened: dict | None = None, **gen_kwargs) -> dict:
    """{variant stem: [(query id, output)]} for the 8 variants, generated in one length-sorted pass.

    Prompts too long for max_seq_len are fitted first (fit_prompts); ``shortened``, if given, receives how many
    (truncation.count_cuts).
    """
    variants = variant_names(k_list)
    rows = all_variant_examples(task, users, variants, profiles, profiles_path)
    new_tokens = max_new_tokens or task.max_gen_len
    max_seq_len = gen_kwargs.get("max_seq_len", DEFAULT_MAX_SEQ_LEN)
    prompts, cuts = fit_prompts(tokenizer, [r[2] for r in rows], max_seq_len, new_tokens,
                                gen_kwargs.get("add_special_tokens", True))
    if shortened is not None:
        shortened.update(count_cuts(cuts, max_seq_len))
    outputs = generate(model, tokenizer, prompts, new_tokens, device, **gen_kwargs)
    preds = {stem: [] for stem, _, _ in variants}
    for (stem, qid, _), out in zip(rows, outputs):
        preds[stem].append((qid, out))
    return preds


def write_variant_files(out_dir: Path, task: Task, preds: dict) -> None:
    for stem, rows in preds.items():
        write_predictions(Path(out_dir) / f"{stem}.json", task, rows)
