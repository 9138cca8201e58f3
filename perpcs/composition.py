"""Stage 5, the heart of Per-Pcs (SPEC section 7): a target user's LoRA assembled from sharers' pieces.

No gradient step. The user's history examples run through base + task model; at every piece position the
module input scores every sharer's piece with its gate, some pieces are chosen (top-k, nucleus or drawn: the
four selection modes of the published code), mixed (A and B separately) and used at once, so deeper layers see
the assembled shallower pieces. The final piece is the mean of the per-batch mixtures, i.e. a sparse weighted sum
of sharer pieces: the *recipe*, which rebuilds the LoRA exactly.

The sharer pool (all LoRAs and gates) is read once per process and scored for all sharers at once. The assembled
LoRA predicts through peft, as OPPU's and the task LoRA's do: one peft LoRA per process (composed_lora_model)
receives each user's A and B (load_composed), the composer's wrappers out of the forward (composer_removed).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import write_dir_atomic
from .data import read_json
from .errors import fail
from .gates import GATES_FILE, load_gates

ADAPTER_PREFIX = "base_model.model."
RECIPE_FORMAT = "perpcs-recipe/1"


@dataclass
class ComposeSettings:
    topk: int = 3
    agg_temperature: float = 1.0
    share_ratio: float = 1.0
    epochs: int = 1
    batch_size: int = 16
    recent_k: int = 2000
    seed: int = 0
    sample: bool = False
    sample_topk: int = 10
    sample_temperature: float = 1.0
    sample_top_p: float | None = None      # None = unset, as published: it picks the selection mode

    @property
    def selection_mode(self) -> int:
        """SPEC 7's modes of the published code: 1 top-k, 2 nucleus, 3 sampled within nucleus + top-k, 4 sampled
        within the --sample_topk best."""
        if self.sample:
            return 3 if self.sample_top_p is not None else 4
        return 2 if self.sample_top_p is not None else 1

    def describe(self) -> str:
        k, p, t, ts = self.topk, self.sample_top_p, self.agg_temperature, self.sample_temperature
        return {1: f"mode 1: the top {k} pieces per position, mixed by softmax(score / {t})",
                2: f"mode 2: the nucleus (top-p {p}, temperature {ts}) of the scores, a variable number of pieces "
                   f"per position (--topk ignored), mixed by softmax(score / {t})",
                3: f"mode 3: {k} pieces drawn from softmax(score / {t}) over the nucleus (top-p {p}, temperature "
                   f"{ts}) and the top {k}, mixed by softmax(score / {t})",
                4: f"mode 4: {k} pieces drawn from softmax(score / {ts}) over the {self.sample_topk} best, mixed by "
                   f"softmax(score / {t})"}[self.selection_mode]

    def check(self, pool_size: int) -> None:
        """Refuse, before any model loads, settings that make no sense or that the published code crashed on."""
        if not 0 < self.share_ratio <= 1:
            fail(f"--share_ratio must be in (0, 1], got {self.share_ratio}")
        if self.topk < 1:
            fail(f"--topk must be at least 1, got {self.topk}")
        if self.agg_temperature <= 0:
            fail(f"--agg_temperature must be positive, got {self.agg_temperature}")
        for flag, value in (("epochs", self.epochs), ("batch_size", self.batch_size), ("recent_k", self.recent_k)):
            if value < 1:   # epochs 0 would assemble an all-zero LoRA and report it as Per-Pcs
                fail(f"--{flag} must be at least 1, got {value}")
        mode = self.selection_mode
        if self.sample_top_p is not None and not 0 < self.sample_top_p <= 1:
            fail(f"--sample_top_p must be in (0, 1], got {self.sample_top_p}")
        if mode != 1 and not self.sample_temperature > 0:   # the nucleus (modes 2, 3) and mode 4's draw use it
            fail(f"--sample_temperature must be positive, got {self.sample_temperature}")
        usable = int(self.share_ratio * pool_size)
        pool = f"{pool_size} sharers" + (f", {usable} with --share_ratio {self.share_ratio}"
                                         if self.share_ratio < 1 else "")
        if usable < 1:
            fail(f"the sharer pool of a piece position is empty ({pool})")
        if mode != 2 and self.topk > usable:   # mode 2 ignores --topk
            fail(f"--topk {self.topk} is larger than the sharer pool ({pool})")
        if mode == 4:   # the published code crashed on both, after loading the model
            if self.sample_topk > usable:
                fail(f"--sample_topk {self.sample_topk} is larger than the sharer pool ({pool}): --sample without "
                     f"--sample_top_p draws from the --sample_topk best sharers; lower --sample_topk")
            if self.topk > self.sample_topk:
                fail(f"--topk {self.topk} is larger than --sample_topk {self.sample_topk}: --sample without "
                     f"--sample_top_p draws --topk pieces from the --sample_topk best")


class PiecePool:
    """Every sharer's LoRA pieces and layer-normed gates, stacked per piece position: read once."""

    def __init__(self, sharer_ids: list, anchor_dir, gate_dir=None, device="cpu"):
        """gate_dir None: LoRAs only, enough to rebuild adapters from recipes."""
        self.sharer_ids = [str(s) for s in sharer_ids]
        if not self.sharer_ids:
            fail("the sharer pool is empty")
        self.anchor_dir = Path(anchor_dir)
        configs = [self._read_config(uid) for uid in self.sharer_ids]
        self.config = configs[0]
        for uid, cfg in zip(self.sharer_ids, configs):
            if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):   # one scaling serves every piece here
                fail(f"sharer {uid!r} ({self._adapter_dir(uid)}): adapters with rank_pattern / alpha_pattern "
                     f"are not supported (every piece must share r and lora_alpha)")
        for uid, cfg in zip(self.sharer_ids[1:], configs[1:]):
            for key in ("r", "lora_alpha", "target_modules", "base_model_name_or_path", "use_rslora"):
                a, b = _norm(self.config.get(key)), _norm(cfg.get(key))
                if a != b:
                    fail(f"sharer {uid!r} ({self._adapter_dir(uid)}) has {key} = {cfg.get(key)!r}, but sharer "
                         f"{self.sharer_ids[0]!r} has {self.config.get(key)!r}: all sharers must share one config")
        r, alpha = self.config["r"], self.config["lora_alpha"]
        self.scaling = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        tensors = [self._read_adapter(uid) for uid in self.sharer_ids]
        self.pieces = list(tensors[0])
        for uid, t in zip(self.sharer_ids[1:], tensors[1:]):
            if set(t) != set(self.pieces):
                fail(f"sharer {uid!r} has other LoRA modules than sharer {self.sharer_ids[0]!r}")
        self.dtype = next(iter(tensors[0].values()))[0].dtype
        gates = [load_gates(Path(gate_dir) / f"user_{uid}" / GATES_FILE, self.pieces, f"sharer {uid!r}")
                 for uid in self.sharer_ids] if gate_dir is not None else None
        self.A, self.B, self.G = {}, {}, {}
        for piece in self.pieces:
            for uid, t in zip(self.sharer_ids, tensors):
                if t[piece][0].shape != tensors[0][piece][0].shape or t[piece][1].shape != tensors[0][piece][1].shape:
                    fail(f"sharer {uid!r}: piece {piece} has another shape than sharer {self.sharer_ids[0]!r}")
            self.A[piece] = torch.stack([t[piece][0].float() for t in tensors]).to(device)   # (S, r, d_in)
            self.B[piece] = torch.stack([t[piece][1].float() for t in tensors]).to(device)   # (S, d_out, r)
            if gates is None:
                continue
            g = torch.stack([gs[piece].float() for gs in gates])                               # (S, d_in)
            if g.shape[1] != self.A[piece].shape[2]:
                fail(f"gates of piece {piece} have size {g.shape[1]}, the LoRA input size is "
                     f"{self.A[piece].shape[2]}")
            self.G[piece] = F.layer_norm(g, (g.shape[1],), eps=1e-5).to(device)

    def __len__(self) -> int:
        return len(self.sharer_ids)

    def to(self, device) -> "PiecePool":
        for table in (self.A, self.B, self.G):
            for piece in table:
                table[piece] = table[piece].to(device)
        return self

    def _adapter_dir(self, uid: str) -> Path:
        return self.anchor_dir / f"user_{uid}"

    def _read_config(self, uid: str) -> dict:
        path = self._adapter_dir(uid) / "adapter_config.json"
        if not path.is_file():
            fail(f"no sharer LoRA for user {uid!r}: {path} is missing (run train_anchor_PEFT.py)")
        return read_json(path, "adapter config")

    def _read_adapter(self, uid: str) -> dict:
        """{piece: (A, B)} of one sharer adapter file."""
        path = self._adapter_dir(uid) / "adapter_model.safetensors"
        if not path.is_file():
            fail(f"no sharer LoRA weights for user {uid!r}: {path} is missing")
        raw = load_file(str(path))
        pieces: dict = {}
        for key, tensor in raw.items():
            for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
                if key.endswith(part):
                    piece = key[:-len(part)]
                    piece = piece[len(ADAPTER_PREFIX):] if piece.startswith(ADAPTER_PREFIX) else piece
                    pieces.setdefault(piece, [None, None])[slot] = tensor
        broken = [p for p, ab in pieces.items() if ab[0] is None or ab[1] is None]
        if not pieces or broken:
            fail(f"{path}: not a complete LoRA adapter (pieces without A or B: {broken[:3]})")
        return {p: tuple(ab) for p, ab in pieces.items()}

    def build(self, weights: dict) -> dict:
        """{piece: (A, B)} in fp32 from {piece: sharer weight vector (S,)}: sum_s w_s A_s, sum_s w_s B_s."""
        out = {}
        for piece in self.pieces:
            w = weights[piece].to(self.A[piece].device, torch.float32)
            out[piece] = (torch.einsum("s,srd->rd", w, self.A[piece]), torch.einsum("s,sdr->dr", w, self.B[piece]))
        return out

    def adapter_state_dict(self, weights: dict) -> dict:
        """The assembled LoRA as a peft adapter state dict ({base_model.model.<piece>.lora_A.weight: A, ...}) in the
        sharers' dtype, on the pool's device: what save_adapter writes and load_composed loads."""
        tensors = {}
        for piece, (a, b) in self.build(weights).items():
            tensors[f"{ADAPTER_PREFIX}{piece}.lora_A.weight"] = a.to(self.dtype)
            tensors[f"{ADAPTER_PREFIX}{piece}.lora_B.weight"] = b.to(self.dtype)
        return tensors

    def save_adapter(self, weights: dict, target) -> Path:
        """Write the assembled LoRA as a standard peft adapter (the sharers' config, the sharers' dtype)."""
        config_src = self._adapter_dir(self.sharer_ids[0]) / "adapter_config.json"
        tensors = {k: t.cpu().contiguous() for k, t in self.adapter_state_dict(weights).items()}

        def write(staging: Path) -> None:
            save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
            shutil.copyfile(config_src, staging / "adapter_config.json")

        return write_dir_atomic(target, write)


