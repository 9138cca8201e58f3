"""Composition (docs/method.md section 7) against a plain loop-by-loop reference written here from the spec."""
import itertools
import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from perpcs.method.composition import (ComposedLinear, Composer, ComposeSettings, assemble_user, composer_removed,
                                       install_composer)
from perpcs.method.pieces import PiecePool, composed_lora_model, load_composed
from perpcs.method.recipes import make_recipe
from perpcs.method.recipes import materialize
from perpcs.errors import PerpcsError
from perpcs.method.gates import GATES_FILE, answer_predicting_mask
from perpcs.models.loading import load_base_model
from perpcs.models.lora import lora_config
from perpcs.engine.training import IGNORE_INDEX, Tokenized, collate

N_SHARERS = 6
SHARER_IDS = [f"s{i}" for i in range(N_SHARERS)]


@pytest.fixture(scope="module")
def sharer_pool(tiny_model_dir, tmp_path_factory):
    """Six sharers with random LoRAs (standard peft dirs) and random gates."""
    from peft import get_peft_model
    root = tmp_path_factory.mktemp("pool")
    model, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    gen = torch.Generator().manual_seed(1)
    for uid in SHARER_IDS:
        peft_model = get_peft_model(model, lora_config())
        gates = {}
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.3
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                piece = name.removeprefix("base_model.model.")
                gates[piece] = torch.randn(module.lora_A["default"].in_features, generator=gen)
        peft_model.save_pretrained(str(root / "anchor" / f"user_{uid}"))
        (root / "gate" / f"user_{uid}").mkdir(parents=True)
        save_file(gates, str(root / "gate" / f"user_{uid}" / GATES_FILE))
        model = peft_model.unload()
    return root


