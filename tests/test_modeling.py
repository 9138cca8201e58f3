"""Model loading: Meta checkpoint conversion, the tiny and bundled models, devices, LoRA adapter files."""
from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from perpcs.models import folders, loading, lora, meta
from perpcs.errors import PerpcsError
from perpcs.models.lora import (adapter_tensor_names, lora_config, merge_lora_into_base, resolve_lora_ckpt,
                                verify_adapter)
from perpcs.models.devices import autocast_context, resolve_device
from perpcs.models.meta import llama_intermediate_size, rotary_to_half_split
from perpcs.models.loading import load_base_model, load_tokenizer, resolve_model_dir
from tiny import CORPUS, build_tiny_llama

TOKEN_IDS = torch.tensor([[1, 5, 17, 42, 99, 230, 7, 300, 12, 64]])
# Split of each Meta tensor between model-parallel shards (None: replicated), as in Meta's Llama code.
META_SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1,
                  "w1": 0, "w3": 0, "w2": 1}


# ---------------------------------------------------------------- helpers: a Meta-format checkpoint

def train_sentencepiece(path: Path, vocab_size: int = 400, **options) -> Path:
    """A tiny sentencepiece BPE model with Llama 2's settings (byte fallback, no normalization)."""
    import sentencepiece

    settings = dict(model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                    character_coverage=1.0, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    settings.update(options)
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 3), model_writer=buffer,
                                             vocab_size=vocab_size, **settings)
    path.write_bytes(buffer.getvalue())
    return path


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of HF's rotary layout: per head, rows (i, i + d/2) become the pair (2i, 2i+1)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def hf_to_meta_state(model) -> dict:
    config, hf = model.config, model.state_dict()
    meta = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
            "output.weight": hf["lm_head.weight"], "rope.freqs": torch.ones(8)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": half_split_to_interleaved(
                hf[p + "self_attn.q_proj.weight"], config.num_attention_heads),
            f"layers.{i}.attention.wk.weight": half_split_to_interleaved(
                hf[p + "self_attn.k_proj.weight"], config.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        })
    return meta