def _norm(value):
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


class ComposedLinear(nn.Module):
    """A target module of the base (+task) model during assembly: base(x) + B(A(x)) * scaling, A and B mixed from
    the sharers' pieces at this forward."""

    def __init__(self, base: nn.Linear, piece: str, composer: "Composer"):
        super().__init__()
        self.base, self.piece, self.composer = base, piece, composer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ab = self.composer.piece_for(self.piece, x)
        if ab is None:
            return out
        a, b = ab   # the small A and B take the activations' dtype, not the other way round
        lora = (x @ a.T.to(x.dtype)) @ b.T.to(x.dtype)
        return out + (lora * self.composer.pool.scaling).to(out.dtype)


class Composer:
    """Drives assembly: holds the pool, the per-piece share pools, the score mask and the weight sums."""

    def __init__(self, pool: PiecePool, settings: ComposeSettings):
        self.pool, self.settings = pool, settings
        self.mode = "off"                 # off | assemble
        self.score_mask = None            # (batch, T) positions whose next token is an answer token
        self._positions = None            # (rows, cols, weight of each position) of score_mask, once a batch
        self.weight_sum: dict = {}
        self.allowed: dict = {}
        self.generator = torch.Generator()
        self.n_batches = 0

    # --- per user -------------------------------------------------------------------------------------
    def start_user(self, seed: int) -> None:
        """Fresh sums; share-ratio pools drawn once per user and piece (seeded), serving every batch."""
        S = len(self.pool)
        device = self.pool.A[self.pool.pieces[0]].device
        self.weight_sum = {p: torch.zeros(S, dtype=torch.float64, device=device) for p in self.pool.pieces}
        self.n_batches = 0
        rnd = random.Random(seed)
        size = int(self.settings.share_ratio * S)
        self.allowed = {p: torch.tensor(sorted(rnd.sample(range(S), size)) if size < S else list(range(S)),
                                        device=device) for p in self.pool.pieces}
        self.generator.manual_seed(seed)
        self.mode = "assemble"

    def set_batch(self, mask: torch.Tensor) -> None:
        """The answer-predicting positions of the next forward, shared by every piece of that forward.

        The batch mean of per-example means is one weighted sum over the positions, weight 1 / (examples x
        the example's positions): a matrix product, deterministic on GPUs (index_add_ is not)."""
        self.score_mask = mask
        rows, cols = mask.nonzero(as_tuple=True)
        counts = mask.sum(dim=1).clamp(min=1).float()
        self._positions = (rows, cols, 1.0 / (counts[rows] * mask.shape[0]))

    def final_weights(self) -> dict:
        return {p: (w / max(self.n_batches, 1)).cpu() for p, w in self.weight_sum.items()}

    # --- inside the forward ---------------------------------------------------------------------------
    def piece_for(self, piece: str, x: torch.Tensor):
        if self.mode == "off":
            return None
        return self._assemble(piece, x)

    def scores(self, piece: str, x: torch.Tensor) -> torch.Tensor:
        """(S,) score of every sharer: batch mean of the per-example mean over answer-predicting positions
        of LayerNorm(x_t) . LayerNorm(g_s) / sqrt(d), in fp32."""
        rows, cols, weights = self._positions
        d = x.shape[-1]
        h = F.layer_norm(x[rows, cols].float(), (d,), eps=1e-5)                   # (N, d)
        return ((weights @ h) @ self.pool.G[piece].T) / math.sqrt(d)

    def choose(self, piece: str, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the sharers mixed at this position, by the selection mode (SPEC 7); ties in the ranking go
        to the lower sharer index. Draws use the user's generator, in forward order (batches, then pieces)."""
        st = self.settings
        allowed = self.allowed[piece]       # ascending sharer indices: the pool order
        s = scores[allowed].float()
        order = torch.sort(-s, stable=True).indices
        mode, k = st.selection_mode, st.topk
        if mode == 1:
            return allowed[order[:k]]
        if mode == 4:
            cand = order[:st.sample_topk]
            probs = torch.softmax(s[cand] / st.sample_temperature, dim=0)
            return allowed[cand[self._draw(piece, probs, k)]]
        kept = order[:nucleus_size(s[order], st.sample_temperature, st.sample_top_p)]
        if mode == 2:
            return allowed[kept]
        keep = torch.zeros_like(s, dtype=torch.bool)
        keep[kept] = True
        keep[order[:k]] = True              # mode 3: the k best stay whatever the nucleus
        probs = torch.softmax(s.masked_fill(~keep, -math.inf) / st.agg_temperature, dim=0)   # pool order
        return allowed[self._draw(piece, probs, k)]

    def _draw(self, piece: str, probs: torch.Tensor, k: int) -> torch.Tensor:
        """k indices into probs, without replacement, from the user's generator (on the CPU: the same draws on
        every device)."""
        probs = probs.cpu()
        if int((probs > 0).sum()) < k:   # torch would quietly draw zero-probability categories
            fail(f"piece {piece}: {k} pieces must be drawn without replacement, but only {int((probs > 0).sum())} "
                 f"have a non-zero probability at this temperature: raise --agg_temperature (with --sample_top_p) "
                 f"or --sample_temperature (without)")
        return torch.multinomial(probs, k, replacement=False, generator=self.generator).to(self.allowed[piece].device)

    def _assemble(self, piece: str, x: torch.Tensor):
        with torch.autocast(x.device.type, enabled=False):   # scores, softmax and mixing in fp32 (SPEC 7)
            return self._assemble_fp32(piece, x)

    def _assemble_fp32(self, piece: str, x: torch.Tensor):
        scores = self.scores(piece, x)
        chosen = self.choose(piece, scores)
        w = torch.softmax(scores[chosen] / self.settings.agg_temperature, dim=0)
        self.weight_sum[piece].index_add_(0, chosen, w.double())
        a = torch.einsum("k,krd->rd", w, self.pool.A[piece][chosen])
        b = torch.einsum("k,kdr->dr", w, self.pool.B[piece][chosen])
        return a, b


def nucleus_size(sorted_scores: torch.Tensor, temperature: float, top_p: float) -> int:
    """Leading positions of descending scores that form the nucleus: c = cumsum(softmax(s / temperature)) in fp32;
    a position is dropped when the previous one already has c > top_p, so the first one always stays."""
    c = torch.cumsum(torch.softmax(sorted_scores.float() / temperature, dim=0), dim=0)
    return 1 + int((c[:-1] <= top_p).sum())   # c never decreases: the kept positions are a prefix


def install_composer(model, composer: Composer) -> None:
    """Wrap each target module named by the pool's pieces; checks that the pieces fit the model."""
    modules = dict(model.named_modules())
    for piece in composer.pool.pieces:
        module = modules.get(piece)
        if module is None:
            fail(f"the sharer LoRAs target {piece!r}, which this model does not have: were they trained on "
                 f"another base model?")
        base = module.base if isinstance(module, ComposedLinear) else module
        a, b = composer.pool.A[piece][0], composer.pool.B[piece][0]
        if base.in_features != a.shape[1] or base.out_features != b.shape[0]:
            fail(f"piece {piece}: the sharer LoRA is {a.shape[1]} -> {b.shape[0]}, the model's module is "
                 f"{base.in_features} -> {base.out_features}: another base model?")
        parent_name, _, child = piece.rpartition(".")
        setattr(modules[parent_name], child, ComposedLinear(base, piece, composer))


@contextmanager
def composer_removed(model):
    """The composer's wrappers out of ``model`` (its target modules as they were: peft's LoRA layers) while peft
    loads and predicts a user's LoRA; put back afterwards for the next user's assembly."""
    modules = dict(model.named_modules())
    wrapped = [(name, m) for name, m in modules.items() if isinstance(m, ComposedLinear)]
    for name, m in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, m.base)
    try:
        yield model
    finally:
        for name, m in wrapped:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, m)


