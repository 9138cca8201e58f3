"""Model-family facts live in one table (perpcs/models/families.py), and a model of another family is refused by
name before any work: a tiny random GPT-2 (transformers' Conv1D attention, fused c_attn) is run through stages
1, 3, 4, 5 and OPPU and each stops at once with the model type and the supported types named, writing nothing.
"""
from pathlib import Path

import pytest

import lora_composition
import OPPU
import task_LoRA
import train_anchor_gate
import train_anchor_PEFT
from perpcs.errors import PerpcsError
from perpcs.models.families import DEFAULT_FAMILY, FAMILIES, family_of, family_of_dir, layer_index
from pipeline_fixture import cli_error, one_thread, pipe  # noqa: F401  (fixtures)


def build_tiny_gpt2(out_dir: Path) -> Path:
    """A random 2-layer GPT-2 with the tiny tests' tokenizer, as an HF directory (no download)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny import train_tokenizer

    tokenizer = train_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def test_the_llama_facts_are_read_from_the_table():
    from perpcs.models.lora import lora_config
    from perpcs.stages.config import LoraSettings, OPPUStage, StageInputs

    assert LoraSettings().target_modules == DEFAULT_FAMILY.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert tuple(sorted(lora_config().target_modules)) == tuple(sorted(DEFAULT_FAMILY.target_modules))
    assert OPPUStage(inputs=StageInputs("movie_tagging")).lora.target_modules == DEFAULT_FAMILY.oppu_modules
    assert layer_index("model.layers.3.self_attn.q_proj") == 3
    assert layer_index("base_model.model.model.layers.12.self_attn.v_proj") == 12
    assert layer_index("lm_head") is None
    assert family_of("llama") is DEFAULT_FAMILY and DEFAULT_FAMILY in FAMILIES


def test_a_gpt2_directory_is_refused_by_its_config(gpt2_dir):
    with pytest.raises(PerpcsError) as err:
        family_of_dir(gpt2_dir)
    assert "'gpt2'" in str(err.value) and "llama" in str(err.value)


@pytest.mark.parametrize("main,args,out", [
    (task_LoRA.main, "task_lora_args", "task"),
    (train_anchor_PEFT.main, "sharer_args", "sharers"),
    (train_anchor_gate.main, "gate_args", "gates"),
    (lora_composition.main, "compose_args", "composition"),
    (OPPU.main, "oppu_args", "oppu"),
])
def test_every_lora_stage_refuses_a_gpt2_model_before_any_work(pipe, gpt2_dir, tmp_path, capsys, main, args, out):
    argv = getattr(pipe, args)(tmp_path / out) + ["--llama_model_path", str(gpt2_dir)]
    error = cli_error(main, argv, capsys)
    assert "model type 'gpt2'" in error and "llama (llama family)" in error, error
    assert not any((tmp_path / out).rglob("*.safetensors")) and not any((tmp_path / out).rglob("*.json"))
