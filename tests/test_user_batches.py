"""Many users per prediction batch (--users_per_batch, issue 24): each row on its own user's LoRA through peft's
mixed-adapter batches; greedy predictions equal the one-user-at-a-time loop's, for stage 5, a control and OPPU."""
from __future__ import annotations

import json

import pytest
import torch

import lora_composition
import OPPU
from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import cli_error, file_digests, log_users
from pipeline_fixture import run_stage as run

GEN = ["--max_gen_len", "8"]   # long enough for the users' LoRAs to lead to different tokens


def predictions(out_dir) -> dict:
    """{user file: its predictions} (settings and made_from are compared by the digests elsewhere)."""
    return {p.name: json.loads(p.read_text()) for p in sorted((out_dir / "user_predictions").glob("*.json"))}


def check_same(pipe, one, many) -> None:
    """Batched predictions are the per-user loop's, byte for byte, and the log has each user once; the outputs
    differ between users (so that a row on the wrong user's adapter would show)."""
    assert file_digests(many / "user_predictions") == file_digests(one / "user_predictions")
    assert file_digests(many / "predictions") == file_digests(one / "predictions")
    assert sorted(log_users(many / "users_log.jsonl")) == sorted(pipe.test_ids())
    rows = [json.loads(line) for line in (many / "users_log.jsonl").read_text().splitlines()]
    assert {r["users_predicted_together"] for r in rows} == {len(pipe.test_ids())}
    outputs = [tuple(o for _, o in sum(p["predictions"].values(), [])) for p in predictions(many).values()]
    assert len(set(outputs)) > 1


def test_stage5_batched_users_predict_as_one_at_a_time(pipe, tmp_path, capsys):
    one, many = tmp_path / "one", tmp_path / "many"
    run(lora_composition.main, pipe.compose_args(one) + GEN + ["--users_per_batch", "1"], capsys)
    run(lora_composition.main, pipe.compose_args(many) + GEN + ["--users_per_batch", "3"], capsys)
    assert file_digests(many / "recipes") == file_digests(one / "recipes")
    check_same(pipe, one, many)
    assert {json.loads(line)["users_predicted_together"]
            for line in (one / "users_log.jsonl").read_text().splitlines()} == {1}


def test_swapped_control_batched_users_predict_as_one_at_a_time(pipe, tmp_path, capsys):
    one, many = tmp_path / "one", tmp_path / "many"
    for out, n in ((one, "1"), (many, "3")):
        run(lora_composition.main, pipe.compose_args(out) + GEN + ["--control", "swapped", "--users_per_batch", n],
            capsys)
    assert file_digests(many / "recipes") == file_digests(one / "recipes")
    check_same(pipe, one, many)


def test_oppu_batched_users_predict_as_one_at_a_time(pipe, tmp_path, capsys):
    one, many = tmp_path / "one", tmp_path / "many"
    for out, n in ((one, "1"), (many, "3")):
        run(OPPU.main, pipe.oppu_args(out) + GEN + ["--lr", "5e-2", "--users_per_batch", n], capsys)
    assert file_digests(many / "adapters") == file_digests(one / "adapters")
    check_same(pipe, one, many)


def test_a_resume_with_another_users_per_batch_keeps_the_finished_users(pipe, tmp_path, capsys):
    """users_per_batch changes no output, so it is in no record: a run resumed with another value counts the
    finished users as its own, and a group smaller than the setting (the users left) predicts the same."""
    out = tmp_path / "composition"
    full = tmp_path / "full"
    run(lora_composition.main, pipe.compose_args(full) + GEN + ["--users_per_batch", "3"], capsys)
    first = pipe.test_ids()[0]
    run(lora_composition.main, pipe.compose_args(out) + GEN + ["--users_per_batch", "1", "--num_shards", "3",
                                                               "--shard_id", "0"], capsys)
    assert log_users(out / "users_log.jsonl") == [first]
    text = run(lora_composition.main, pipe.compose_args(out) + GEN + ["--users_per_batch", "2"], capsys)
    assert "1 already done, 2 to do" in text
    assert file_digests(out / "user_predictions") == file_digests(full / "user_predictions")
    assert file_digests(out / "recipes") == file_digests(full / "recipes")