def shard_meta_state(meta: dict, n_shards: int) -> list:
    shards = [{} for _ in range(n_shards)]
    for name, tensor in meta.items():
        kind = name.rsplit(".", 2)[-2]
        dim = META_SHARD_DIM.get(kind)
        parts = [tensor] * n_shards if dim is None else tensor.chunk(n_shards, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def write_meta_download(hf_dir: Path, sp_model: Path, out_dir: Path, n_shards: int = 1,
                        tokenizer_in_parent: bool = False) -> tuple:
    """Lay the tiny HF model out as Meta's download does; returns (model dir, Meta state, params)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = model.config
    out_dir.mkdir(parents=True)
    meta = hf_to_meta_state(model)
    # multiple_of 64 and multiplier 0.75 give the tiny model's 128 (checked by the converter).
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers,
              "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
              "multiple_of": 64, "ffn_dim_multiplier": 0.75, "norm_eps": config.rms_norm_eps,
              "vocab_size": -1, "rope_theta": config.rope_parameters["rope_theta"]}
    (out_dir / "params.json").write_text(json.dumps(params))
    for index, shard in enumerate(shard_meta_state(meta, n_shards)):
        torch.save(shard, out_dir / f"consolidated.{index:02d}.pth")
    tokenizer_dir = out_dir.parent if tokenizer_in_parent else out_dir
    (tokenizer_dir / "tokenizer.model").write_bytes(sp_model.read_bytes())
    return out_dir, meta, params


def meta_reference_logits(meta: dict, params: dict, ids: list) -> torch.Tensor:
    """Llama as Meta's code computes it (complex rotary on interleaved pairs), in float64."""
    dim, n_heads, n_kv = params["dim"], params["n_heads"], params["n_kv_heads"]
    head_dim, steps, eps = dim // n_heads, len(ids), params["norm_eps"]

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    freqs = 1.0 / params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rotation = torch.polar(torch.ones(steps, head_dim // 2, dtype=torch.float64),
                           torch.outer(torch.arange(steps, dtype=torch.float64), freqs))

    def rotary(x):
        pairs = torch.view_as_complex(x.reshape(steps, x.shape[1], head_dim // 2, 2).contiguous())
        return torch.view_as_real(pairs * rotation[:, None, :]).reshape(x.shape)

    w = {name: t.double() for name, t in meta.items()}
    mask = torch.full((steps, steps), float("-inf"), dtype=torch.float64).triu(1)
    h = w["tok_embeddings.weight"][ids]
    for i in range(params["n_layers"]):
        layer = {name.split(".", 2)[2]: t for name, t in w.items() if name.startswith(f"layers.{i}.")}
        x = rms_norm(h, layer["attention_norm.weight"])
        q = rotary((x @ layer["attention.wq.weight"].T).view(steps, n_heads, head_dim))
        k = rotary((x @ layer["attention.wk.weight"].T).view(steps, n_kv, head_dim))
        v = (x @ layer["attention.wv.weight"].T).view(steps, n_kv, head_dim)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=1) for t in (k, v))
        scores = torch.einsum("thd,shd->hts", q, k) / head_dim ** 0.5 + mask
        attended = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(steps, dim)
        h = h + attended @ layer["attention.wo.weight"].T
        x = rms_norm(h, layer["ffn_norm.weight"])
        gate, up = x @ layer["feed_forward.w1.weight"].T, x @ layer["feed_forward.w3.weight"].T
        h = h + (F.silu(gate) * up) @ layer["feed_forward.w2.weight"].T
    return rms_norm(h, w["norm.weight"]) @ w["output.weight"].T


def logits_of(model_dir, ids=TOKEN_IDS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="module")
def tiny_sp_dir(tmp_path_factory, sp_model) -> Path:
    """The tiny Llama with an embedding table the size of the sentencepiece vocabulary."""
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_sp"), vocab_size=vocab)


# ---------------------------------------------------------------- Meta conversion

@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_converts_to_the_same_model(tmp_path, tiny_sp_dir, sp_model, n_shards):
    meta_dir, meta, params = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "llama_download" / "Llama-t",
                                                 n_shards=n_shards, tokenizer_in_parent=n_shards == 2)
    hf_dir = resolve_model_dir(str(meta_dir))
    assert hf_dir == meta_dir / "hf_converted"
    converted = logits_of(hf_dir)
    assert torch.allclose(converted, logits_of(tiny_sp_dir), atol=1e-5)
    # Bit for bit: joining shards, renaming and permuting only move values.
    original, written = load_file(tiny_sp_dir / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[name], tensor) for name, tensor in original.items())
    # Against Meta's own formulation, so a wrong rotary permutation cannot cancel out with the writer's.
    reference = meta_reference_logits(meta, params, TOKEN_IDS[0].tolist())
    assert torch.allclose(converted.double(), reference, atol=1e-5)
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["intermediate_size"], config["num_key_value_heads"], config["max_position_embeddings"]) \
        == (128, 2, 4096)


def test_meta_tokenizer_matches_sentencepiece(tmp_path, tiny_sp_dir, sp_model):
    import sentencepiece

    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    tokenizer = load_tokenizer(resolve_model_dir(str(meta_dir)))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    for text in ["The lazy dog reviews a movie.", " leading space", "tabs\tand\nlines 42", "Zürich ☕ 東京"]:
        ids = tokenizer(text).input_ids
        assert ids == [1] + processor.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == processor.decode(processor.encode(text))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "</s>")


def test_meta_conversion_is_reused(tmp_path, tiny_sp_dir, sp_model, monkeypatch):
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    first = resolve_model_dir(str(meta_dir))
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(meta, "convert_meta_checkpoint", no_second_conversion)
    assert resolve_model_dir(str(meta_dir)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in meta_dir.iterdir() if p.name.startswith(".hf_converted")]  # no temp left


def test_a_killed_conversion_leaves_no_temp_dir_behind_the_next_one(tmp_path, tiny_sp_dir, sp_model):
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    stale = meta_dir / ".hf_converted.tmp-killed"          # what a conversion killed by the OOM killer leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    resolve_model_dir(str(meta_dir))
    assert not stale.exists() and (meta_dir / "hf_converted" / "config.json").is_file()


