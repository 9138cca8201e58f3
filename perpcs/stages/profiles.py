"""PAG profile texts (``profile-id2text.json``): an LLM summary of each user's history (docs/method.md section 5).

The reference ``profile_prompts`` are used verbatim: the user's last ``k`` history items, each written with the
task's profile ``retrieval_history`` template (368 words at most), joined by newlines, fill ``profile_prompt``;
the oldest of them are left out when the prompt would not fit ``--max_seq_len`` minus the new tokens (counted:
a printed line and ``<output file stem>.summary.json`` beside the profiles). Resumable: users already in the
file are skipped, and the file is rewritten atomically after every batch.
"""
from __future__ import annotations

from pathlib import Path

from perpcs.atomic import write_json_atomic
from perpcs.data.layout import Layout, all_splits_users, load_profiles, read_json, user_id
from perpcs.data.prompts import HISTORY_WORDS, truncated_item
from perpcs.data.tasks import Task, get_task
from perpcs.data.truncation import count_cuts, describe
from perpcs.stages.config import ProfileConfig


def profile_prompt(task: Task, items: list, k: int) -> str:
    templates = task.profile_prompts
    recent = items[-k:] if k > 0 else items
    history = "\n".join(templates["retrieval_history"].format(**truncated_item(it, HISTORY_WORDS)) for it in recent)
    return templates["profile_prompt"].format(history)


def fitted_profile_prompt(task: Task, tokenizer, items: list, k: int, budget: int, chat: bool) -> str:
    """The prompt with the most recent of the last ``k`` items that fit in ``budget`` tokens (at least one)."""
    return fit_profile_prompt(task, tokenizer, items, k, budget, chat)[0]


def fit_profile_prompt(task: Task, tokenizer, items: list, k: int, budget: int, chat: bool) -> tuple:
    """(fitted_profile_prompt, what it lost): ("history",) when older items were left out, + "left" when even
    the latest item alone does not fit (generation then cuts the prompt from the left), () when all fit.

    Generation cuts a too-long prompt from the left, which here would cut the instruction and the chat header
    that come first; so the oldest items give way instead (binary search on how many of the latest to keep).
    """
    recent = items[-k:] if k > 0 else list(items)

    def text(n: int) -> str:
        prompt = profile_prompt(task, recent[len(recent) - n:], 0)
        return as_chat(tokenizer, prompt) if chat else prompt

    def fits(n: int) -> bool:
        return len(tokenizer(text(n), add_special_tokens=not chat)["input_ids"]) <= budget

    if fits(len(recent)):
        return text(len(recent)), ()
    low, high = 1, len(recent)          # fits(high) is False; find the largest n that fits, at least 1
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    cut = ("history",) if low < len(recent) else ()
    return text(low), cut + (() if fits(low) else ("left",))


def as_chat(tokenizer, prompt: str) -> str:
    """Instruction-tuned models answer better inside their chat template; base models get the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def generate_profiles(cfg: ProfileConfig) -> Path:
    from perpcs.engine.generation import generate, prompt_budget
    from perpcs.models.loading import load_base_model
    task = get_task(cfg.task_name)
    layout = Layout(cfg.data_dir, task)
    out_path = Path(cfg.output_file) if cfg.output_file else layout.profiles
    users = all_splits_users(layout)
    profiles = load_profiles(out_path) if out_path.is_file() else {}
    seen, todo = set(profiles), []
    for u in users:
        uid = user_id(u)
        if uid not in seen:
            seen.add(uid)
            todo.append(u)
    print(f"profiles for {task.name}: {len(users)} users, {len(profiles)} already in {out_path}, "
          f"{len(todo)} to generate")
    if not todo:
        return out_path
    model, tokenizer, device = load_base_model(cfg.model_path, None, cfg.device, for_lora=False)
    use_chat = cfg.chat_template and getattr(tokenizer, "chat_template", None)
    summary_path = out_path.with_name(out_path.stem + ".summary.json")   # beside the profiles, named for them
    summary = read_json(summary_path, "profile summary") if summary_path.is_file() else {}
    cuts = dict(summary.get("prompt_cuts", {}))   # user -> what its prompt lost to fit, over every run so far
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start:start + cfg.batch_size]
        budget = prompt_budget(cfg.max_seq_len, cfg.max_gen_len)
        fitted = [fit_profile_prompt(task, tokenizer, u["profile"], cfg.k, budget, bool(use_chat)) for u in chunk]
        texts = generate(model, tokenizer, [p for p, _ in fitted], cfg.max_gen_len, device,
                         temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
                         max_seq_len=cfg.max_seq_len,
                         add_special_tokens=not use_chat)   # a chat template writes its own special tokens
        for u, text, (_, cut) in zip(chunk, texts, fitted):
            profiles[user_id(u)] = text
            cuts[user_id(u)] = list(cut)
        write_json_atomic(out_path, profiles)
        counts = count_cuts([cuts[uid] for uid in profiles if uid in cuts], cfg.max_seq_len)
        summary.update(truncated={"prompts": counts}, prompt_cuts=cuts)
        write_json_atomic(summary_path, summary)
        print(f"  {min(start + cfg.batch_size, len(todo))}/{len(todo)} profiles written")
    print(describe("profile prompts", counts, "prompts") + f" (history items: the oldest left out) -> {summary_path}")
    return out_path
