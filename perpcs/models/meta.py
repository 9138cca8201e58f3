"""Meta's Llama download to an HF directory, converted once (under a lock, with a stamp of the
source files), and a fast tokenizer rebuilt from its sentencepiece model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from perpcs.errors import fail
from perpcs.models.folders import (EXPECTED_FORMATS, _conversion_lock, _has_hf_files, _publish_dir, _refuse_leftover,
                                   _remove_stale_temps, cache_root)

CONVERTED_SUBDIR = "hf_converted"
CONVERSION_MARKER = "perpcs_conversion.json"
META_MAX_POSITIONS = 4096


# ---------------------------------------------------------------- Meta download -> HF

def _meta_files(meta_dir: Path) -> tuple:
    """(params.json, [consolidated shards], tokenizer.model), or an error naming what is missing."""
    params = meta_dir / "params.json"
    shards = sorted(meta_dir.glob("consolidated.*.pth"))
    # Meta's download script puts tokenizer.model beside the model folders, not inside them.
    tokenizer = next((p for p in (meta_dir / "tokenizer.model", meta_dir.parent / "tokenizer.model")
                      if p.is_file()), None)
    missing = [name for name, found in (("params.json", params.is_file()),
                                        ("consolidated.00.pth", bool(shards)),
                                        ("tokenizer.model", tokenizer is not None)) if not found]
    if missing:
        fail(f"{meta_dir}: looks like a Meta download but lacks {', '.join(missing)}; {EXPECTED_FORMATS}")
    expected = [meta_dir / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        fail(f"{meta_dir}: consolidated shards must be numbered 00..{len(shards) - 1:02d} without gaps; "
             f"found {', '.join(p.name for p in shards)}")
    return params, shards, tokenizer


def _source_stamp(files) -> list:
    """What a conversion was made from: each file's name, size and a digest of its first and last MiB. It
    survives moving the download, and tells a same-size swap (Llama-2-7b vs -7b-chat) without reading 13 GB."""
    stamp = []
    for f in map(Path, files):
        size, digest = f.stat().st_size, hashlib.sha256()
        with open(f, "rb") as fh:
            digest.update(fh.read(2**20))
            if size > 2**20:
                fh.seek(max(size - 2**20, 2**20))
                digest.update(fh.read())
        stamp.append({"file": f.name, "bytes": size, "edges_sha256": digest.hexdigest()})
    return stamp


def _converted_meta_dir(meta_dir: Path) -> Path:
    params, shards, tokenizer = _meta_files(meta_dir)
    stamp = _source_stamp([params, *shards, tokenizer])
    target = _conversion_target(meta_dir, stamp)
    if _has_hf_files(target):
        _check_stamp(target, stamp)
        return target
    with _conversion_lock(target):
        if _has_hf_files(target):  # converted by another process while this one waited for the lock
            _check_stamp(target, stamp)
            return target
        _refuse_leftover(target)
        _remove_stale_temps(target)
        tmp_dir = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            convert_meta_checkpoint(params, shards, tokenizer, tmp_dir)
            (tmp_dir / CONVERSION_MARKER).write_text(json.dumps({"sources": stamp}, indent=1) + "\n")
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return _publish_dir(tmp_dir, target)


def _conversion_target(meta_dir: Path, stamp: list) -> Path:
    """``<dir>/hf_converted``; a read-only download converts into the cache instead, unless its
    ``hf_converted`` already holds a conversion of these files (made once by whoever can write there)."""
    local = meta_dir / CONVERTED_SUBDIR
    if os.access(meta_dir, os.W_OK) or (_has_hf_files(local) and _stamp_matches(local, stamp)):
        return local
    digest = hashlib.sha1(str(meta_dir.resolve()).encode()).hexdigest()[:12]
    target = cache_root() / "meta-converted" / f"{meta_dir.resolve().name}-{digest}"
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _stamp_matches(target: Path, stamp: list) -> bool:
    try:
        recorded = json.loads((target / CONVERSION_MARKER).read_text(encoding="utf-8")).get("sources")
    except (OSError, ValueError, AttributeError):
        recorded = None
    return recorded == stamp


def _check_stamp(target: Path, stamp: list) -> None:
    if not _stamp_matches(target, stamp):
        fail(f"{target} was converted from other files than the Meta checkpoint now beside it "
             f"(see {CONVERSION_MARKER}); delete {target} to convert again")


def llama_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier=None) -> int:
    """The feed-forward width of Meta's Llama code: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rotary_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k output rows per head from Meta's interleaved rotary pairs (0,1),(2,3).. to HF's
    half split (pair i = rows i and i + head_dim/2).

    Ours, not transformers': its wheel has no Meta converter (convert_llama_weights_to_hf.py is a repository
    script), and the same reordering in its GGUF reader is a private numpy method (no bf16); the tests check
    that ours equals it bit for bit."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, in_features)
            .transpose(1, 2).reshape(out_features, in_features))


