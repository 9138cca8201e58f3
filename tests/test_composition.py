"""Composition (SPEC 7) against a plain loop-by-loop reference written here from the spec."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from perpcs.composition import (Composer, ComposeSettings, PiecePool, answer_predicting_mask, assemble_user,
                                install_composer, make_recipe)
from perpcs.compose_stage import materialize
from perpcs.errors import PerpcsError
from perpcs.gates import GATES_FILE
from perpcs.modeling import load_base_model, lora_config
from perpcs.training import IGNORE_INDEX, Tokenized, collate

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


def reference_assembly(model, pool_dir, batches, tokenized, pad_id, topk, share_ratio, seed, temperature=1.0):
    """SPEC 7 written out with Python loops and forward hooks on a plain model."""
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
            ranked = sorted(pools[piece], key=lambda s: (-scores[s], s))[:topk]
            exps = [math.exp(scores[s] / temperature) for s in ranked]
            w = [e / sum(exps) for e in exps]
            key = f"base_model.model.{piece}"
            a = sum(wi * adapters[SHARER_IDS[s]][f"{key}.lora_A.weight"] for wi, s in zip(w, ranked))
            bm = sum(wi * adapters[SHARER_IDS[s]][f"{key}.lora_B.weight"] for wi, s in zip(w, ranked))
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


@pytest.mark.parametrize("topk,share_ratio,temperature", [(1, 1.0, 1.0), (3, 1.0, 1.0), (1, 0.5, 1.0),
                                                           (3, 0.5, 1.0), (3, 1.0, 0.3)])
def test_assembly_matches_the_loop_reference(tiny_model_dir, sharer_pool, topk, share_ratio, temperature):
    model, tokenizer, device = load_base_model(str(tiny_model_dir), device="cpu")
    settings = ComposeSettings(topk=topk, share_ratio=share_ratio, batch_size=3, seed=0,
                               agg_temperature=temperature)
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    composer = Composer(pool, settings)
    install_composer(model, composer)
    tokenized = random_examples(tokenizer)
    weights, batches = assemble_user(model, composer, tokenized, tokenizer.pad_token_id, device, seed=7)
    assert [len(b) for b in batches] == [3, 2]               # two batches, the short last one included
    assembled = pool.build(weights)

    reference_model, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    expected = reference_assembly(reference_model, sharer_pool, batches, tokenized, tokenizer.pad_token_id,
                                  topk, share_ratio, seed=7, temperature=temperature)
    assert set(expected) == set(assembled)
    for piece, (a_ref, b_ref) in expected.items():
        a, b = assembled[piece]
        assert max_rel_err(a, a_ref) < 1e-6, piece
        assert max_rel_err(b, b_ref) < 1e-6, piece
    for piece, w in weights.items():    # a convex mixture: at most 2 batches x topk sharers
        assert abs(float(w.sum()) - 1) < 1e-6 and int((w > 0).sum()) <= 2 * topk


def test_recipe_materializes_to_the_assembled_adapter(tiny_model_dir, sharer_pool, tmp_path):
    from peft import PeftModel
    model, tokenizer, device = load_base_model(str(tiny_model_dir), device="cpu")
    settings = ComposeSettings(topk=2, batch_size=2)
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    composer = Composer(pool, settings)
    install_composer(model, composer)
    tokenized = random_examples(tokenizer, n=4, seed=3)
    weights, batches = assemble_user(model, composer, tokenized, tokenizer.pad_token_id, device, seed=1)
    direct = pool.save_adapter(weights, tmp_path / "direct")
    from perpcs.composition import write_recipe
    recipe = make_recipe(pool, weights, settings, "u1", "movie_tagging", batches)
    write_recipe(recipe, tmp_path / "recipe.json")
    rebuilt = materialize(tmp_path / "recipe.json", sharer_pool / "anchor", tmp_path / "rebuilt")
    a, b = load_file(str(direct / "adapter_model.safetensors")), load_file(str(rebuilt / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the composer's fixed mode and the saved peft adapter give the same logits
    ids = torch.tensor([tokenized[0].input_ids])
    composer.use_fixed(weights)
    with torch.no_grad():
        composed_logits = model(input_ids=ids).logits
    plain, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    peft_model = PeftModel.from_pretrained(plain, str(rebuilt))
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    torch.testing.assert_close(composed_logits, peft_logits, rtol=1e-5, atol=1e-5)
    composer.mode = "off"
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, peft_logits, atol=1e-4)   # the LoRA matters


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


def test_sampled_pieces_stay_in_the_nucleus_follow_the_seed_and_differ_from_top_k(sharer_pool):
    """--sample: k pieces drawn from softmax(score / T) over the sample_topk best, cut to the nucleus."""
    pool = PiecePool(SHARER_IDS, sharer_pool / "anchor", sharer_pool / "gate")
    piece = pool.pieces[0]
    scores = torch.tensor([5.0, 4.9, 4.8, 4.7, -9.0, -9.5])    # the last two: far outside any nucleus
    settings = ComposeSettings(topk=2, sample=True, sample_topk=5, sample_temperature=1.0, sample_top_p=0.99)
    draws = set()
    for seed in range(20):
        composer = Composer(pool, settings)
        composer.start_user(seed)
        first = composer.choose(piece, scores).tolist()
        composer.start_user(seed)
        assert composer.choose(piece, scores).tolist() == first        # the same seed, the same pieces
        assert len(set(first)) == 2 and set(first) <= {0, 1, 2, 3}     # within the nucleus, no repeats
        draws.add(tuple(sorted(first)))
    assert len(draws) > 1 and draws != {(0, 1)}                        # not the plain top-2
    greedy = Composer(pool, ComposeSettings(topk=2))
    greedy.start_user(0)
    assert greedy.choose(piece, scores).tolist() == [0, 1]