def test_changed_meta_checkpoint_is_not_silently_reused(tmp_path, tiny_sp_dir, sp_model):
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    resolve_model_dir(str(meta_dir))
    (meta_dir / "params.json").write_text((meta_dir / "params.json").read_text() + "\n")
    with pytest.raises(PerpcsError, match="delete .*hf_converted"):
        resolve_model_dir(str(meta_dir))


def test_moved_meta_download_keeps_its_conversion_and_a_same_size_swap_is_caught(tmp_path, tiny_sp_dir, sp_model,
                                                                                  monkeypatch):
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    resolve_model_dir(str(meta_dir))
    (tmp_path / "models").mkdir()
    moved = meta_dir.rename(tmp_path / "models" / "Llama-t")      # with its hf_converted inside

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(meta, "convert_meta_checkpoint", no_second_conversion)
    assert resolve_model_dir(str(moved)) == moved / "hf_converted"
    shard = moved / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF                                       # another checkpoint of the very same size
    shard.write_bytes(bytes(data))
    with pytest.raises(PerpcsError, match="converted from other files"):
        resolve_model_dir(str(moved))


def test_read_only_meta_download_converts_into_cache(tmp_path, tiny_sp_dir, sp_model, monkeypatch):
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    monkeypatch.setenv("PERPCS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(meta.os, "access", lambda path, mode: False)
    hf_dir = resolve_model_dir(str(meta_dir))
    assert hf_dir.parent == tmp_path / "cache" / "meta-converted"
    assert not (meta_dir / "hf_converted").exists()
    assert torch.allclose(logits_of(hf_dir), logits_of(tiny_sp_dir), atol=1e-5)


def test_read_only_meta_download_uses_its_existing_conversion(tmp_path, tiny_sp_dir, sp_model, monkeypatch):
    """A download converted once (by an admin) and then made read-only is used as is, not copied to the cache."""
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    converted = resolve_model_dir(str(meta_dir))
    assert converted == meta_dir / "hf_converted"
    monkeypatch.setenv("PERPCS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(meta.os, "access", lambda path, mode: False)
    real_convert = meta.convert_meta_checkpoint

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(meta, "convert_meta_checkpoint", no_conversion)
    assert resolve_model_dir(str(meta_dir)) == converted
    assert not (tmp_path / "cache" / "meta-converted").exists()
    # A stale conversion there cannot be deleted by this user: convert into the cache instead.
    (meta_dir / "params.json").write_text((meta_dir / "params.json").read_text() + "\n")
    monkeypatch.setattr(meta, "convert_meta_checkpoint", real_convert)
    assert resolve_model_dir(str(meta_dir)).parent == tmp_path / "cache" / "meta-converted"


@pytest.mark.parametrize("leftover", ["bin_only", "half_copied", "a_file"])
def test_leftover_meta_target_fails_before_converting(tmp_path, tiny_sp_dir, sp_model, monkeypatch, leftover):
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    target = meta_dir / "hf_converted"
    if leftover == "a_file":
        target.write_text("x")
    else:
        target.mkdir()
        (target / ("pytorch_model.bin" if leftover == "bin_only" else "config.json")).write_bytes(b"x")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted into a leftover directory")

    monkeypatch.setattr(meta, "convert_meta_checkpoint", no_conversion)
    with pytest.raises(PerpcsError, match=re.escape(f"{target} exists but is not a finished conversion")) as err:
        resolve_model_dir(str(meta_dir))
    assert f"delete {target}" in str(err.value)


def test_empty_meta_target_is_converted_into(tmp_path, tiny_sp_dir, sp_model):
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    (meta_dir / "hf_converted").mkdir()
    assert folders._has_hf_files(resolve_model_dir(str(meta_dir)))


def test_concurrent_meta_conversions_convert_once(tmp_path, tiny_sp_dir, sp_model, monkeypatch):
    """torchrun ranks all load the base model: one converts, the others wait for it and reuse its result."""
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    real_convert, calls = meta.convert_meta_checkpoint, []

    def slow_convert(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # leaves the other thread time to find no conversion and start its own
        real_convert(*args, **kwargs)

    monkeypatch.setattr(meta, "convert_meta_checkpoint", slow_convert)
    start = threading.Barrier(2)

    def rank(_):
        start.wait()
        return resolve_model_dir(str(meta_dir))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(rank, range(2)))
    assert results == [meta_dir / "hf_converted"] * 2
    assert len(calls) == 1
    assert not [p for p in meta_dir.iterdir() if p.name.startswith(".hf_converted")]  # no temp left


def test_conversion_lock_is_held_across_processes_on_the_lock_file(tmp_path):
    """A rank in another process holding ``<target>.lock`` (with a plain flock, as the hand-written lock took it)
    keeps this one waiting; while this one holds it, nobody else gets it; the file stays after release."""
    import subprocess
    import sys

    target, lock_file = tmp_path / "hf_converted", tmp_path / "hf_converted.lock"
    flock = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX"
    holder = subprocess.Popen([sys.executable, "-c", flock + "); open(sys.argv[2], 'w').close()\n"
                               "while not os.path.exists(sys.argv[3]): import time; time.sleep(0.01)",
                               str(lock_file), str(tmp_path / "locked"), str(tmp_path / "release")])
    acquired = threading.Event()

    def rank():
        with folders._conversion_lock(target):
            acquired.set()

    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "locked").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        waiter = threading.Thread(target=rank)
        waiter.start()
        assert not acquired.wait(0.5)                       # the other process holds it
        (tmp_path / "release").touch()
        waiter.join(60)
        assert acquired.is_set()
    finally:
        (tmp_path / "release").touch()
        holder.wait(60)

    def try_lock():
        return subprocess.run([sys.executable, "-c", flock + " | fcntl.LOCK_NB)", str(lock_file)],
                              capture_output=True, text=True)

    with folders._conversion_lock(target):
        busy = try_lock()
    assert busy.returncode != 0 and "BlockingIOError" in busy.stderr
    assert try_lock().returncode == 0                       # released
    assert lock_file.is_file()


def test_a_conversion_lock_that_cannot_be_created_names_the_file(tmp_path):
    (tmp_path / "a_file").write_text("x")   # its "directory" is a file (a read-only one would not stop root)
    target = tmp_path / "a_file" / "hf_converted"
    with pytest.raises(PerpcsError, match=re.escape(f"{target}.lock: cannot create the conversion lock")):
        with folders._conversion_lock(target):
            pass


def fake_smollm2(tmp_path, monkeypatch, calls: list) -> Path:
    """Point SmolLM2 at a tmp cache, with a fast stand-in for the GGUF conversion."""
    monkeypatch.setenv("PERPCS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_smollm2_package_dir", lambda: tmp_path)

    def fake_gguf_to_hf(gguf_dir, gguf_file, out_dir):
        calls.append(out_dir)
        time.sleep(0.5)
        (out_dir / "config.json").write_text('{"model_type": "llama"}')
        (out_dir / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(loading, "_gguf_to_hf", fake_gguf_to_hf)
    return tmp_path / "cache" / "smollm2-135m-instruct"


def test_concurrent_smollm2_conversions_convert_once(tmp_path, monkeypatch):
    calls = []
    target = fake_smollm2(tmp_path, monkeypatch, calls)
    start = threading.Barrier(2)

    def rank(_):
        start.wait()
        return loading.smollm2_dir()

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(rank, range(2))) == [target] * 2
    assert len(calls) == 1


def test_leftover_smollm2_cache_fails_before_converting(tmp_path, monkeypatch):
    calls = []
    target = fake_smollm2(tmp_path, monkeypatch, calls)
    target.mkdir(parents=True)
    (target / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(PerpcsError, match=re.escape(f"{target} exists but is not a finished conversion")) as err:
        loading.smollm2_dir()
    assert f"delete {target}" in str(err.value)
    assert not calls


def test_tokenizer_path_may_be_a_sentencepiece_file(tiny_sp_dir, sp_model):
    """--tokenizer_path .../tokenizer.model (Meta's layout) works like the converted tokenizer."""
    import sentencepiece
    _, tokenizer, _ = load_base_model(str(tiny_sp_dir), tokenizer_path=str(sp_model), device="cpu")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    text = "The quick brown fox, twice."
    assert tokenizer(text).input_ids == [processor.bos_id()] + processor.encode(text)
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"


def test_meta_download_without_tokenizer_fails(tmp_path, tiny_sp_dir, sp_model):
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    (meta_dir / "tokenizer.model").unlink()
    with pytest.raises(PerpcsError, match="lacks tokenizer.model"):
        resolve_model_dir(str(meta_dir))


def test_params_that_do_not_fit_the_weights_fail(tmp_path, tiny_sp_dir, sp_model):
    meta_dir, _, params = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    (meta_dir / "params.json").write_text(json.dumps({**params, "ffn_dim_multiplier": None}))
    with pytest.raises(PerpcsError, match="gate_proj.weight has shape"):
        resolve_model_dir(str(meta_dir))
    assert not (meta_dir / "hf_converted").exists()


def test_sentencepiece_model_with_normalization_converts_faithfully(tmp_path, tiny_sp_dir):
    """transformers' converter follows the model's normalizer (NFKC, extra spaces); the hand-written one refused it."""
    import sentencepiece

    sp_model = train_sentencepiece(tmp_path / "nfkc.model", normalization_rule_name="nmt_nfkc",
                                   remove_extra_whitespaces=True)
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    tokenizer = load_tokenizer(resolve_model_dir(str(meta_dir)))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    for text in ["ﬁne ＡＢＣ ① ㎏", "  extra   spaces  ", "The lazy dog.\n\tTabs", "Zürich ☕ 東京"]:
        assert tokenizer(text).input_ids == [1] + processor.encode(text)


def test_unigram_sentencepiece_model_is_refused(tmp_path, tiny_sp_dir):
    sp_model = train_sentencepiece(tmp_path / "unigram.model", model_type="unigram")
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    with pytest.raises(PerpcsError, match="a sentencepiece UNIGRAM model; only BPE models"):
        resolve_model_dir(str(meta_dir))
    assert not (meta_dir / "hf_converted").exists()


def test_a_conversion_that_differs_from_sentencepiece_is_refused(tmp_path, tiny_sp_dir, sp_model, monkeypatch):
    """The id check stays: e.g. a converter that loses the dummy prefix before a leading space, as LlamaTokenizer."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import SpmConverter

    real_build = SpmConverter.build_tokenizer_from_spm_proto

    def without_dummy_prefix_fix(proto, vocab, *args, **kwargs):
        backend = real_build(proto, vocab, *args, **kwargs)
        backend.normalizer = normalizers.Replace(" ", "▁")
        return backend

    monkeypatch.setattr(SpmConverter, "build_tokenizer_from_spm_proto", staticmethod(without_dummy_prefix_fix))
    meta_dir, _, _ = write_meta_download(tiny_sp_dir, sp_model, tmp_path / "Llama-t")
    with pytest.raises(PerpcsError, match="could not convert this sentencepiece tokenizer faithfully; on '  two"):
        resolve_model_dir(str(meta_dir))


def previous_sentencepiece_conversion(model_file: Path):
    """The tokenizer perpcs rebuilt by hand before it used transformers' converter (kept as the reference the
    library path must equal): BPE from sentencepiece's pieces and scores, a merge ranked by the score of the piece
    it makes, "▁" prepended and for spaces, byte fallback, "<s>" in front."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    text_pieces = {piece: i for piece, i in vocab.items()
                   if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i)
                           or processor.is_unused(i))}
    ranked = sorted((-processor.get_score(i), vocab[piece[:cut]], vocab[piece[cut:]], piece[:cut], piece[cut:])
                    for piece, i in text_pieces.items() for cut in range(1, len(piece))
                    if piece[:cut] in text_pieces and piece[cut:] in text_pieces)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked],
                                   unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