def random_examples(tokenizer, n=5, seed=0):
    """Tokenized examples of different lengths with 1-3 answer tokens at the end."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(6, 14)
        n_answer = rng.randint(1, 3)
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(length)]
        labels = [IGNORE_INDEX] * (length - n_answer) + ids[-n_answer:]
        out.append(Tokenized(ids, labels, f"example {i}"))
    return out


def softmax_list(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def reference_choice(pool, scores, mode, k, T=1.0, Ts=1.0, top_p=None, sample_topk=None, generator=None):
    """docs/method.md section 7's selection modes, read literally: the sharers mixed at one position (a list; order irrelevant).
    Draws: torch.multinomial without replacement from the given generator, over the probabilities listed in the
    order docs/method.md section 7 names (mode 3: pool order; mode 4: the candidates best first)."""
    ranked = sorted(pool, key=lambda s: (-scores[s], s))       # best first, ties to the lower sharer index
    if mode == 1:
        return ranked[:k]
    if mode == 4:
        cand = ranked[:sample_topk]
        probs = softmax_list([scores[s] / Ts for s in cand])
        drawn = torch.multinomial(torch.tensor(probs, dtype=torch.float32), k, replacement=False, generator=generator)
        return [cand[i] for i in drawn.tolist()]
    probs = softmax_list([scores[s] / Ts for s in ranked])
    nucleus = [s for i, s in enumerate(ranked) if i == 0 or not sum(probs[:i]) > top_p]   # c of the previous one
    if mode == 2:
        return nucleus
    kept = set(nucleus) | set(ranked[:k])
    exps = [math.exp(scores[s] / T) if s in kept else 0.0 for s in pool]                   # pool order, -inf -> 0
    probs = [e / sum(exps) for e in exps]
    drawn = torch.multinomial(torch.tensor(probs, dtype=torch.float32), k, replacement=False, generator=generator)
    return [pool[i] for i in drawn.tolist()]


def reference_assembly(model, pool_dir, batches, tokenized, pad_id, topk, share_ratio, seed, temperature=1.0,
                       mode=1, sample_temperature=1.0, top_p=None, sample_topk=None, chosen_log=None,
                       scores_log=None, pooled_log=None):
    """docs/method.md section 7 written out with Python loops and forward hooks on a plain model. Draws come from a generator seeded
    with the user's seed, used in forward order (batch by batch, piece by piece)."""
    adapters = {uid: load_file(str(pool_dir / "anchor" / f"user_{uid}" / "adapter_model.safetensors"))
                for uid in SHARER_IDS}
    gates = {uid: load_file(str(pool_dir / "gate" / f"user_{uid}" / GATES_FILE)) for uid in SHARER_IDS}
    pieces = list(gates[SHARER_IDS[0]])
    modules = dict(model.named_modules())
    rnd = random.Random(seed)     # pools: once per user and piece, in the pool's piece order (sorted file keys)
    size = int(share_ratio * N_SHARERS)
    pools = {p: (sorted(rnd.sample(range(N_SHARERS), size)) if size < N_SHARERS else list(range(N_SHARERS)))
             for p in pieces}
    per_batch = {p: [] for p in pieces}
    state = {}
    generator = torch.Generator().manual_seed(seed)

    def hook_for(piece):
        def hook(module, inputs, output):
            x = inputs[0]
            mask = state["mask"]
            d = x.shape[-1]
            scores = []
            for s in range(N_SHARERS):
                g = F.layer_norm(gates[SHARER_IDS[s]][piece], (d,), eps=1e-5)
                per_ex = []
                for b in range(x.shape[0]):
                    vals = [float(F.layer_norm(x[b, t], (d,), eps=1e-5) @ g) / math.sqrt(d)
                            for t in range(x.shape[1]) if mask[b, t]]
                    per_ex.append(sum(vals) / len(vals))
                scores.append(sum(per_ex) / len(per_ex))
            chosen = reference_choice(pools[piece], scores, mode, topk, temperature, sample_temperature, top_p,
                                      sample_topk, generator)
            if chosen_log is not None:
                chosen_log.append((pools[piece], scores, chosen))
            if scores_log is not None:
                scores_log.setdefault(piece, []).append(scores)
            if pooled_log is not None:   # the batch's evidence: per example the mean of LN(x) over its positions
                per_ex = [torch.stack([F.layer_norm(x[b, t].float(), (d,), eps=1e-5) for t in range(x.shape[1])
                                       if mask[b, t]]).mean(0) for b in range(x.shape[0])]
                pooled_log.setdefault(piece, []).append(torch.stack(per_ex).mean(0))
            w = softmax_list([scores[s] / temperature for s in chosen])
            key = f"base_model.model.{piece}"
            a = sum(wi * adapters[SHARER_IDS[s]][f"{key}.lora_A.weight"] for wi, s in zip(w, chosen))
            bm = sum(wi * adapters[SHARER_IDS[s]][f"{key}.lora_B.weight"] for wi, s in zip(w, chosen))
            per_batch[piece].append((a, bm))
            return output + (x @ a.T) @ bm.T
        return hook

    handles = [modules[p].register_forward_hook(hook_for(p)) for p in pieces]
    with torch.no_grad():
        for idx in batches:
            batch = collate([tokenized[i] for i in idx], pad_id)
            labels = batch["labels"]                  # position t scores when token t+1 is an answer token
            state["mask"] = torch.tensor([[t + 1 < labels.shape[1] and int(labels[b, t + 1]) != IGNORE_INDEX
                                           for t in range(labels.shape[1])] for b in range(labels.shape[0])])
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h in handles:
        h.remove()
    return {p: (torch.stack([a for a, _ in v]).mean(0), torch.stack([b for _, b in v]).mean(0))
            for p, v in per_batch.items()}


def max_rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


MODES = {   # the settings of each selection mode the tests run (T and Ts differ, so mixing them up shows)
    1: dict(), 2: dict(sample_top_p=0.5, sample_temperature=1.6, agg_temperature=0.7),
    3: dict(sample=True, sample_top_p=0.8, sample_temperature=1.6, agg_temperature=0.7),
    4: dict(sample=True, sample_topk=4, sample_temperature=1.6, agg_temperature=0.7)}


@pytest.mark.parametrize("topk,share_ratio,temperature,mode", [
    (1, 1.0, 1.0, 1), (3, 1.0, 1.0, 1), (1, 0.5, 1.0, 1), (3, 0.5, 1.0, 1), (3, 1.0, 0.3, 1),
    (3, 1.0, 0.7, 2), (3, 0.5, 0.7, 2), (2, 1.0, 0.7, 3), (2, 0.5, 0.7, 3), (2, 1.0, 0.7, 4), (1, 0.67, 0.7, 4)])
