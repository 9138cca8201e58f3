"""PAG profile texts (``profile-id2text.json``): an LLM summary of each user's history (SPEC 5).

The reference ``profile_prompts`` are used verbatim: the user's last ``k`` history items, each written with the
task's profile ``retrieval_history`` template (368 words at most), joined by newlines, fill ``profile_prompt``.
Resumable: users already in the file are skipped, and the file is rewritten atomically after every batch.
"""
from __future__ import annotations

from pathlib import Path

from .data import Layout, all_splits_users, load_profiles, user_id, write_json_atomic
from .prompts import HISTORY_WORDS, truncated_item
from .tasks import Task, get_task


def profile_prompt(task: Task, items: list, k: int) -> str:
    templates = task.profile_prompts
    recent = items[-k:] if k > 0 else items
    history = "\n".join(templates["retrieval_history"].format(**truncated_item(it, HISTORY_WORDS)) for it in recent)
    return templates["profile_prompt"].format(history)


def as_chat(tokenizer, prompt: str) -> str:
    """Instruction-tuned models answer better inside their chat template; base models get the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def generate_profiles(args) -> Path:
    from .generation import generate
    from .modeling import load_base_model
    task = get_task(args.task_name)
    layout = Layout(args.data_dir, task)
    out_path = Path(args.output_file) if args.output_file else layout.profiles
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
    model, tokenizer, device = load_base_model(args.model_path, None, args.device)
    use_chat = args.chat_template and getattr(tokenizer, "chat_template", None)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        prompts = [profile_prompt(task, u["profile"], args.k) for u in chunk]
        if use_chat:
            prompts = [as_chat(tokenizer, p) for p in prompts]
        texts = generate(model, tokenizer, prompts, args.max_gen_len, device, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, max_seq_len=args.max_seq_len)
        for u, text in zip(chunk, texts):
            profiles[user_id(u)] = text
        write_json_atomic(out_path, profiles)
        print(f"  {min(start + args.batch_size, len(todo))}/{len(todo)} profiles written")
    return out_path