# How model-parallel shards split each tensor (None: every shard holds a full copy).
_SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1,
              "w1": 0, "w3": 0, "w2": 1, "attention_norm": None, "ffn_norm": None, "norm": None}
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def _load_meta_shards(shards) -> dict:
    """Read the consolidated shards (tensors only, no arbitrary unpickling) and join model-parallel splits."""
    states = []
    for shard in shards:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the user's file problem
            fail(f"{shard}: cannot read as a PyTorch checkpoint of plain tensors ({err})")
        if not isinstance(state, dict):
            fail(f"{shard}: expected a dict of tensors, found {type(state).__name__}")
        states.append(state)
    if len(states) == 1:
        return states[0]
    merged = {}
    for name in states[0]:
        kind = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name
        if kind not in _SHARD_DIM and name != "rope.freqs":
            fail(f"{shards[0]}: unexpected tensor {name!r} (not a Llama weight)")
        dim = _SHARD_DIM.get(kind)
        parts = [state[name] for state in states]
        merged[name] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return merged


def _meta_to_hf_names(meta_state: dict, n_heads: int, n_kv_heads: int, source: Path) -> dict:
    hf_state = {}
    for name, tensor in meta_state.items():
        if name == "rope.freqs":  # recomputed by the HF model
            continue
        base = name.removesuffix(".weight")
        if base in _TOP_NAMES:
            hf_state[_TOP_NAMES[base] + ".weight"] = tensor
            continue
        parts = base.split(".", 2)
        if len(parts) != 3 or parts[0] != "layers" or parts[2] not in _LAYER_NAMES:
            fail(f"{source}: unexpected tensor {name!r} (not a Llama weight)")
        if parts[2] == "attention.wq":
            tensor = rotary_to_half_split(tensor, n_heads)
        elif parts[2] == "attention.wk":
            tensor = rotary_to_half_split(tensor, n_kv_heads)
        hf_state[f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"] = tensor.contiguous()
    return hf_state


def _meta_config(params: dict, params_file: Path, vocab_size: int, tokenizer, dtype: torch.dtype):
    from transformers import LlamaConfig

    for key in ("dim", "n_layers", "n_heads", "norm_eps", "multiple_of"):
        if key not in params:
            fail(f"{params_file}: field {key!r} missing")
    if params.get("use_scaled_rope"):
        fail(f"{params_file}: use_scaled_rope (Llama 3.1 rope scaling) is not supported by this converter")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=params["dim"],
        intermediate_size=llama_intermediate_size(params["dim"], params["multiple_of"],
                                                  params.get("ffn_dim_multiplier")),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        rms_norm_eps=params["norm_eps"],
        max_position_embeddings=META_MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )


def _check_meta_shapes(hf_state: dict, config, source: Path) -> None:
    """Catch a params.json that does not describe the weights (else HF would fail obscurely)."""
    head_dim = config.hidden_size // config.num_attention_heads
    expected = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (config.num_key_value_heads * head_dim, config.hidden_size),
        "model.layers.0.mlp.gate_proj.weight": (config.intermediate_size, config.hidden_size),
    }
    for name, shape in expected.items():
        found = tuple(hf_state[name].shape) if name in hf_state else None
        if found != shape:
            fail(f"{source}: tensor {name} has shape {found}, but params.json and the tokenizer imply "
                 f"{shape} (vocab_size, dim, n_kv_heads, multiple_of, ffn_dim_multiplier)")