def test_assembly_matches_the_loop_reference(tiny_model_dir, sharer_pool, topk, share_ratio, temperature, mode):
    model, tokenizer, device = load_base_model(str(tiny_model_dir), device="cpu")
    extra = {**MODES[mode], "agg_temperature": temperature}
    settings = ComposeSettings(topk=topk, share_ratio=share_ratio, batch_size=3, seed=0, **extra)
    assert settings.selection_mode == mode
    settings.check(N_SHARERS)
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    composer = Composer(pool, settings)
    install_composer(model, composer)
    tokenized = random_examples(tokenizer)
    weights, batches = assemble_user(model, composer, tokenized, tokenizer.pad_token_id, device, seed=7)
    assert [len(b) for b in batches] == [3, 2]               # two batches, the short last one included
    assembled = pool.build(weights)

    reference_model, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    chosen, scores_log, pooled_log = [], {}, {}
    expected = reference_assembly(reference_model, sharer_pool, batches, tokenized, tokenizer.pad_token_id,
                                  topk, share_ratio, seed=7, temperature=temperature, mode=mode,
                                  sample_temperature=settings.sample_temperature, top_p=settings.sample_top_p,
                                  sample_topk=settings.sample_topk, chosen_log=chosen, scores_log=scores_log,
                                  pooled_log=pooled_log)
    assert set(expected) == set(assembled)
    # --save_scores: every sharer's score (share-ratio pools or not), the mean over the two batches
    final_scores = composer.final_scores()
    for piece, per_batch in scores_log.items():
        assert len(per_batch) == 2
        torch.testing.assert_close(final_scores[piece], torch.tensor(per_batch, dtype=torch.float64).mean(0),
                                   rtol=1e-5, atol=1e-6)
    # and the user's pooled vector per piece: the mean over the two batches of the batch's evidence
    final_pooled = composer.final_pooled()
    assert set(final_pooled) == set(pooled_log)
    for piece, per_batch in pooled_log.items():
        assert len(per_batch) == 2
        torch.testing.assert_close(final_pooled[piece], torch.stack(per_batch).double().mean(0), rtol=1e-5,
                                   atol=1e-6)
    for piece, (a_ref, b_ref) in expected.items():
        a, b = assembled[piece]
        assert max_rel_err(a, a_ref) < 1e-6, piece
        assert max_rel_err(b, b_ref) < 1e-6, piece
    for piece, w in weights.items():    # a convex mixture over what the batches chose
        assert abs(float(w.sum()) - 1) < 1e-6
    counts = {len(c) for _, _, c in chosen}
    if mode == 2:                       # the nucleus: a number of pieces that varies, whatever --topk says
        assert len(counts) > 1 and counts != {topk}
    else:
        assert counts == {topk}
    if mode in (3, 4):                  # a real draw: not always the top k
        assert any(set(c) != set(reference_choice(pool, scores, 1, topk)) for pool, scores, c in chosen)