def composed_lora_model(model, pool: PiecePool):
    """A peft LoRA on ``model`` (base + task model) at the pool's pieces, with the sharers' r, lora_alpha and rslora:
    made once per process, it receives each target user's assembled LoRA (load_composed) and predicts the way
    OPPU's adapters do, adapter weights in fp32 (peft's default) whatever the model's dtype. The composer is
    installed after it (around peft's layers); assembly runs with the adapter disabled."""
    from peft import get_peft_model

    from .modeling import lora_config
    config = lora_config(pool.config["r"], pool.config["lora_alpha"], 0.0, pool.pieces)
    config.use_rslora = bool(pool.config.get("use_rslora"))
    config.inference_mode = True
    try:
        return get_peft_model(model, config)
    except ValueError as err:   # none of the pieces is in the model (some missing: install_composer says which)
        fail(f"the sharer LoRAs target modules this model does not have ({err}): were they trained on another "
             f"base model?")


def load_composed(peft_model, pool: PiecePool, weights: dict) -> None:
    """Load a user's assembled LoRA into composed_lora_model's adapter as peft loads a saved adapter: the tensors
    pool.save_adapter writes (the sharers' dtype), copied into the adapter's (fp32) weights. Call it with the
    composer's wrappers removed (their nesting would rename peft's keys)."""
    from peft import set_peft_model_state_dict
    result = set_peft_model_state_dict(peft_model, pool.adapter_state_dict(weights))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise RuntimeError(f"the assembled LoRA does not fit the peft model: unexpected {result.unexpected_keys[:3]}, "
                           f"missing {missing[:3]}")