def test_auto_batches_users_only_in_fp32():
    """In bf16 (CUDA's weights, --cpu_bf16) the batch a prompt is in changes low bits, which flipped one greedy
    answer of the demo: auto keeps one user at a time there, and in fp32 batches (outputs identical, tested below);
    a number still batches."""
    from perpcs.engine.generation import resolve_users_per_batch
    from perpcs.stages.target_users import users_per_batch
    assert resolve_users_per_batch("auto", "cpu", 0.0, bf16=True) == 1
    assert resolve_users_per_batch("auto", torch.device("cuda"), 0.0, bf16=True) == 1
    assert resolve_users_per_batch(4, "cpu", 0.0, bf16=True) == 4
    assert users_per_batch("auto", "cpu", 0.0, cpu_bf16=True) == 1
    assert users_per_batch("auto", "cpu", 0.0, cpu_bf16=False) == 8


def test_sampling_predicts_one_user_at_a_time(pipe, tmp_path, capsys):
    """A sampled draw depends on every row of its batch: auto is 1 user when sampling, more is refused."""
    from perpcs.engine.generation import resolve_users_per_batch
    assert resolve_users_per_batch("auto", "cpu", 0.1) == 1
    assert resolve_users_per_batch("auto", "cpu", 0.0) == 8
    assert resolve_users_per_batch(5, "cpu", 0.0) == 5
    err = cli_error(lora_composition.main, pipe.compose_args(tmp_path / "c") + ["--temperature", "0.5",
                                                                                 "--users_per_batch", "4"], capsys)
    assert "--users_per_batch 4 with --temperature 0.5" in err
    with pytest.raises(SystemExit) as exc:   # argparse: auto or a whole number >= 1
        OPPU.main(pipe.oppu_args(tmp_path / "o") + ["--users_per_batch", "0"])
    assert exc.value.code == 2 and "--users_per_batch: expected auto or a whole number" in capsys.readouterr().err
    from perpcs.errors import PerpcsError
    from perpcs.stages.config import check_users_per_batch
    for bad in (0, -1, 2.5, "8"):   # the library's configs check what Python passes them
        with pytest.raises(PerpcsError, match="--users_per_batch"):
            check_users_per_batch(bad, 0.0)


# ------------------------------------------------------------------------------------------- the generation layer

@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir):
    """The tiny model with two strong random LoRAs, "first" and "second" (lora_alpha 8 and 16), and its
    tokenizer."""
    from peft import get_peft_model

    from perpcs.models.loading import load_base_model
    from perpcs.models.lora import lora_config
    model, tokenizer, _ = load_base_model(str(tiny_model_dir), device="cpu")
    peft_model = get_peft_model(model, lora_config(4, 8, 0.0, ("q_proj", "v_proj")), adapter_name="first")
    peft_model.add_adapter("second", lora_config(4, 16, 0.0, ("q_proj", "v_proj")))   # another scaling too
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return peft_model, tokenizer


PROMPTS = ["The quick brown fox", "A robot learns to love in a world", "Stocks rose", "The film is a dark comedy",
           "Parents and teachers talk about education and the future"]


def test_mixed_adapter_batches_run_each_row_on_its_own_adapter(two_adapters):
    from perpcs.engine.generation import generate
    model, tokenizer = two_adapters
    alone = {}
    for name in ("first", "second"):
        model.set_adapter(name)
        alone[name] = generate(model, tokenizer, PROMPTS, 6, torch.device("cpu"), temperature=0, batch_size=2)
    assert alone["first"] != alone["second"]   # other tokens per adapter: a row on the wrong one would show
    names = ["first", "second", "second", "first", "second"]
    other = {"first": "second", "second": "first"}
    mixed = generate(model, tokenizer, PROMPTS * 2, 6, torch.device("cpu"), temperature=0, batch_size=10,
                     adapter_names=names + [other[n] for n in names])
    assert mixed == [alone[n][i] for i, n in enumerate(names)] + [alone[other[n]][i] for i, n in enumerate(names)]


def test_a_batch_out_of_memory_is_split_when_greedy(two_adapters, monkeypatch):
    """A batch that runs out of (GPU) memory is generated in halves: the same greedy outputs; sampling re-raises."""
    from perpcs.engine.generation import generate
    model, tokenizer = two_adapters
    model.set_adapter("first")
    expected = generate(model, tokenizer, PROMPTS, 6, torch.device("cpu"), temperature=0, batch_size=5)
    real, sizes = model.generate, []

    def small_memory(*args, **kwargs):
        sizes.append(len(kwargs["input_ids"]))
        if len(kwargs["input_ids"]) > 2:
            raise torch.OutOfMemoryError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", small_memory)
    assert generate(model, tokenizer, PROMPTS, 6, torch.device("cpu"), temperature=0, batch_size=5) == expected
    assert sizes == [5, 2, 3, 1, 2]
    with pytest.raises(torch.OutOfMemoryError):
        generate(model, tokenizer, PROMPTS, 6, torch.device("cpu"), temperature=0.5, batch_size=5)