@pytest.mark.parametrize("mode", [1, 2, 4])
def test_recipe_materializes_to_the_assembled_adapter(tiny_model_dir, sharer_pool, tmp_path, mode):
    """Mode 2's variable number of sharers per piece goes through the recipe and materialize like the top k; the
    peft model that predicts (as stage 5 sets it up) holds exactly the materialized adapter."""
    from peft import PeftModel, get_peft_model_state_dict
    model, tokenizer, device = load_base_model(str(tiny_model_dir), device="cpu")
    settings = ComposeSettings(topk=2, batch_size=2, **MODES[mode])
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    peft_model = composed_lora_model(model, pool)
    composer = Composer(pool, settings)
    install_composer(model, composer)
    tokenized = random_examples(tokenizer, n=4, seed=3)
    with peft_model.disable_adapter():
        weights, batches = assemble_user(model, composer, tokenized, tokenizer.pad_token_id, device, seed=1)
    direct = pool.save_adapter(weights, tmp_path / "direct")
    from perpcs.method.recipes import write_recipe
    recipe = make_recipe(pool, weights, settings, "u1", "movie_tagging", batches)
    write_recipe(recipe, tmp_path / "recipe.json")
    if mode == 2:       # sharers per piece: not the --topk 2 everywhere
        assert len({len(entries) for entries in recipe["pieces"].values()}) > 1
    rebuilt = materialize(tmp_path / "recipe.json", sharer_pool / "anchor", tmp_path / "rebuilt")
    a, b = load_file(str(direct / "adapter_model.safetensors")), load_file(str(rebuilt / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # stage 5's prediction model: peft's LoRA layers alone in the forward, holding the materialized adapter
    ids = torch.tensor([tokenized[0].input_ids])
    with composer_removed(model):
        assert not any(isinstance(m, ComposedLinear) for m in peft_model.modules())
        load_composed(peft_model, pool, weights)
        loaded = get_peft_model_state_dict(peft_model)
        assert loaded.keys() == b.keys() and all(torch.equal(loaded[k], b[k]) for k in b)
        with torch.no_grad():
            composed_logits = peft_model(input_ids=ids).logits
            with peft_model.disable_adapter():
                base_logits = peft_model(input_ids=ids).logits
    assert sum(isinstance(m, ComposedLinear) for m in model.modules()) == len(pool.pieces)   # back for assembly
    plain, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    reference = PeftModel.from_pretrained(plain, str(rebuilt))
    with torch.no_grad():
        peft_logits = reference(input_ids=ids).logits
    assert torch.equal(composed_logits, peft_logits)                  # the same numerics as a loaded adapter
    assert not torch.allclose(base_logits, peft_logits, atol=1e-4)    # the LoRA matters


def composed_forward(model, adapter: dict, scaling: float) -> list:
    """The composed LoRA as stage 5 predicted with it before peft did (docs/method.md section 7's base(x) + B(A(x)) * scaling in the
    activations' dtype), as forward hooks on a plain model; returns the handles."""
    modules = dict(model.named_modules())
    handles = []
    for key in adapter:
        if key.endswith(".lora_A.weight"):
            piece = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = adapter[key], adapter[key.replace("lora_A", "lora_B")]

            def hook(module, inputs, output, a=a, b=b):
                x = inputs[0]
                return output + ((x @ a.T.to(x.dtype)) @ b.T.to(x.dtype) * scaling).to(output.dtype)
            handles.append(modules[piece].register_forward_hook(hook))
    return handles


def test_peft_predictions_equal_the_composed_forward_in_fp32(tiny_model_dir, sharer_pool, tmp_path):
    """Stage 5 predicts through peft now: in fp32 the logits and the generated tokens are those of the composed
    forward it predicted with before (written out here), and a second user's assembly on the same model does not
    see the first user's LoRA."""
    from perpcs.engine.generation import generate
    model, tokenizer, device = load_base_model(str(tiny_model_dir), device="cpu")
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    settings = ComposeSettings(topk=2, batch_size=2)
    peft_model = composed_lora_model(model, pool)
    composer = Composer(pool, settings)
    install_composer(model, composer)
    first, second = random_examples(tokenizer, n=4, seed=3), random_examples(tokenizer, n=4, seed=4)
    with peft_model.disable_adapter():
        weights, _ = assemble_user(model, composer, first, tokenizer.pad_token_id, device, seed=1)
    prompts = [tokenizer.decode(t.input_ids) for t in first + second]
    ids = torch.tensor([first[0].input_ids])
    with composer_removed(model):
        load_composed(peft_model, pool, weights)
        with torch.no_grad():
            peft_logits = peft_model(input_ids=ids).logits
        peft_tokens = generate(peft_model, tokenizer, prompts, 6, device, temperature=0, batch_size=3)
    with peft_model.disable_adapter():   # the next user, on the model that just predicted
        after, _ = assemble_user(model, composer, second, tokenizer.pad_token_id, device, seed=2)

    reference, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    plain_tokens = generate(reference, tokenizer, prompts, 6, device, temperature=0, batch_size=3)
    handles = composed_forward(reference, pool.adapter_state_dict(weights), pool.scaling)
    with torch.no_grad():
        reference_logits = reference(input_ids=ids).logits
    reference_tokens = generate(reference, tokenizer, prompts, 6, device, temperature=0, batch_size=3)
    for h in handles:
        h.remove()
    torch.testing.assert_close(peft_logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert peft_tokens == reference_tokens != plain_tokens

    fresh, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    fresh_composer = Composer(pool, settings)
    install_composer(fresh, fresh_composer)
    alone, _ = assemble_user(fresh, fresh_composer, second, tokenizer.pad_token_id, device, seed=2)
    assert all(torch.equal(after[p], alone[p]) for p in pool.pieces)


def test_ties_go_to_the_lower_sharer_index(sharer_pool):
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    composer = Composer(pool, ComposeSettings(topk=2))
    composer.start_user(0)
    piece = pool.pieces[0]
    chosen = composer.choose(piece, torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1, 0.9]))
    assert chosen.tolist() == [1, 3]


def test_example_without_answer_is_dropped_and_all_dropped_is_an_error(tiny_model_dir, sharer_pool):
    model, tokenizer, device = load_base_model(str(tiny_model_dir), device="cpu")
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    composer = Composer(pool, ComposeSettings(topk=1, batch_size=4))
    install_composer(model, composer)
    good = random_examples(tokenizer, n=2)
    empty = Tokenized([5, 6, 7], [IGNORE_INDEX] * 3, "item 4 (id x)")
    with pytest.warns(UserWarning, match="item 4"):
        weights, batches = assemble_user(model, composer, good + [empty], tokenizer.pad_token_id, device, 0, "u")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert batches == [[0, 1]] or sorted(batches[0]) == [0, 1]
    with pytest.raises(PerpcsError, match="user 'u9'"), pytest.warns(UserWarning):
        assemble_user(model, composer, [empty], tokenizer.pad_token_id, device, 0, "user 'u9'")


def test_pool_errors_before_any_work(sharer_pool, tmp_path):
    import shutil
    with pytest.raises(PerpcsError, match="larger than the sharer pool"):
        ComposeSettings(topk=7).check(N_SHARERS)
    with pytest.raises(PerpcsError, match="share_ratio"):
        ComposeSettings(share_ratio=1.5).check(N_SHARERS)
    with pytest.raises(PerpcsError, match="with --share_ratio 0.3"):
        ComposeSettings(topk=2, share_ratio=0.3).check(N_SHARERS)
    # gates missing for one sharer
    shutil.copytree(sharer_pool, tmp_path / "p")
    (tmp_path / "p" / "gate" / "user_s2" / GATES_FILE).unlink()
    with pytest.raises(PerpcsError, match="gates not found for sharer 's2'"):
        PiecePool(SHARER_IDS, tmp_path / "p" / "anchor", tmp_path / "p" / "gate")
    # another rank
    cfg_path = tmp_path / "p" / "anchor" / "user_s4" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PerpcsError, match="sharer 's4'.*r = 16"):
        PiecePool(SHARER_IDS, tmp_path / "p" / "anchor")


