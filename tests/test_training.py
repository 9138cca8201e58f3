"""Training loop, answer-only masking, LR schedule, adapter save/load, gates and batched generation."""
import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from perpcs.models.lora import is_complete_adapter, load_adapter_weights, save_peft_adapter
from perpcs.errors import PerpcsError
from perpcs.method.gates import GatedInput, install_gates, lora_modules, remove_gates
from perpcs.engine.generation import generate, variant_names
from perpcs.models.loading import load_base_model
from perpcs.models.lora import lora_config
from perpcs.data.prompts import Example
from perpcs.engine.training import (IGNORE_INDEX, TrainConfig, collate, count_steps, make_batches,
                                    tokenize_example, train)


@pytest.fixture()
def tiny(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), device="cpu")


def test_loss_mask_covers_exactly_the_answer_and_eos(tiny):
    _, tok, _ = tiny
    ex = Example("Review: great blender Score:", " 5")
    t = tokenize_example(tok, ex, 100)
    answer_ids = t.input_ids[len(tok(ex.prompt)["input_ids"]):]
    assert answer_ids[-1] == tok.eos_token_id
    assert [x for x in t.labels if x != IGNORE_INDEX] == answer_ids
    assert tok.decode(answer_ids, skip_special_tokens=True) == " 5"
    assert all(x == IGNORE_INDEX for x in t.labels[:len(t.labels) - len(answer_ids)])


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_answer(tiny):
    _, tok, _ = tiny
    ex = Example("word " * 200 + "Score:", " 4")
    full = tokenize_example(tok, ex, 10_000)
    t = tokenize_example(tok, ex, 12)
    assert len(t.input_ids) == 12
    assert tok.decode([x for x in t.labels if x != IGNORE_INDEX], skip_special_tokens=True) == " 4"
    assert t.input_ids[0] == tok.bos_token_id                      # BOS kept in front
    assert t.input_ids[1:] == full.input_ids[-11:]                  # the rest: the end of the sequence
    assert t.labels[1:] == full.labels[-11:]


def test_collate_pads_right_and_masks_padding():
    from perpcs.engine.training import Tokenized
    batch = collate([Tokenized([1, 2, 3], [IGNORE_INDEX, 2, 3], ""), Tokenized([4], [4], "")], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_answer_only_loss_equals_the_hf_loss(tiny):
    from perpcs.engine.training import answer_loss
    model, tok, _ = tiny
    batch = collate([tokenize_example(tok, ex, 64) for ex in LEARNABLE[:3]], tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model, batch), model(**batch).loss)


def published_lr(g: int, n_batches: int, epochs: int, base_lr: float) -> float:
    """docs/method.md section 5 read as a closed form (accum_iter 1): optimizer step g (0-based) uses the base lr for g = 0 and
    f((g - 1) / L) after it, f(x) = lr * 0.5 * (1 + cos(pi * x / epochs)), x never capped."""
    if g == 0:
        return base_lr
    return base_lr * 0.5 * (1 + math.cos(math.pi * ((g - 1) / n_batches) / epochs))


def logged_lrs(tiny, tmp_path, n_examples: int, cfg: TrainConfig, base_lr: float = 1e-3) -> tuple:
    """A real train() on the tiny model with batch 1 (L = n_examples loader batches per epoch); the lr of
    every step as train_log.jsonl wrote it, and train()'s stats."""
    from peft import get_peft_model
    model, tok, device = tiny
    peft_model = get_peft_model(model, lora_config())
    examples = [Example(f"Review: the {i} blender Score:", f" {i % 5 + 1}") for i in range(n_examples)]
    log = tmp_path / "train_log.jsonl"
    try:
        stats = train(peft_model, tok, examples, replace(cfg, lr=base_lr, batch_size=1, grad_ckpt=False,
                                                        max_seq_len=64), device, log_path=log, show_progress=False)
    finally:
        peft_model.unload()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, len(lines) + 1))
    return [x["lr"] for x in lines], stats


