"""Batched generation and the test-time prediction files (no retrieval / BM25 k, without / with profile).

Prompts are sorted by length and left-padded, so a batch wastes little compute on padding and every row's
new tokens start at the same column; only the new tokens are decoded.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
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
AUTO = "auto"
# --users_per_batch auto: users whose rows share a generation batch (each row on its own adapter). On the CPU the
# batched matmuls stop gaining past ~8 users x 16 rows (compute bound) while memory grows with the batch; a GPU keeps
# gaining up to larger batches (its decoding steps are launch bound), and an out-of-memory batch is split (generate).
AUTO_USERS_PER_BATCH = {"cpu": 8}   # fp32 only (resolve_users_per_batch); CUDA runs in bf16
STATIC_WIDTH_STEP = 64   # static cache: prompt widths rounded up to this, so few shapes get compiled
DEFAULT_MAX_SEQ_LEN = 3000


def resolve_users_per_batch(value, device, temperature: float, bf16: bool = False) -> int:
    """--users_per_batch as a number: ``auto`` is AUTO_USERS_PER_BATCH of the device's type for greedy decoding in
    fp32, where batching users gives exactly the per-user loop's outputs (tested); 1 when sampling (temperature > 0:
    a sampled draw depends on every row of its batch, so a user's predictions would depend on the users beside it,
    which change with shards and resumes) and in bf16 (CUDA's weights, --cpu_bf16): there the batch a prompt is in
    changes the low bits, which can flip a greedy token (measured: one answer of the demo's 16 changed), as
    --gen_batch_size can. A number batches users anyway."""
    if value != AUTO:
        return int(value)
    if temperature > 0 or bf16:
        return 1
    return AUTO_USERS_PER_BATCH.get(torch.device(device).type, 1)


def prompt_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """Tokens a prompt may have so that it and its new tokens fit max_seq_len."""
    return max(1, max_seq_len - max_new_tokens)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, device: torch.device,
             temperature: float = 0.1, top_p: float = 0.9, seed: int = 0, batch_size: int = 16,
             max_seq_len: int = DEFAULT_MAX_SEQ_LEN, cpu_bf16: bool = False, show_progress: bool = False,
             kv_cache: str = "dynamic", add_special_tokens: bool = True, adapter_names: list | None = None) -> list:
    """Completions (new tokens only, stripped) for each prompt; greedy when temperature is 0.

    ``kv_cache="static"``: a preallocated KV cache, which transformers pairs with a torch.compile'd decoding
    step (CUDA graphs) on a GPU; the prompts' width is padded to a multiple of STATIC_WIDTH_STEP so that
    batches share a few shapes instead of compiling one graph per width. Same tokens as "dynamic".
    Sampling is temperature + top-p only, as published (transformers would add top-k 50 by default).
    ``add_special_tokens=False`` for prompts that already carry them (chat templates).
    ``adapter_names``: one peft adapter name per prompt; a batch mixing them runs each row on its own adapter
    (row_adapters), so prompts of several users' LoRAs share a batch.
    Greedy decoding: a batch that runs out of GPU memory is split in two and each half generated (greedy tokens
    do not depend on the rows beside them, up to padding numerics); sampling re-raises (its draws would change).
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
    kwargs = dict(do_sample=sampling, temperature=temperature, top_p=top_p, top_k=0) if sampling else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if kv_cache == "static":
        kwargs["cache_implementation"] = "static"

    def run_batch(rows: list) -> None:
        width = max(len(encoded[i]) for i in rows)
        if kv_cache == "static":
            width = -(-width // STATIC_WIDTH_STEP) * STATIC_WIDTH_STEP
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(encoded[i])
            ids[r, width - n:] = torch.tensor(encoded[i])
            mask[r, width - n:] = 1
        if adapter_names is not None:
            set_rows([adapter_names[i] for i in rows])
        out = None
        try:
            with autocast_context(device, cpu_bf16):
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                     eos_token_id=tokenizer.eos_token_id, **kwargs)
        except torch.OutOfMemoryError:
            if sampling or len(rows) == 1:
                raise
        if out is None:   # split outside the handler: its traceback holds the failed batch's tensors
            del ids, mask
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            run_batch(rows[:len(rows) // 2])
            run_batch(rows[len(rows) // 2:])
            return
        for r, i in enumerate(rows):
            outputs[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()

    with row_adapters(model, sorted(set(adapter_names))) if adapter_names is not None else nullcontext() as set_rows:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not show_progress,
                          leave=False):
            run_batch(order[start:start + batch_size])
    model.train(was_training)
    return outputs


@contextmanager
def row_adapters(peft_model, names: list):
    """Each row of a batch on its own LoRA adapter: yields ``set_rows([adapter name per row])``, called before each
    batch. The adapters (``names``, on peft's LoRA Linear layers) are stacked per layer once; peft's adapters are
    disabled (its layers return base_layer(x)) and a forward hook adds each row's B A x * scaling, gathered by row,
    in two batched matmuls. peft's own mixed-adapter batches (``adapter_names=``) do the same with a Python loop
    over the adapters in every layer at every decoding step: with 32 users, slower than one user at a time."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    slot = {name: i for i, name in enumerate(names)}
    rows = {}
    hooks = []

    def hook(layer, inputs, result, stack):
        a, b, scaling = stack
        index = rows["index"]
        if torch.is_tensor(scaling):   # adapters of other alpha / r: a scaling per row
            scaling = scaling[index].view(-1, 1, 1)
        x = inputs[0].to(a.dtype)
        lora = torch.bmm(torch.bmm(x, a[index].transpose(1, 2)), b[index].transpose(1, 2))
        return (result + lora * scaling).to(result.dtype)   # as peft: added in the adapter's dtype, then cast back

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    if not layers:
        raise ValueError("row_adapters: the model has no peft LoRA Linear layer")
    for layer in layers:
        missing = [n for n in names if n not in layer.lora_A]
        if missing or any(n in layer.lora_variant for n in names) or layer.merged:
            raise ValueError(f"row_adapters: {type(layer).__name__} lacks adapters {missing} or holds a variant "
                             f"(DoRA, ...) or a merged adapter: only plain LoRA adapters are batched by row")
        a = torch.stack([layer.lora_A[n].weight for n in names])   # (adapters, r, d_in)
        b = torch.stack([layer.lora_B[n].weight for n in names])   # (adapters, d_out, r)
        scalings = [layer.scaling[n] for n in names]
        scaling = scalings[0] if len(set(scalings)) == 1 else torch.tensor(scalings, dtype=a.dtype, device=a.device)
        hooks.append(layer.register_forward_hook(lambda m, i, o, stack=(a, b, scaling): hook(m, i, o, stack)))

    def set_rows(row_names: list) -> None:
        rows["index"] = torch.tensor([slot[n] for n in row_names], device=layers[0].lora_A[names[0]].weight.device)

    try:
        with peft_model.disable_adapter():
            yield set_rows
    finally:
        for handle in hooks:
            handle.remove()


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
    return [row[:3] for row in user_variant_rows(task, users, variants, profiles, profiles_path)]


def user_variant_rows(task: Task, users: list, variants: list, profiles: dict | None, profiles_path=None) -> list:
    """all_variant_examples' rows, each with the index of its user: (variant stem, query id, Example, user index)."""
    rows = {stem: [] for stem, _, _ in variants}
    for ui, user in enumerate(users):
        history = UserHistory(task, user["profile"])
        for stem, k, with_profile in variants:
            rows[stem].extend((qid, ex, ui) for qid, ex in
                              user_variant_examples(task, user, ui, history, k, with_profile, profiles, profiles_path))
    return [(stem, qid, ex, ui) for stem, _, _ in variants for qid, ex, ui in rows[stem]]


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
    rows, outputs, cuts, max_seq_len = _predict_rows(model, tokenizer, task, users, profiles, device, k_list,
                                                     max_new_tokens, profiles_path, None, gen_kwargs)
    if shortened is not None:
        shortened.update(count_cuts(cuts, max_seq_len))
    preds = {stem: [] for stem, _, _ in variant_names(k_list)}
    for (stem, qid, _, _), out in zip(rows, outputs):
        preds[stem].append((qid, out))
    return preds


def predict_users(model, tokenizer, task: Task, users: list, profiles: dict | None, device: torch.device,
                  k_list=(1, 2, 4), max_new_tokens: int | None = None, profiles_path=None,
                  shortened: list | None = None, adapter_names: list | None = None, **gen_kwargs) -> list:
    """predict_variants for each user separately, [{variant stem: [(query id, output)]}] in ``users``' order, the
    rows of all of them generated together: ``adapter_names`` (one per user) puts each user's rows on its own peft
    adapter. ``shortened``, if given, receives one count_cuts per user."""
    rows, outputs, cuts, max_seq_len = _predict_rows(model, tokenizer, task, users, profiles, device, k_list,
                                                     max_new_tokens, profiles_path, adapter_names, gen_kwargs)
    preds = [{stem: [] for stem, _, _ in variant_names(k_list)} for _ in users]
    for (stem, qid, _, ui), out in zip(rows, outputs):
        preds[ui][stem].append((qid, out))
    if shortened is not None:
        shortened.extend(count_cuts([cut for row, cut in zip(rows, cuts) if row[3] == ui], max_seq_len)
                         for ui in range(len(users)))
    return preds


def _predict_rows(model, tokenizer, task, users, profiles, device, k_list, max_new_tokens, profiles_path,
                  adapter_names, gen_kwargs) -> tuple:
    """(rows of user_variant_rows, their outputs, their cuts, max_seq_len): the prompts fitted, then generated."""
    if adapter_names is not None and len(adapter_names) != len(users):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(users)} users")
    rows = user_variant_rows(task, users, variant_names(k_list), profiles, profiles_path)
    new_tokens = max_new_tokens or task.max_gen_len
    max_seq_len = gen_kwargs.get("max_seq_len", DEFAULT_MAX_SEQ_LEN)
    prompts, cuts = fit_prompts(tokenizer, [r[2] for r in rows], max_seq_len, new_tokens,
                                gen_kwargs.get("add_special_tokens", True))
    names = [adapter_names[r[3]] for r in rows] if adapter_names is not None else None
    outputs = generate(model, tokenizer, prompts, new_tokens, device, adapter_names=names, **gen_kwargs)
    return rows, outputs, cuts, max_seq_len


def write_variant_files(out_dir: Path, task: Task, preds: dict) -> None:
    for stem, rows in preds.items():
        write_predictions(Path(out_dir) / f"{stem}.json", task, rows)