@pytest.mark.parametrize("settings,flag", [
    (dict(epochs=0), "--epochs"), (dict(batch_size=0), "--batch_size"), (dict(recent_k=0), "--recent_k"),
    (dict(sample=True, sample_temperature=0.0), "--sample_temperature"),
    (dict(sample=True, sample_top_p=1.5), "--sample_top_p")])
def test_settings_that_assemble_nothing_or_crash_are_refused(settings, flag):
    """epochs 0 assembled an all-zero LoRA silently; the others crashed deep inside torch."""
    with pytest.raises(PerpcsError, match=flag):
        ComposeSettings(topk=1, **settings).check(N_SHARERS)


def test_sharers_with_per_module_ranks_are_refused(sharer_pool, tmp_path):
    import shutil
    shutil.copytree(sharer_pool, tmp_path / "p")
    cfg_path = tmp_path / "p" / "anchor" / "user_s1" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["alpha_pattern"] = {"q_proj": 32}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PerpcsError, match="sharer 's1'.*alpha_pattern"):
        PiecePool(SHARER_IDS, tmp_path / "p" / "anchor")


def test_scores_are_the_batch_mean_of_per_example_means(sharer_pool):
    """Two examples with 1 and 3 scored positions: each example counts once, whatever its positions."""
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    composer = Composer(pool, ComposeSettings(topk=1))
    piece = pool.pieces[0]
    d = pool.A[piece].shape[2]
    x = torch.randn(2, 4, d)
    mask = torch.tensor([[False, True, False, False], [True, True, True, False]])
    composer.set_batch(mask)
    ln = torch.nn.functional.layer_norm
    per_example = [ln(x[0, 1], (d,), eps=1e-5), ln(x[1, :3], (d,), eps=1e-5).mean(dim=0)]
    expected = (torch.stack(per_example).mean(dim=0) @ pool.G[piece].T) / d ** 0.5
    torch.testing.assert_close(composer.scores(piece, x), expected)