@pytest.mark.parametrize("n_batches,epochs,max_step", [(7, 3, 100), (40, 2, 200)])
def test_every_step_uses_the_published_lr(tiny, tmp_path, n_batches, epochs, max_step):
    """The sharer (L=7: 100 steps cycle through the cosine ~4.8 times over 3 epochs) and gate (L=40, 2 epochs,
    200 steps) settings: the lr of every logged step is the formula's, past --epochs too."""
    lrs, stats = logged_lrs(tiny, tmp_path, n_batches, TrainConfig(epochs=epochs, max_step=max_step))
    assert stats["steps"] == len(lrs) == max_step
    expected = [published_lr(g, n_batches, epochs, 1e-3) for g in range(max_step)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=1e-18)
    # not capped at --epochs: the cosine reaches 0 at x = epochs and rises again
    bottom = epochs * n_batches + 1
    assert lrs[bottom] < 1e-18 and lrs[bottom + 1] > lrs[bottom]
    assert stats["next_lr"] == pytest.approx(published_lr(max_step, n_batches, epochs, 1e-3), rel=1e-12)


@pytest.mark.parametrize("max_step", [None, 10])
def test_accumulation_updates_on_loader_steps_and_the_epoch_end(tiny, tmp_path, max_step):
    """L = 7 loader batches, accum_iter 3: updates on loader steps j = 2, 5 and 6 (the short window) of every
    epoch, each setting the next lr from x = j / L + e. Without --max_step: exactly epochs * ceil(7 / 3) = 6
    steps; with --max_step 10: epochs repeat, x goes on past --epochs (2)."""
    f = lambda x: 1e-3 * 0.5 * (1 + math.cos(math.pi * x / 2))   # noqa: E731
    xs = [e + j / 7 for e in range(4) for j in (2, 5, 6)]          # x of each update, in order
    lrs, stats = logged_lrs(tiny, tmp_path, 7, TrainConfig(epochs=2, accum_iter=3, max_step=max_step))
    n = 6 if max_step is None else 10
    assert stats["steps"] == len(lrs) == n
    np.testing.assert_allclose(lrs, [1e-3] + [f(x) for x in xs[:n - 1]], rtol=1e-12)
    assert stats["next_lr"] == pytest.approx(f(xs[n - 1]), rel=1e-12)


def test_the_task_lora_schedule_ends_near_lr_0(tiny, tmp_path):
    """Task LoRA: 3 epochs, no --max_step (the stage defaults). Its last step (g = 3L - 1) uses f(3 - 2/L); the
    lr set after it, f(3 - 1/L), is used by no step. Neither is exactly 0; both are O(1/L^2) of the base lr
    (here L = 5: under 5% and 1.1%; with L = 1000 batches, ~1e-6)."""
    import task_LoRA
    args = task_LoRA.parse_args(["--task_name", "movie_tagging"])
    assert (args.epochs, args.max_step) == (3, None)
    n_batches = 5
    lrs, stats = logged_lrs(tiny, tmp_path, n_batches, TrainConfig(epochs=args.epochs, max_step=args.max_step))
    assert len(lrs) == stats["steps"] == 3 * n_batches
    f = lambda x: 1e-3 * 0.5 * (1 + math.cos(math.pi * x / 3))   # noqa: E731
    assert lrs[-1] == pytest.approx(f(3 - 2 / n_batches), rel=1e-12) and 0 < lrs[-1] < 0.05e-3
    assert stats["next_lr"] == pytest.approx(f(3 - 1 / n_batches), rel=1e-12) and 0 < stats["next_lr"] < 0.011e-3
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))          # decreasing all the way (lrs[0] == lrs[1])


def test_stage_defaults_of_the_published_schedule():
    import OPPU
    import train_anchor_gate
    import train_anchor_PEFT
    for script, expected in ((train_anchor_PEFT, (3, 100)), (train_anchor_gate, (2, 200)), (OPPU, (2, None))):
        args = script.parse_args(["--task_name", "movie_tagging"])
        assert (args.epochs, args.max_step) == expected, script.__name__


def test_step_counts():
    assert count_steps(12, TrainConfig(batch_size=6, epochs=3)) == 6
    assert count_steps(12, TrainConfig(batch_size=6, epochs=3, max_step=4)) == 4
    assert count_steps(12, TrainConfig(batch_size=6, epochs=3, max_step=100)) == 100   # epochs repeat
    assert count_steps(13, TrainConfig(batch_size=6, epochs=1, accum_iter=2)) == 2
    assert count_steps(7, TrainConfig(batch_size=1, epochs=2, accum_iter=3)) == 6