def answer_predicting_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token (labels shifted by one) is an answer token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


@torch.no_grad()
def assemble_user(model, composer: Composer, tokenized: list, pad_id: int, device, seed: int,
                  who: str = "user", cpu_bf16: bool = False) -> tuple:
    """Assemble one user's LoRA from its tokenized examples; returns (weights per piece, batches).

    Examples without an answer-predicting position are dropped with a warning that names them.
    """
    from .modeling import autocast_context
    from .training import collate
    usable = []
    for i, t in enumerate(tokenized):
        if t.n_answer == 0 or len(t.input_ids) < 2:
            warnings.warn(f"{who}: example {i} ({t.source}) has no answer token after truncation; "
                          f"left out of the scoring")
        else:
            usable.append(i)
    if not usable:
        fail(f"{who}: no history example with an answer token to score the pieces with")
    settings = composer.settings
    composer.start_user(seed)
    generator = torch.Generator().manual_seed(seed)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    model.eval()
    batches = []
    for _ in range(settings.epochs):
        order = [usable[j] for j in torch.randperm(len(usable), generator=generator).tolist()]
        for s in range(0, len(order), settings.batch_size):
            idx = order[s:s + settings.batch_size]
            batch = collate([tokenized[i] for i in idx], pad_id, device)
            composer.set_batch(answer_predicting_mask(batch["labels"]))
            with autocast_context(device, cpu_bf16):
                decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            composer.n_batches += 1
            batches.append(idx)
    composer.score_mask = composer._positions = None
    composer.mode = "off"
    return composer.final_weights(), batches


