"""Micro-batched assembly (method/composition.py): the published batches, each run as length-sorted micro-batches
in lockstep, give the published single pass's choices, weights and scores within 1e-6."""
import random

import pytest
import torch

from perpcs.engine.training import IGNORE_INDEX, Tokenized
from perpcs.errors import PerpcsError
from perpcs.method.composition import Composer, ComposeSettings, assemble_user, install_composer, micro_batches
from perpcs.method.pieces import PiecePool
from perpcs.models.loading import load_base_model
from test_composition import MODES, N_SHARERS, SHARER_IDS, max_rel_err, sharer_pool  # noqa: F401  (a fixture)


def uneven_examples(tokenizer, n=11, seed=3):
    """Rows of very different lengths (3 to 90 tokens), 1-4 answer tokens each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([3, 5, 9, 20, 41, 66, 90]) + rng.randint(0, 2)
        n_answer = min(rng.randint(1, 4), length - 1)
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(length)]
        out.append(Tokenized(ids, [IGNORE_INDEX] * (length - n_answer) + ids[-n_answer:], f"example {i}"))
    return out


def assemble(model_dir, pool_dir, settings, tokenized, overhead):
    model, tokenizer, device = load_base_model(str(model_dir), device="cpu")
    pool = PiecePool(SHARER_IDS, pool_dir / "anchor", pool_dir / "gate")
    composer = Composer(pool, settings)
    install_composer(model, composer)
    weights, batches = assemble_user(model, composer, tokenized, tokenizer.pad_token_id, device, seed=5,
                                     micro_batch_overhead=overhead)
    return weights, batches, composer.final_scores()


@pytest.mark.parametrize("mode", [1, 2, 3, 4])
def test_micro_batched_assembly_equals_the_published_batches(tiny_model_dir, sharer_pool, mode):
    settings = ComposeSettings(topk=2, share_ratio=1.0 if mode != 4 else 0.67, batch_size=5, epochs=2,
                               **{**MODES[mode], **({"sample_topk": 3} if mode == 4 else {})})
    settings.check(N_SHARERS)
    _, tokenizer, _ = load_base_model(str(tiny_model_dir), device="cpu")
    tokenized = uneven_examples(tokenizer)
    one, batches, scores = assemble(tiny_model_dir, sharer_pool, settings, tokenized, None)
    for overhead in (0, 12):   # one row per micro-batch; a few rows each
        runs = [micro_batches([len(tokenized[i].input_ids) for i in b], overhead) for b in batches]
        assert any(len(r) > 1 for r in runs) and any(len(r) < len(b) for r, b in zip(runs, batches) if len(b) > 1)
        split, split_batches, split_scores = assemble(tiny_model_dir, sharer_pool, settings, tokenized, overhead)
        assert split_batches == batches                       # which examples form a batch does not change
        for piece, w in one.items():
            assert torch.equal(split[piece] > 0, w > 0), piece  # the same pieces chosen (no tie flipped)
            assert max_rel_err(split[piece], w) < 1e-6, piece
            assert max_rel_err(split_scores[piece], scores[piece]) < 1e-6, piece


def test_micro_batches_cover_each_row_once_and_cut_the_padding():
    lengths = [90, 4, 40, 5, 88, 41, 3, 6]
    for overhead in (0, 10, 50, 10_000):
        runs = micro_batches(lengths, overhead)
        assert sorted(i for r in runs for i in r) == list(range(len(lengths)))
        for r in runs:                                        # longest first within a run, runs longest first
            assert [lengths[i] for i in r] == sorted((lengths[i] for i in r), reverse=True)
        padded = sum(lengths[r[0]] * len(r) for r in runs)
        assert padded + overhead * len(runs) <= max(lengths) * len(lengths) + overhead   # never worse than one pass
    assert micro_batches(lengths, 10_000) == [[0, 4, 5, 2, 7, 3, 1, 6]]   # costly micro-batches: one pass
    assert [sorted(lengths[i] for i in r) for r in micro_batches(lengths, 10)] == [[88, 90], [40, 41], [3, 4, 5, 6]]


def test_an_error_in_a_micro_batch_reaches_the_caller(tiny_model_dir, sharer_pool):
    """A draw refused inside the lockstep (too cold a temperature) fails as in the single pass, no thread hangs."""
    settings = ComposeSettings(topk=3, sample=True, sample_topk=6, sample_temperature=1e-4, batch_size=5)
    _, tokenizer, _ = load_base_model(str(tiny_model_dir), device="cpu")
    tokenized = uneven_examples(tokenizer)
    for overhead in (None, 0):
        with pytest.raises(PerpcsError, match="non-zero probability"):
            assemble(tiny_model_dir, sharer_pool, settings, tokenized, overhead)