def test_batches_cover_every_example_once_per_epoch():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 50, 7, 48, 6, 49, 8, 47]
    batches = make_batches(8, 2, gen, lengths)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) < 10 for b in batches)   # grouped by length


TRAINING_SCRIPTS = ("task_LoRA", "train_anchor_PEFT", "train_anchor_gate", "OPPU")


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_every_training_stage_shuffles_by_default_and_groups_only_when_asked(name):
    """The published loops shuffle; length grouping is an opt-in speed flag (issue 22 item 3)."""
    import importlib

    import cli_flags
    script = importlib.import_module(name)
    args = script.parse_args(["--task_name", "movie_tagging"])
    assert args.group_by_length is False and cli_flags.train_config(args).group_by_length is False
    grouped = script.parse_args(["--task_name", "movie_tagging", "--group_by_length"])
    assert cli_flags.train_config(grouped).group_by_length is True
    assert TrainConfig().group_by_length is False


def test_the_default_order_is_a_fresh_seeded_permutation_every_epoch():
    """Without lengths: each epoch a permutation of all examples, a new one each epoch; the same seed gives
    the same epochs, another seed others (the per-user seeds of two users, as the stages pass them)."""
    from perpcs.engine.training import user_seed

    def epochs(seed: int, n: int = 20, count: int = 3) -> list:
        gen = torch.Generator().manual_seed(seed)
        return [make_batches(n, 3, gen) for _ in range(count)]

    seed_a, seed_b = user_seed(0, "u1"), user_seed(0, "u2")
    runs = epochs(seed_a)
    for batches in runs:
        assert sorted(i for b in batches for i in b) == list(range(20))
        assert [len(b) for b in batches] == [3] * 6 + [2]
    flat = [[i for b in batches for i in b] for batches in runs]
    assert len({tuple(f) for f in flat}) == 3                    # a fresh order each epoch
    assert flat[0] != list(range(20))                            # shuffled, not file order
    assert epochs(seed_a) == runs                                # one seed, one order
    assert epochs(seed_b) != runs                                # two seeds, two orders


def test_the_train_loop_uses_the_seeded_shuffle_by_default(tiny, monkeypatch):
    """train() with the default config: no length grouping, each epoch's batches are make_batches' from a
    generator seeded with cfg.seed (the stages set it to the user's seed), so a seed fixes the order."""
    import perpcs.engine.training as training
    from peft import get_peft_model
    from perpcs.engine.training import user_seed
    model, tok, device = tiny
    # lengths that grouping would sort together: 3 short and 3 long prompts, interleaved
    examples = [Example(("Review: the blender " + "very " * (20 * (i % 2))).strip() + " Score:", f" {i}")
                for i in range(6)]
    seen = []
    real = training.make_batches

    def record(n, batch_size, generator, lengths=None):
        batches = real(n, batch_size, generator, lengths)
        seen.append((lengths, batches))
        return batches

    monkeypatch.setattr(training, "make_batches", record)
    orders = {}
    for user in ("u1", "u2", "u1"):
        seed = user_seed(0, user)
        seen.clear()
        peft_model = get_peft_model(model, lora_config())
        try:
            train(peft_model, tok, examples, TrainConfig(batch_size=2, epochs=3, grad_ckpt=False, max_seq_len=64,
                                                         seed=seed), device, show_progress=False)
        finally:
            peft_model.unload()
        assert [lengths for lengths, _ in seen] == [None] * 3             # shuffled, not grouped
        gen = torch.Generator().manual_seed(seed)
        assert [b for _, b in seen] == [real(6, 2, gen) for _ in range(3)]
        for _, batches in seen:
            assert sorted(i for b in batches for i in b) == list(range(6))
        flat = [tuple(i for b in batches for i in b) for _, batches in seen]
        assert len(set(flat)) > 1                                          # not one order repeated
        orders.setdefault(user, []).append(flat)
    assert orders["u1"][0] == orders["u1"][1] and orders["u1"][0] != orders["u2"][0]


LEARNABLE = [Example(f"Review: the {w} blender Score:", f" {s}") for w, s in
             [("awful", 1), ("great", 5), ("bad", 1), ("superb", 5), ("poor", 1), ("lovely", 5)]]