def test_answer_predicting_positions_by_hand():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    assert answer_predicting_mask(labels).tolist() == [[False, True, True, False], [True, False, False, False]]


def sorted_set(chosen):
    return sorted(chosen.tolist() if hasattr(chosen, "tolist") else chosen)


def test_nucleus_keeps_a_position_while_the_previous_cumulative_is_at_most_p(sharer_pool):
    """Probabilities 0.5 0.3 0.2 (sharers 2, 0, 1): with p 0.55 the second stays (the first's c 0.5 <= p) and the
    third goes (c 0.8 > p); Ts 2 flattens them to 0.41 0.32 0.26, so with p 0.45 two stay where Ts 1 keeps one."""
    pool = PiecePool(SHARER_IDS[:3], sharer_pool / "anchor", sharer_pool / "gate")
    piece = pool.pieces[0]
    scores = torch.log(torch.tensor([0.3, 0.2, 0.5]))

    def chosen(top_p, ts, t=1.0):
        composer = Composer(pool, ComposeSettings(topk=3, sample_top_p=top_p, sample_temperature=ts,
                                                  agg_temperature=t))
        composer.start_user(0)
        return sorted_set(composer.choose(piece, scores))

    assert chosen(0.55, 1.0) == [0, 2]
    assert chosen(0.45, 1.0) == [2]                      # k 3 ignored: one piece
    assert chosen(0.45, 2.0) == [0, 2]                   # the nucleus uses --sample_temperature ...
    assert chosen(0.45, 1.0, t=2.0) == [2]               # ... not --agg_temperature
    assert chosen(1.0, 1.0) == [0, 1, 2]


def test_nucleus_mode_matches_the_reference_on_random_scores(sharer_pool):
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    piece = pool.pieces[0]
    gen = torch.Generator().manual_seed(5)
    sizes = set()
    for trial in range(200):
        scores = torch.randn(N_SHARERS, generator=gen) * 2
        top_p, ts = [0.3, 0.5, 0.7, 0.9][trial % 4], [0.5, 1.0, 2.0][trial % 3]
        expected = reference_choice(list(range(N_SHARERS)), scores.tolist(), 2, 3, Ts=ts, top_p=top_p)
        c = torch.cumsum(torch.softmax(scores.sort(descending=True).values / ts, 0), 0)
        if (c - top_p).abs().min() < 1e-4:
            continue                                     # too close to call in fp32 vs float64
        composer = Composer(pool, ComposeSettings(topk=3, sample_top_p=top_p, sample_temperature=ts))
        composer.start_user(0)
        assert sorted_set(composer.choose(piece, scores)) == sorted(expected), (scores, top_p, ts)
        sizes.add(len(expected))
    assert len(sizes) >= 4                               # the nucleus sizes vary over the trials