def comparison_texts(n_random: int = 300) -> list:
    """The fixture corpus, edge cases of spaces and unknown characters, and seeded random strings of them."""
    import random

    edges = ["", " ", "  ", "\n", " leading space", "trailing space ", "a  b   c ", "▁x", " ▁x", "tabs\tand\nlines 42",
             "Zürich ☕ 東京 🙂", "Ünïcödé, 日本語", "3.5% of 1234567890", "<s> literal </s> tokens", "<0x41>"]
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()[]&#") + \
        [" ", "  ", "\n", "\t", "▁", "é", "ß", "日", "🙂", "The ", " the", "ing", "tion", "###"]
    rng = random.Random(0)
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n_random)]
    return CORPUS + edges + randoms


@pytest.mark.parametrize("vocab_size", [400, 1000])
def test_transformers_converter_equals_the_previous_hand_written_tokenizer(tmp_path, vocab_size):
    """Same vocabulary, same merges (ordered alike up to the splits of one piece, which never compete), and the
    same ids, decodes and pairs as the tokenizer perpcs built by hand before; and sentencepiece's ids."""
    import sentencepiece

    sp_model = train_sentencepiece(tmp_path / "tokenizer.model", vocab_size=vocab_size)
    library, previous = meta.tokenizer_from_sentencepiece(sp_model), previous_sentencepiece_conversion(sp_model)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    assert library.get_vocab() == previous.get_vocab()
    assert (library.bos_token, library.eos_token, library.unk_token, library.padding_side) == \
        (previous.bos_token, previous.eos_token, previous.unk_token, previous.padding_side)

    def merges(tokenizer):
        return [tuple(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]

    assert set(merges(library)) == set(merges(previous)) and len(merges(library)) == len(merges(previous)) > 50
    assert list(dict.fromkeys(a + b for a, b in merges(library))) == list(dict.fromkeys(a + b for a, b in
                                                                                        merges(previous)))
    texts = comparison_texts()
    for text, pair in zip(texts, texts[1:] + texts[:1]):
        ids = library(text).input_ids
        assert ids == previous(text).input_ids, text
        if "<s>" not in text and "</s>" not in text:      # sentencepiece reads these as text, HF as tokens
            assert ids == [processor.bos_id()] + processor.encode(text), text
        assert library.decode(ids) == previous.decode(ids), text
        assert library(text, pair).input_ids == previous(text, pair).input_ids, (text, pair)


def test_llama_intermediate_sizes():
    # Published widths: Llama-2-7B 11008, Llama-2-70B 28672, Llama-3-8B 14336.
    assert llama_intermediate_size(4096, 256) == 11008
    assert llama_intermediate_size(8192, 4096, 1.3) == 28672
    assert llama_intermediate_size(4096, 1024, 1.3) == 14336


def test_rotary_permutation_moves_pair_members_to_halves():
    rows = torch.arange(8.0).unsqueeze(1)  # two heads of head_dim 4: pairs (0,1),(2,3) | (4,5),(6,7)
    assert rotary_to_half_split(rows, n_heads=2).squeeze(1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(half_split_to_interleaved(rotary_to_half_split(rows, 2), 2), rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_permutation_equals_the_one_transformers_reads_gguf_with(dtype):
    """transformers 5 ships no Meta converter; its GGUF reader undoes the same interleaving (llama.cpp writes Meta's
    layout). Ours must give the same rows bit for bit, for q (n_heads) and for k (n_kv_heads < n_heads)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    n_heads, n_kv_heads, head_dim, hidden = 8, 2, 16, 24
    gguf = LlamaTensorProcessor({"num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads})
    generator = torch.Generator().manual_seed(0)
    for name, heads in (("blk.0.attn_q.weight", n_heads), ("blk.0.attn_k.weight", n_kv_heads)):
        weight = torch.randn(heads * head_dim, hidden, generator=generator).to(dtype)
        bits = weight.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)  # numpy has no bfloat16
        theirs = torch.from_numpy(gguf.process(bits.numpy(), name).weights.copy())
        assert torch.equal(rotary_to_half_split(weight, heads).view(bits.dtype), theirs), name


# ---------------------------------------------------------------- HF directories, errors, devices

def test_load_base_model_on_tiny(tiny_model_dir):
    model, tokenizer, device = load_base_model(str(tiny_model_dir), device="cpu")
    assert device == torch.device("cpu")
    assert model.dtype == torch.float32 and not model.training
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["a", "a longer text"], return_tensors="pt", padding=True)
    assert batch.attention_mask[0, 0] == 0  # padded on the left


def test_tiny_model_is_deterministic(tmp_path, tiny_model_dir):
    again = build_tiny_llama(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()


def test_tokenizer_larger_than_model_vocabulary_fails(tmp_path):
    small = build_tiny_llama(tmp_path / "small", vocab_size=100)
    with pytest.raises(PerpcsError, match="has 512 tokens but model .* only 100"):
        load_base_model(str(small), device="cpu")


def test_hf_directory_is_returned_as_is(tiny_model_dir):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir


@pytest.mark.parametrize("layout", ["missing", "empty", "other_files", "bad_config", "config_no_weights"])
def test_unusable_model_paths_name_the_expected_files(tmp_path, layout):
    path = tmp_path / "model"
    if layout != "missing":
        path.mkdir()
    if layout == "other_files":
        (path / "notes.txt").write_text("hi")
    if layout == "bad_config":
        (path / "config.json").write_text("{not json")
        (path / "model.safetensors").write_bytes(b"")
    if layout == "config_no_weights":
        (path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(PerpcsError) as err:
        resolve_model_dir(str(path))
    message = str(err.value)
    for expected in ("config.json", "safetensors", "params.json", "consolidated.00.pth", "tokenizer.model"):
        assert expected in message
    assert str(path) in message


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(PerpcsError, match="CUDA is not available"):
            resolve_device("cuda")


def test_resolve_device_under_torchrun_takes_the_local_rank_gpu(monkeypatch):
    """N torchrun processes on one machine must use N GPUs, not all cuda:0 (no GPU needed: CUDA is faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)   # an explicit GPU is kept
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(PerpcsError, match="only 4 GPU"):
        resolve_device("auto")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda")


def test_autocast_context_on_cpu():
    a = torch.ones(2, 2)
    with autocast_context("cpu", cpu_bf16=True):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_context("cpu", cpu_bf16=False):
        assert (a @ a).dtype == torch.float32


def test_publish_keeps_the_first_finished_copy(tmp_path):
    target = tmp_path / "model"
    for name in ("first", "second"):
        tmp = tmp_path / f".tmp-{name}"
        tmp.mkdir()
        (tmp / "config.json").write_text(name)
        (tmp / "model.safetensors").write_bytes(b"x")
        assert folders._publish_dir(tmp, target) == target
        assert not tmp.exists()
    assert (target / "config.json").read_text() == "first"


@pytest.mark.parametrize("umask", [0o002, 0o027], ids=["umask002", "umask027"])
def test_publish_follows_the_umask(tmp_path, umask):
    tmp = tmp_path / ".tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    old = os.umask(umask)
    try:
        target = folders._publish_dir(tmp, tmp_path / "model")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (target / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (target / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------- LoRA adapters

def random_adapter(base_dir, adapter_dir) -> torch.Tensor:
    """Save a LoRA with random A and B on the tiny model; returns that PEFT model's logits."""
    from peft import get_peft_model

    model, _, _ = load_base_model(str(base_dir), device="cpu")
    peft_model = get_peft_model(model, lora_config())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    peft_model.eval()
    peft_model.save_pretrained(adapter_dir)
    verify_adapter(adapter_dir, peft_model)  # as the stages check what they just saved
    with torch.no_grad():
        return peft_model(TOKEN_IDS).logits


def test_lora_config_matches_the_published_runs():
    config = lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 8, 0.05)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert (config.bias, config.init_lora_weights, str(config.task_type)) == ("none", True, "CAUSAL_LM")


def test_merge_lora_equals_the_peft_model(tmp_path, tiny_model_dir):
    from peft import PeftModel

    peft_logits = random_adapter(tiny_model_dir, tmp_path / "adapter")
    base, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    with torch.no_grad():
        base_logits = base(TOKEN_IDS).logits
    merged = merge_lora_into_base(base, tmp_path / "adapter" / "lora_ckpt.pt")
    assert not isinstance(merged, PeftModel)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(TOKEN_IDS).logits
    assert torch.allclose(merged_logits, peft_logits, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # the adapter did change the model


def test_merge_refuses_an_adapter_of_another_model(tmp_path, tiny_model_dir):
    random_adapter(tiny_model_dir, tmp_path / "adapter")
    other = build_tiny_llama(tmp_path / "wide", hidden_size=96, num_heads=4, num_kv_heads=2)
    model, _, _ = load_base_model(str(other), device="cpu")
    with pytest.raises(PerpcsError, match="in_features 64, the model.s .* has 96"):
        merge_lora_into_base(model, tmp_path / "adapter")


@pytest.mark.parametrize("content", [b"", b"x" * 4, b"\xff" * 64], ids=["empty", "short", "garbage"])
def test_merge_names_a_corrupt_adapter_file(tmp_path, tiny_model_dir, content):
    adapter = tmp_path / "adapter"
    random_adapter(tiny_model_dir, adapter)
    (adapter / "adapter_model.safetensors").write_bytes(content)
    model, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    with pytest.raises(PerpcsError, match=re.escape(str(adapter / "adapter_model.safetensors"))):
        merge_lora_into_base(model, adapter)


def test_merge_loads_the_adapter_on_the_model_device(tmp_path, tiny_model_dir, monkeypatch):
    """On several GPUs PEFT's default device is the current one, not the model's: the device is passed."""
    from peft import PeftModel

    random_adapter(tiny_model_dir, tmp_path / "adapter")
    model, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    real_from_pretrained, seen = PeftModel.from_pretrained, []

    def from_pretrained(*args, **kwargs):
        seen.append(kwargs.get("torch_device"))
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", from_pretrained)
    merged = merge_lora_into_base(model, tmp_path / "adapter")
    assert seen == ["cpu"]
    assert {p.device.type for p in merged.parameters()} == {"cpu"}


def test_resolve_lora_ckpt(tmp_path, tiny_model_dir):
    adapter = tmp_path / "output" / "movie_tagging" / "task-base_LLM"
    random_adapter(tiny_model_dir, adapter)
    assert resolve_lora_ckpt(adapter) == adapter
    assert resolve_lora_ckpt(str(adapter / "lora_ckpt.pt")) == adapter
    with pytest.raises(PerpcsError, match="adapter_config.json"):
        resolve_lora_ckpt(tmp_path / "nowhere" / "lora_ckpt.pt")
    # Only the .pt spelling falls back to the parent: a typo must not silently load the parent adapter.
    for wrong in (adapter / "typo", adapter / "adapter_config.json"):
        with pytest.raises(PerpcsError, match=re.escape(f"LoRA checkpoint {wrong}: not")):
            resolve_lora_ckpt(wrong)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(PerpcsError, match="adapter_model.safetensors is missing"):
        resolve_lora_ckpt(adapter)


def test_verify_adapter_catches_a_missing_module(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    random_adapter(tiny_model_dir, adapter)
    model, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    names = adapter_tensor_names(adapter)
    assert len(names) == 2 * 4 * 2  # layers x modules x (A, B)
    verify_adapter(adapter, model)
    tensors = load_file(adapter / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(PerpcsError, match=r"layers\.1\.self_attn\.v_proj\.lora_B"):
        verify_adapter(adapter, model)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(PerpcsError, match="missing or empty"):
        verify_adapter(adapter, model)


def test_targeted_module_names_accepts_dotted_suffixes(tiny_model_dir):
    """As PEFT: "self_attn.q_proj" is a valid target, and the bare last component still matches."""
    model, _, _ = load_base_model(str(tiny_model_dir), device="cpu")
    expected = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert lora.targeted_module_names(model, ["self_attn.q_proj"]) == expected
    assert lora.targeted_module_names(model, ["q_proj"]) == expected
    assert lora.targeted_module_names(model, ["model.layers.1.self_attn.q_proj"]) == expected[1:]
    assert lora.targeted_module_names(model, ["attn.q_proj"]) == []  # whole components only
    assert lora.targeted_module_names(model, r".*\.1\.self_attn\.q_proj") == expected[1:]


# ---------------------------------------------------------------- the bundled SmolLM2

@pytest.mark.slow
def test_smollm2_loads_and_generates(smollm2_dir):
    from safetensors import safe_open

    assert resolve_model_dir("smollm2") == smollm2_dir == resolve_model_dir(None)
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert not (smollm2_dir / "config.json").read_text().count("quantization_config")
    model, tokenizer, device = load_base_model("smollm2", device="cpu")
    assert model.config.vocab_size == 49152 and len(tokenizer) <= 49152
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert text.strip()