def test_loss_falls_on_a_learnable_task_and_only_lora_changes(tiny, tmp_path):
    from peft import get_peft_model
    model, tok, device = tiny
    with torch.no_grad():   # a random 64-wide head caps logits near +-1; widen it so the task is learnable
        model.lm_head.weight.mul_(10)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, lora_config(r=8, alpha=16, dropout=0.0))
    log = tmp_path / "log.jsonl"
    cfg = TrainConfig(lr=1e-2, weight_decay=0.0, batch_size=6, epochs=40, grad_ckpt=True)
    first = train(peft_model, tok, LEARNABLE, TrainConfig(lr=0.0, batch_size=6, epochs=1), device,
                  show_progress=False)["mean_loss"]
    stats = train(peft_model, tok, LEARNABLE, cfg, device, log_path=log, show_progress=False)
    assert stats["steps"] == 40 and stats["last_loss"] < 0.25 * first
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 41)) and all({"loss", "lr", "tokens_per_s"} <= set(x)
                                                                   for x in lines)
    merged_names = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                    for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(merged_names[k], v) for k, v in base_before.items())

    # save / load round trip through the standard peft format
    out = save_peft_adapter(peft_model, tmp_path / "adapter")
    assert is_complete_adapter(out)
    from peft import PeftModel
    ids = collate([tokenize_example(tok, LEARNABLE[0], 64)], tok.pad_token_id)
    with torch.no_grad():
        expected = peft_model(input_ids=ids["input_ids"]).logits
    base = peft_model.unload()
    loaded = PeftModel.from_pretrained(base, str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids["input_ids"]).logits, expected)


def test_non_finite_loss_stops_with_the_step(tiny, tmp_path):   # nothing saved then: test_faults
    from peft import get_peft_model
    model, tok, device = tiny
    peft_model = get_peft_model(model, lora_config())
    for name, p in peft_model.named_parameters():   # poison one LoRA weight: the first loss is NaN
        if "lora_B" in name:
            p.data[0, 0] = float("nan")
            break
    with pytest.raises(PerpcsError, match=r"user u7.*non-finite loss.*step 1"):
        train(peft_model, tok, LEARNABLE, TrainConfig(epochs=1, batch_size=2), device, desc="user u7",
              show_progress=False)


def test_gate_is_applied_exactly_as_spec_6(tiny):
    from peft import get_peft_model
    model, tok, _ = tiny
    peft_model = get_peft_model(model, lora_config(dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen)
    gates = install_gates(peft_model)
    piece, module = next(iter(lora_modules(peft_model).items()))
    gates[piece].gate.data = torch.randn(gates[piece].gate.shape, generator=gen)
    x = torch.randn(2, 5, module.in_features, generator=gen)
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    g = gates[piece].gate
    expected = module.base_layer(x) + ((x * torch.sigmoid(x @ g).unsqueeze(-1)) @ a.T @ b.T) * module.scaling["default"]
    torch.testing.assert_close(module(x), expected)
    # only the gates train
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".gate") for n in trainable)
    remove_gates(peft_model)
    assert not any(isinstance(m, GatedInput) for m in peft_model.modules())


def test_gate_training_changes_gates_only(tiny):
    from peft import get_peft_model
    model, tok, device = tiny
    peft_model = get_peft_model(model, lora_config())
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    gates = install_gates(peft_model)
    train(peft_model, tok, LEARNABLE, TrainConfig(lr=1e-2, weight_decay=0.0, epochs=3, batch_size=3), device,
          show_progress=False)
    after = peft_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())          # LoRA and base bit-identical
    assert any(float(g.gate.detach().abs().sum()) > 0 for g in gates.values())   # gates moved


def test_batched_generation_equals_one_by_one_greedy(tiny):
    model, tok, device = tiny
    prompts = ["Review: great", "Description: a robot falls in love in deep space Tag:", "Tweet:",
               "Generate a headline for the following article: rain in Paris"]
    batched = generate(model, tok, prompts, 6, device, temperature=0, batch_size=4)
    single = [generate(model, tok, [p], 6, device, temperature=0, batch_size=1)[0] for p in prompts]
    assert batched == single and any(batched)