def convert_meta_checkpoint(params_file: Path, shards, tokenizer_file: Path, out_dir: Path) -> None:
    """Write an HF Llama directory (safetensors, config, tokenizer) from Meta's consolidated checkpoint."""
    from transformers import LlamaForCausalLM

    try:
        params = json.loads(Path(params_file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{params_file}: malformed JSON ({err})")
    if not isinstance(params, dict):
        fail(f"{params_file}: expected a JSON object")
    tokenizer = tokenizer_from_sentencepiece(tokenizer_file)
    n_heads = params.get("n_heads")
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if not isinstance(n_heads, int):
        fail(f"{params_file}: field 'n_heads' missing or not an integer")
    hf_state = _meta_to_hf_names(_load_meta_shards(shards), n_heads, n_kv_heads, shards[0])
    if "model.embed_tokens.weight" not in hf_state:
        fail(f"{shards[0]}: no tok_embeddings.weight (not a Llama checkpoint)")
    vocab_size = params.get("vocab_size", -1)
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        vocab_size = len(tokenizer)
    dtype = hf_state["model.embed_tokens.weight"].dtype
    config = _meta_config(params, Path(params_file), vocab_size, tokenizer, dtype)
    _check_meta_shapes(hf_state, config, shards[0])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if missing or unexpected:
        fail(f"{shards[0]}: checkpoint does not match params.json: missing {sorted(missing)[:4]}, "
             f"unexpected {sorted(unexpected)[:4]}")
    model.save_pretrained(out_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- sentencepiece -> HF tokenizer

# Texts on which the converted tokenizer must give exactly sentencepiece's ids.
_PARITY_TEXTS = (
    "The capital of France is Paris.",
    "### User Instruction:\nGenerate a headline for the following article: Stocks rose 3.5% today!",
    "  two  leading spaces, tabs\tand\nnew lines\n\n",
    "Ünïcödé, 日本語, emoji 🙂 and numbers 1234567890.",
    "",
)


def tokenizer_from_sentencepiece(model_file: Path):
    """A fast HF tokenizer equal to a sentencepiece BPE model (Llama 1/2 style), checked id for id.

    The backend is transformers' own conversion (``SpmConverter.build_tokenizer_from_spm_proto``, what
    ``AutoTokenizer`` builds from a ``tokenizer.model`` without ``tokenizer.json``: the model's normalizer and
    dummy prefix, BPE merges ranked by piece score, byte fallback); we add ``<s>`` in front as Llama does.
    Not ``LlamaTokenizer``: its pre-tokenizer drops sentencepiece's dummy prefix before a leading space, and
    it adds no ``<s>`` when built from a ``.model`` file. The id check catches a model the conversion does not
    reproduce.
    """
    import sentencepiece
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(model_file))
    except (OSError, RuntimeError) as err:
        fail(f"{model_file}: not a sentencepiece model ({err}); Llama 3's tiktoken tokenizer is not supported")
    proto = SentencePieceExtractor(str(model_file)).proto
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        fail(f"{model_file}: a sentencepiece {proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)} "
             f"model; only BPE models (like Llama 1/2's) are supported")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    unk, bos, eos = (processor.id_to_piece(processor.unk_id()), processor.id_to_piece(processor.bos_id()),
                     processor.id_to_piece(processor.eos_id()))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, bos_token=bos,
                                        eos_token=eos, padding_side="left")
    _check_tokenizer_parity(tokenizer, processor, model_file)
    return tokenizer


def _check_tokenizer_parity(tokenizer, processor, model_file: Path) -> None:
    for text in _PARITY_TEXTS:
        ours = tokenizer(text).input_ids
        theirs = [processor.bos_id()] + processor.encode(text)
        if ours != theirs:
            fail(f"{model_file}: could not convert this sentencepiece tokenizer faithfully; on {text!r} "
                 f"sentencepiece gives {theirs[:12]} but the conversion gives {ours[:12]}")