def make_recipe(pool: PiecePool, weights: dict, settings: ComposeSettings, user: str, task: str,
                batches: list, extra: dict | None = None) -> dict:
    pieces = {}
    for piece in pool.pieces:
        w = weights[piece]
        nz = torch.nonzero(w).flatten().tolist()
        pieces[piece] = [[pool.sharer_ids[i], float(w[i])] for i in nz]
    return {"format": RECIPE_FORMAT, "user_id": user, "task": task, "settings": vars(settings).copy(),
            "lora": {k: pool.config.get(k) for k in ("r", "lora_alpha", "target_modules", "use_rslora",
                                                    "base_model_name_or_path")},
            "sharers": pool.sharer_ids, "batches": batches, "pieces": pieces, **(extra or {})}


def recipe_weights(recipe: dict, pool: PiecePool, path="recipe") -> dict:
    """{piece: weight vector over the pool's sharers} from a recipe (which must fit the pool)."""
    if recipe.get("format") != RECIPE_FORMAT:
        fail(f"{path}: not a Per-Pcs recipe (format {recipe.get('format')!r})")
    index = {uid: i for i, uid in enumerate(pool.sharer_ids)}
    weights = {}
    for piece in pool.pieces:
        if piece not in recipe["pieces"]:
            fail(f"{path}: no entry for piece {piece}")
        w = torch.zeros(len(pool), dtype=torch.float64)
        for uid, weight in recipe["pieces"][piece]:
            if uid not in index:
                fail(f"{path}: piece {piece} uses sharer {uid!r}, which is not in the sharer pool")
            w[index[uid]] = weight
        weights[piece] = w
    return weights


def recipe_sharers(path) -> list:
    return [str(s) for s in read_json(path, "recipe")["sharers"]]


def write_recipe(recipe: dict, path) -> int:
    from .data import write_bytes_atomic
    data = (json.dumps(recipe, indent=None, separators=(",", ":")) + "\n").encode()
    write_bytes_atomic(path, data)
    return len(data)