def test_static_kv_cache_generates_the_same_tokens_as_the_dynamic_one(tiny):
    """The static cache pads prompts to a multiple of 64 columns: masked padding must change nothing, also
    for prompts of very different lengths in one batch and a short last batch; a LoRA model too."""
    from peft import get_peft_model

    model, tok, device = tiny
    prompts = ["Tweet:", "Description: a robot falls in love in deep space Tag:",
               "Generate a headline for the following article: " + "rain in Paris, " * 12, "Review: great"]
    dynamic = generate(model, tok, prompts, 6, device, temperature=0, batch_size=3)
    static = generate(model, tok, prompts, 6, device, temperature=0, batch_size=3, kv_cache="static")
    assert static == dynamic and any(dynamic)
    peft_model = get_peft_model(model, lora_config())
    try:
        for module in peft_model.modules():   # a non-zero LoRA, so the adapter path matters
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
        with_lora = generate(peft_model, tok, prompts, 6, device, temperature=0, batch_size=3)
        assert generate(peft_model, tok, prompts, 6, device, temperature=0, batch_size=3,
                        kv_cache="static") == with_lora
        assert with_lora != dynamic
    finally:
        peft_model.unload()
    with pytest.raises(ValueError, match="kv_cache"):
        generate(model, tok, prompts, 2, device, kv_cache="paged")


def test_eight_variant_names():
    names = [stem for stem, _, _ in variant_names([1, 2, 4])]
    assert names == ["kNP", "k1", "k2", "k4", "kNP-profile", "k1-profile", "k2-profile", "k4-profile"]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_saved_adapter_files_follow_the_umask(tiny, tmp_path, umask):
    # safetensors' save_file (under peft's save_pretrained) makes its file 0600 whatever the umask
    from peft import get_peft_model
    from safetensors.torch import save_file
    from perpcs.atomic import write_dir_atomic
    model, _, _ = tiny
    peft_model = get_peft_model(model, lora_config())

    def nested(staging):   # a sharer-gates-like dir with a sub dir
        (staging / "sub").mkdir()
        save_file({"g": torch.zeros(2)}, str(staging / "sub" / "gates.safetensors"))

    old = os.umask(umask)
    try:
        outs = [save_peft_adapter(peft_model, tmp_path / "adapter", extra_json={"source.json": {"a": 1}}),
                write_dir_atomic(tmp_path / "gates", nested)]
    finally:
        os.umask(old)
    for out in outs:
        paths = [out, *out.rglob("*")]
        assert len(paths) >= 3
        modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in paths}
        want = {str(p.relative_to(tmp_path)): (0o777 if p.is_dir() else 0o666) & ~umask for p in paths}
        assert modes == want
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_load_adapter_weights_restores_a_saved_adapter(tiny, tmp_path):
    from peft import get_peft_model
    model, tok, _ = tiny
    peft_model = get_peft_model(model, lora_config())
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data.normal_()
    out = save_peft_adapter(peft_model, tmp_path / "a")
    saved = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data.zero_()
    load_adapter_weights(peft_model, out)
    assert all(torch.equal(peft_model.state_dict()[k], v) for k, v in saved.items())


def test_a_short_accumulation_window_is_a_mean_not_a_part(tiny, monkeypatch):
    """Three examples with equal answers, batch 1 x accum_iter 4 (one short window of 3) must reach the optimizer
    with the gradient of one batch of 3: the window's mean, not 3/4 of it."""
    from peft import get_peft_model
    model, tok, device = tiny
    examples = [Example(f"Review: the {w} blender Score:", " 5") for w in ("red", "blue", "green")]
    real_clip = torch.nn.utils.clip_grad_norm_
    seen = []

    def record(params, *args, **kwargs):
        seen.append([p.grad.detach().clone() for p in params])
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    for batch_size, accum in ((3, 1), (1, 4)):
        torch.manual_seed(0)                             # the same LoRA init both times
        peft_model = get_peft_model(model, lora_config(dropout=0.0))
        with torch.no_grad():                            # B = 0 would give A no gradient
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
        cfg = TrainConfig(lr=1e-2, batch_size=batch_size, accum_iter=accum, epochs=1, group_by_length=False)
        assert train(peft_model, tok, examples, cfg, device, show_progress=False)["steps"] == 1
        peft_model.unload()
    one_batch, window = seen
    assert any(g.abs().max() > 0 for g in one_batch)
    for a, b in zip(window, one_batch):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_non_finite_gradient_with_a_finite_loss_stops_and_saves_nothing(tiny):
    """An overflow in the backward (finite loss, inf gradient) would turn the clipped step into NaN weights."""
    from peft import get_peft_model
    model, tok, device = tiny
    peft_model = get_peft_model(model, lora_config())
    try:
        name, param = next((n, p) for n, p in peft_model.named_parameters() if "lora_B" in n)
        param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        with pytest.raises(PerpcsError, match=r"user u9.*non-finite gradient.*step 1"):
            train(peft_model, tok, LEARNABLE, TrainConfig(epochs=1, batch_size=2), device, desc="user u9",
                  show_progress=False)
        assert torch.isfinite(param).all()               # the optimizer never stepped
    finally:
        peft_model.unload()