def exact_set_probabilities(probs: dict, k: int) -> dict:
    """{frozenset: probability} of k items drawn without replacement, one at a time, with chances probs."""
    out = {}
    for seq in itertools.permutations([i for i, p in probs.items() if p > 0], k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= probs[i] / left
            left -= probs[i]
        out[frozenset(seq)] = out.get(frozenset(seq), 0.0) + prob
    return out


def mode_distribution(mode, scores, k, T, Ts, top_p=None, sample_topk=None) -> dict:
    """The exact distribution of the drawn set, from docs/method.md section 7 (mode 3: nucleus and the k best, at T; mode 4: the
    sample_topk best, at Ts)."""
    ranked = sorted(range(len(scores)), key=lambda s: (-scores[s], s))
    if mode == 4:
        cand = ranked[:sample_topk]
        return exact_set_probabilities(dict(zip(cand, softmax_list([scores[s] / Ts for s in cand]))), k)
    probs = softmax_list([scores[s] / Ts for s in ranked])
    kept = [s for i, s in enumerate(ranked) if i == 0 or sum(probs[:i]) <= top_p] + ranked[:k]
    kept = sorted(set(kept))
    return exact_set_probabilities(dict(zip(kept, softmax_list([scores[s] / T for s in kept]))), k)


@pytest.mark.parametrize("mode", [3, 4])
def test_drawn_pieces_follow_the_mode_distribution_and_the_user_seed(sharer_pool, mode):
    """2000 draws of k=2 from one user's generator: the drawn sets' frequencies match docs/method.md section 7's distribution of the
    mode; the swapped temperature or the other mode's candidates would be far off (checked here too)."""
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    piece = pool.pieces[0]
    scores = [0.3, 1.2, -0.4, 0.9, 0.1, 1.0]               # pool order is not the ranking
    T, Ts, top_p, sample_topk, k = 0.5, 2.0, 0.5, 4, 2
    settings = ComposeSettings(topk=k, agg_temperature=T, sample_temperature=Ts, sample=True, sample_topk=sample_topk,
                               sample_top_p=top_p if mode == 3 else None)
    assert settings.selection_mode == mode
    settings.check(N_SHARERS)
    expected = mode_distribution(mode, scores, k, T, Ts, top_p, sample_topk)
    wrong = [mode_distribution(mode, scores, k, Ts, T, top_p, sample_topk),   # temperatures swapped
             mode_distribution(7 - mode, scores, k, T, Ts, top_p, sample_topk)]   # the other sampling mode
    n = 2000
    composer = Composer(pool, settings)
    composer.start_user(11)
    draws = [frozenset(composer.choose(piece, torch.tensor(scores)).tolist()) for _ in range(n)]
    assert all(len(d) == k for d in draws)
    freq = {s: draws.count(s) / n for s in set(draws)}
    assert set(freq) <= set(expected)                       # never a set the mode cannot draw
    for candidate, tolerance in [(expected, 0.035)] + [(w, None) for w in wrong]:
        gap = max(abs(freq.get(s, 0.0) - candidate.get(s, 0.0)) for s in set(candidate) | set(freq))
        if tolerance:
            assert gap < tolerance, (freq, expected)
        else:
            assert gap > 0.1                                # the check above tells these apart
    composer.start_user(11)                                 # the same user seed: the same draws, in order
    assert [frozenset(composer.choose(piece, torch.tensor(scores)).tolist()) for _ in range(50)] == draws[:50]
    composer.start_user(12)
    assert [frozenset(composer.choose(piece, torch.tensor(scores)).tolist()) for _ in range(50)] != draws[:50]


def test_mode_3_is_mode_1_when_the_nucleus_holds_k_or_fewer(sharer_pool):
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    piece = pool.pieces[0]
    scores = torch.tensor([0.2, 3.0, 0.1, 2.5, 0.0, -0.3])   # softmax: 0.56 and 0.34 for sharers 1 and 3
    for seed in range(20):
        composer = Composer(pool, ComposeSettings(topk=2, sample=True, sample_top_p=0.3))   # nucleus: sharer 1
        composer.start_user(seed)
        assert sorted_set(composer.choose(piece, scores)) == [1, 3]
        composer = Composer(pool, ComposeSettings(topk=3, sample=True, sample_top_p=0.7))   # nucleus: 1 and 3
        composer.start_user(seed)
        assert sorted_set(composer.choose(piece, scores)) == [0, 1, 3]


@pytest.mark.parametrize("settings,message", [
    (dict(sample=True), "--sample_topk 10 is larger than the sharer pool (6 sharers)"),   # the default 10
    (dict(sample=True, sample_topk=4, share_ratio=0.5), "--sample_topk 4 is larger than the sharer pool "
                                                        "(6 sharers, 3 with --share_ratio 0.5)"),
    (dict(sample=True, sample_topk=2, topk=3), "--topk 3 is larger than --sample_topk 2"),
    (dict(sample_top_p=0.0), "--sample_top_p must be in (0, 1], got 0.0"),
    (dict(sample=True, sample_top_p=1.2), "--sample_top_p must be in (0, 1], got 1.2"),
    (dict(sample_top_p=0.5, sample_temperature=0), "--sample_temperature must be positive, got 0"),
    (dict(sample=True, sample_top_p=0.5, topk=7), "--topk 7 is larger than the sharer pool (6 sharers)")])
def test_settings_the_published_modes_crash_on_are_refused(settings, message):
    with pytest.raises(PerpcsError, match=re.escape(message)):
        ComposeSettings(**settings).check(N_SHARERS)


def test_settings_each_mode_does_not_use_are_not_refused():
    ComposeSettings(topk=8, sample_top_p=0.5).check(N_SHARERS)                 # mode 2 ignores --topk
    ComposeSettings(topk=3, sample=True, sample_top_p=0.5).check(N_SHARERS)    # mode 3 ignores --sample_topk 10
    ComposeSettings(topk=3, sample_temperature=0).check(N_SHARERS)            # mode 1 uses no --sample_temperature
    ComposeSettings(topk=3, sample=True, sample_topk=6).check(N_SHARERS)
    assert ComposeSettings().sample_top_p is None and ComposeSettings(sample=True).selection_mode == 4


def test_too_cold_a_draw_is_an_error_not_a_zero_probability_piece(sharer_pool):
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    composer = Composer(pool, ComposeSettings(topk=2, sample=True, sample_topk=3, sample_temperature=1e-3))
    composer.start_user(0)
    with pytest.raises(PerpcsError, match="2 pieces must be drawn without replacement, but only 1 have a non-zero"):
        composer.choose(pool.pieces[0], torch.tensor([1.0, 0.0, -1.0, 0.5, 0.2, 0.1]))


@pytest.mark.parametrize("flags,message", [
    ([], "--sample_topk 10 is larger than the sharer pool (3 sharers)"),
    (["--sample_topk", "2", "--topk", "3"], "--topk 3 is larger than --sample_topk 2")])
def test_stage_5_refuses_mode_4_settings_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, message):
    import lora_composition
    from perpcs.stages import lora_composition as compose_stage
    from perpcs.errors import run_cli
    from pipeline_fixture import TASK, sample_layout
    layout = sample_layout(TASK, tmp_path, 16, 8, 2, 3)
    candidates = json.loads(layout.candidate_users.read_text())
    index = tmp_path / "anchor_user_idx.json"
    index.write_text(json.dumps({"task": TASK, "strategy": "most_active", "k": 3, "seed": 0, "indices": [0, 1, 2],
                                 "user_ids": [c["user_id"] for c in candidates[:3]]}))

    def no_model(args):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(compose_stage, "load_merged_base", no_model)
    argv = ["--task_name", TASK, "--data_dir", str(tmp_path / "data"), "--llama_model_path", str(tmp_path / "none"),
            "--anchor_idx_path", str(index), "--anchor_path", str(tmp_path / "none"), "--gate_path",
            str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"), "--sample"] + flags
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: lora_composition.main(argv))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pieces_the_model_does_not_have_are_refused(tiny_model_dir):
    """Sharer LoRAs of another model: none or only some of their pieces exist here (an error naming them, not
    peft's traceback)."""
    from types import SimpleNamespace
    model, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    foreign = SimpleNamespace(config={"r": 8, "lora_alpha": 8}, pieces=["model.layers.9.self_attn.q_proj"])
    with pytest.raises(PerpcsError, match="this model does not have .*another base model"):
        composed_lora_model(model, foreign)
    some = ["model.layers.0.self_attn.q_proj", "model.layers.9.self_attn.q_proj"]
    pool = SimpleNamespace(config={"r": 8, "lora_alpha": 8}, pieces=some,
                           A={p: torch.zeros(1, 8, 64) for p in some}, B={p: torch.zeros(1, 64, 8) for p in some})
    composed_lora_model(model, pool)
    with pytest.raises(PerpcsError, match="'model.layers.9.self_attn.q_proj', which this model does not have"):
        install_composer(model, Composer(pool, ComposeSettings()))