@pytest.mark.parametrize("flag,value", [("batch_size", 0), ("accum_iter", 0), ("epochs", 0), ("max_step", 0),
                                        ("max_seq_len", 0), ("lr", -1.0), ("clip", -1.0), ("weight_decay", -0.1),
                                        ("seed", -1), ("seed", 2**32)])
def test_bad_training_settings_fail_before_anything_runs(flag, value):
    with pytest.raises(PerpcsError, match=f"--{flag}"):
        TrainConfig(**{flag: value})


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
def test_set_seed_seeds_the_generators_the_hand_written_seeding_did(seed):
    """transformers.set_seed replaced perpcs' own seed_all (random, numpy, torch): the same states, the same runs."""
    import random

    from transformers import set_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    expected = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.random(), np.random.rand(), torch.rand(1)      # move every generator on
    set_seed(seed)
    state = np.random.get_state()
    assert random.getstate() == expected[0]
    assert state[0] == expected[1][0] and np.array_equal(state[1], expected[1][1]) and state[2:] == expected[1][2:]
    assert torch.equal(torch.get_rng_state(), expected[2])


def test_republishing_an_adapter_never_pairs_new_weights_with_the_old_config(tiny, tmp_path, monkeypatch):
    """Overwriting an existing adapter dir (stage 1's dir, --overwrite) that fails half-way leaves no adapter
    that counts as complete, and says so; the dir's other files stay."""
    import errno
    import os

    from peft import get_peft_model

    from perpcs import atomic
    model, tok, device = tiny
    target = tmp_path / "task"
    peft_model = get_peft_model(model, lora_config(r=8))
    save_peft_adapter(peft_model, target)
    peft_model.unload()
    (target / "train_log.jsonl").write_text("{}\n")
    real_replace = os.replace

    def no_space_for_the_config(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "adapter_config.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    bigger = get_peft_model(model, lora_config(r=16))
    monkeypatch.setattr(atomic.os, "replace", no_space_for_the_config)
    try:
        with pytest.raises(PerpcsError, match="incomplete now"):
            save_peft_adapter(bigger, target)
    finally:
        monkeypatch.undo()
        bigger.unload()
    assert not is_complete_adapter(target)            # redone by the next run, not loaded as r=8 + r=16 weights
    assert (target / "train_log.jsonl").read_text() == "{}\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging dir left behind


def test_a_prompt_cut_for_length_keeps_its_bos_like_training(tiny):
    from perpcs.engine.generation import keep_bos_cut_left
    model, tok, device = tiny
    assert keep_bos_cut_left([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert keep_bos_cut_left([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]        # no BOS to keep
    assert keep_bos_cut_left([1, 5, 6], 3, bos_id=1) == [1, 5, 6]
    long_prompt = "Review: " + "very good blender " * 60 + "Score:"
    assert tok(long_prompt)["input_ids"][0] == tok.bos_token_id
    cut = generate(model, tok, [long_prompt], 3, device, temperature=0, max_seq_len=40)
    whole = generate(model, tok, [tok.decode(keep_bos_cut_left(tok(long_prompt)["input_ids"], 37,
                                                                   tok.bos_token_id)[1:])],
                     3, device, temperature=0, max_seq_len=4000)
    assert cut == whole          # the cut prompt is BOS + the last 36 tokens, exactly as if given so


def test_negative_temperature_is_refused(tiny):
    model, tok, device = tiny
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, ["Review:"], 2, device, temperature=-0.5)


def test_profile_prompt_drops_the_oldest_items_to_fit_and_keeps_the_instruction(tiny):
    from perpcs.stages.profiles import fitted_profile_prompt, profile_prompt
    from perpcs.data.tasks import get_task
    _, tok, _ = tiny
    task = get_task("news_headline")
    items = [{"id": str(i), "text": f"article {i} " + "rain in Paris " * 40, "title": f"Title {i}"}
             for i in range(10)]
    full = profile_prompt(task, items, 10)
    budget = len(tok(full)["input_ids"]) // 3
    fitted = fitted_profile_prompt(task, tok, items, 10, budget, chat=False)
    n = len(tok(fitted)["input_ids"])
    assert n <= budget
    instruction = task.profile_prompts["profile_prompt"].split("{}")[0]
    assert fitted.startswith(instruction)                          # never cut from the front
    kept = [i for i in range(10) if f"article {i} " in fitted]
    assert kept == list(range(10 - len(kept), 10)) and 0 < len(kept) < 10   # the most recent ones
    more = profile_prompt(task, items[9 - len(kept):], 0)           # one more item would not fit
    assert len(tok(more)["input_ids"]) > budget
    assert fitted_profile_prompt(task, tok, items, 10, 10 ** 6, chat=False) == full
    assert "article 9 " in fitted_profile_prompt(task, tok, items, 10, 5, chat=False)   # at least one item


def test_sampling_is_seeded_and_uses_temperature_and_top_p_only(tiny, monkeypatch):
    """The published decoding (temperature 0.1, top-p 0.9): the same seed gives the same text, another seed
    other text at a high temperature, and transformers gets no top-k."""
    model, tok, device = tiny
    prompts = ["Review: the red blender Score:", "Tweet:"]
    hot = dict(temperature=5.0, top_p=1.0, max_seq_len=200)
    one = generate(model, tok, prompts, 8, device, seed=1, **hot)
    assert generate(model, tok, prompts, 8, device, seed=1, **hot) == one
    assert generate(model, tok, prompts, 8, device, seed=2, **hot) != one
    # a nucleus of ~0 keeps only the most likely token: sampling becomes greedy
    assert generate(model, tok, prompts, 8, device, temperature=0.1, top_p=1e-6) == \
        generate(model, tok, prompts, 8, device, temperature=0)
    seen = {}
    real = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate(model, tok, prompts, 2, device)               # the defaults
    assert (seen["do_sample"], seen["temperature"], seen["top_p"], seen["top_k"]) == (True, 0.1, 0.9, 0)


def test_profile_prompt_takes_the_last_k_items(tiny):
    from perpcs.stages.profiles import profile_prompt
    from perpcs.data.tasks import get_task
    task = get_task("news_headline")
    items = [{"id": str(i), "text": f"article number {i}", "title": f"Title {i}"} for i in range(5)]
    prompt = profile_prompt(task, items, 2)
    assert [i for i in range(5) if f"article number {i}" in prompt] == [3, 4]
    assert [i for i in range(5) if f"article number {i}" in profile_prompt(task, items, 0)] == list(range(5))


def test_the_progress_bar_says_its_loss_is_an_average_of_the_last_steps():
    """The bar's loss is a mean over recent steps, labelled so, not an unlabelled number beside "last loss"."""
    from perpcs.engine.training import progress_loss
    losses = [float(i) for i in range(15)]
    assert progress_loss(losses) == f"loss (avg of last 10 steps) {np.mean(losses[-10:]):.4f}"   # 9.5, not 14
    assert progress_loss([0.8, 0.4, 0.3]) == "loss (avg of last 3 steps) 0.5000"


def test_wrapping_a_loaded_base_with_peft_gives_no_checkpointing_future_warning(tiny_model_dir):
    """peft probes the deprecated model.is_gradient_checkpointing on every wrap: our loaded base does not warn,
    other warnings still show, and the same wrap on a model loaded without it does warn (the test can tell)."""
    import warnings

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    def wrap_warnings(load):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load()
            get_peft_model(model, lora_config(4, 8, 0.0, ("q_proj",)))
            warnings.warn("another warning", FutureWarning)
        return [str(w.message) for w in caught]

    plain = wrap_warnings(lambda: AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    assert any("is_gradient_checkpointing" in m for m in plain)
    ours = wrap_warnings(lambda: load_base_model(str(tiny_model_dir), device="cpu")[0])
    assert not any("is_gradient_checkpointing" in m for m in ours) and "another warning" in ours
