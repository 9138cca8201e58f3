"""Stage 5, the heart of Per-Pcs (docs/method.md section 7): a target user's LoRA assembled from sharers' pieces.

No gradient step. The user's history examples run through base + task model; at every piece position the
module input scores every sharer's piece with its gate (method/gates.py), some pieces are chosen (top-k, nucleus
or drawn: the four selection modes of the published code, method/selection.py), mixed (A and B separately) and
used at once, so deeper layers see the assembled shallower pieces. The final piece is the mean of the per-batch
mixtures, i.e. a sparse weighted sum of sharer pieces: the *recipe*, which rebuilds the LoRA exactly.

The sharer pool (all LoRAs and gates) is read once per process and scored for all sharers at once. The assembled
LoRA predicts through peft, as OPPU's and the task LoRA's do: one peft LoRA per process (composed_lora_model)
receives each user's A and B (load_composed), the composer's wrappers out of the forward (composer_removed).
"""
from __future__ import annotations

import math
import random
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from perpcs.checks import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, SEED, check_settings, setting
from perpcs.errors import fail
from perpcs.method.calibration import CALIBRATIONS
from perpcs.method.gates import (answer_positions, answer_predicting_mask, gate_scores, gate_summary,
                                 summary_scores)
from perpcs.method.pieces import PiecePool
from perpcs.method.selection import SELECTION_MODES, SelectionMode, mode_name


@dataclass
class ComposeSettings:
    """Stage 5's settings; lora_composition.py's flags are built from these fields (cli_flags.add_config_flags)."""
    topk: int = setting(3, rule=COUNT, help="pieces mixed per position (ignored with --sample_top_p and no --sample)")
    agg_temperature: float = setting(1.0, rule=POSITIVE, help="softmax temperature of the mix (and of the draw with "
                                     "--sample --sample_top_p)")
    share_ratio: float = setting(1.0, rule=FRACTION, flag=("--share_ratio", "--shared_ratio"),
                                 help="fraction of sharers each piece position may choose from (seeded random subset)")
    epochs: int = setting(1, rule=COUNT, help="passes over the history")
    batch_size: int = setting(16, rule=COUNT)
    recent_k: int = setting(2000, rule=COUNT, help="history items used to assemble")
    seed: int = setting(0, rule=SEED)
    # the four selection modes of the published code (docs/method.md section 7); --sample and --sample_top_p pick the mode
    sample: bool = setting(False, help="draw the --topk pieces at random instead of taking the best: from the "
                           "--sample_topk best (softmax(score / --sample_temperature)), or with --sample_top_p from the "
                           "nucleus and the --topk best (softmax(score / --agg_temperature))")
    sample_topk: int = setting(10, rule=COUNT, help="with --sample and no --sample_top_p: the candidates drawn from (at "
                               "most the pool)")
    # 0 passes here: only the modes that use it refuse it (check)
    sample_temperature: float = setting(1.0, rule=NON_NEGATIVE, flag_rule=POSITIVE, help="temperature of the "
                                        "nucleus' softmax, and of the draw with --sample and no --sample_top_p")
    # None = unset, as published: it picks the selection mode
    sample_top_p: float | None = setting(None, rule=FRACTION, help="unset by default; set: without --sample, mix the "
                                         "nucleus of the scores (a variable number of pieces, --topk ignored); with "
                                         "--sample, draw from it")
    # beyond the paper (docs/method.md section 7.1); recorded only when not "none", so published recipes stay as they are
    score_calibration: str = setting("none", choices=CALIBRATIONS, help="none (published): the gate scores as they "
                                     "are; center: the mean summary of the reference users (the sharers' own "
                                     "histories, stored by train_anchor_gate.py) subtracted first, so the per-sharer "
                                     "offset every user shares is gone; zscore: center, then each sharer's score "
                                     "divided by its spread over the reference users")

    def __post_init__(self):
        """Every setting in its range, whatever the pool: a nan temperature would make every weight nan (and every
        prediction empty), epochs 0 an all-zero LoRA reported as Per-Pcs. --sample_temperature 0 passes here: only
        the modes that use it refuse it (check)."""
        check_settings(self)

    def recorded(self) -> dict:
        """What a recipe and the run manifest store: every field, but score_calibration only when it is not the
        published "none" (recipes of the published method stay byte-identical)."""
        out = dict(vars(self))
        if out["score_calibration"] == "none":
            del out["score_calibration"]
        return out

    # properties, not fields: a recipe stores recorded(), which must stay as it is
    @property
    def selection(self) -> str:
        """The name of the selection mode (method/selection.py) that --sample and --sample_top_p pick."""
        return mode_name(self.sample, self.sample_top_p)

    @property
    def selection_entry(self) -> SelectionMode:
        return SELECTION_MODES[self.selection]

    @property
    def selection_mode(self) -> int:
        """The published code's number of the mode: 1 top_k, 2 nucleus, 3 sampled_nucleus_top_k, 4 sampled_top_k."""
        return self.selection_entry.number

    def describe(self) -> str:
        return self.selection_entry.describe(self)

    def check(self, pool_size: int) -> None:
        """Refuse, before any model loads, settings that make no sense or that the published code crashed on."""
        self.__post_init__()   # the ranges again: the fields may have been set since
        mode = self.selection_entry
        if mode.uses_sample_temperature and not self.sample_temperature > 0:
            fail(f"--sample_temperature must be positive, got {self.sample_temperature}")
        usable = int(self.share_ratio * pool_size)
        pool = f"{pool_size} sharers" + (f", {usable} with --share_ratio {self.share_ratio}"
                                         if self.share_ratio < 1 else "")
        if usable < 1:
            fail(f"the sharer pool of a piece position is empty ({pool})")
        mode.check(self, usable, pool)


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
        a, b = ab   # b carries the scaling; the small A and B take the activations' dtype, not the other way round
        xa = x @ a.T.to(x.dtype)                                     # (..., r)
        b = b.T.to(out.dtype)
        if out.is_contiguous() and xa.dtype == out.dtype:
            # out += xa @ b in one GEMM over the output (beta 1): no full-size LoRA term, no second pass to add it
            out.view(-1, out.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), b)
            return out
        return out + (xa @ b.to(xa.dtype)).to(out.dtype)


class Composer:
    """Drives assembly: holds the pool, the per-piece share pools and the weight sums; what one forward scores with
    (its answer positions, its micro-batch's lockstep) is per thread, as a micro-batch's forward runs in its own."""

    def __init__(self, pool: PiecePool, settings: ComposeSettings):
        self.pool, self.settings = pool, settings
        self.mode = "off"                 # off | assemble
        self.weight_sum: dict = {}
        self.score_sum: dict = {}         # every sharer's score per piece, summed over batches (diagnostics)
        self.pooled_sum: dict = {}        # the batches' gate summaries per piece, summed (diagnostics)
        self.allowed: dict = {}
        self.generator = torch.Generator()
        self.n_batches = 0
        self.calibration = None           # method/calibration.Calibration with --score_calibration center / zscore
        self._forward = threading.local()   # positions, lockstep, the last input's summary

    # --- per user -------------------------------------------------------------------------------------
    def start_user(self, seed: int) -> None:
        """Fresh sums; share-ratio pools drawn once per user and piece (seeded), serving every batch."""
        S = len(self.pool)
        device = self.pool.A[self.pool.pieces[0]].device
        self.weight_sum = {p: torch.zeros(S, dtype=torch.float64, device=device) for p in self.pool.pieces}
        self.score_sum = {p: torch.zeros(S, dtype=torch.float64, device=device) for p in self.pool.pieces}
        self.pooled_sum = {}   # each piece's width is its module's input: filled at the first batch
        self.n_batches = 0
        rnd = random.Random(seed)
        size = int(self.settings.share_ratio * S)
        self.allowed = {p: torch.tensor(sorted(rnd.sample(range(S), size)) if size < S else list(range(S)),
                                        device=device) for p in self.pool.pieces}
        self.generator.manual_seed(seed)
        self.mode = "assemble"

    def set_batch(self, mask: torch.Tensor, batch_rows: int | None = None, lockstep=None) -> None:
        """The answer-predicting positions of the next forward in this thread, shared by every piece of it.
        A micro-batch: ``batch_rows`` examples in the whole batch, ``lockstep`` (Lockstep, its index) pools its
        summaries with the other micro-batches' before each piece's choice."""
        state = self._forward
        state.positions = None if mask is None else answer_positions(mask, batch_rows)
        state.lockstep = lockstep
        state.last = (None, None)   # (input, its summary): q, k and v read the same input

    def final_weights(self) -> dict:
        return {p: (w / max(self.n_batches, 1)).cpu() for p, w in self.weight_sum.items()}

    def final_scores(self) -> dict:
        """{piece: every sharer's gate score, mean over the user's batches} (the whole pool, also sharers a
        share-ratio pool left out): what the choices were made from, for perpcs.evaluation.gate_scores."""
        return {p: (s / max(self.n_batches, 1)).cpu() for p, s in self.score_sum.items()}

    def final_pooled(self) -> dict:
        """{piece: the user's pooled vector, the mean over its batches of the gate summary} (what the scores are the
        product of with the gates): how much it differs between users says how user-specific the evidence is."""
        return {p: (v / max(self.n_batches, 1)).cpu() for p, v in self.pooled_sum.items()}

    # --- inside the forward ---------------------------------------------------------------------------
    def piece_for(self, piece: str, x: torch.Tensor):
        if self.mode == "off":
            return None
        with torch.autocast(x.device.type, enabled=False):   # scores, softmax and mixing in fp32 (docs/method.md section 7)
            summary = self._summary(x)
            lockstep = self._forward.lockstep
            if lockstep is None:
                return self._decide(piece, summary)
            return lockstep[0].pool(lockstep[1], piece, summary, self._decide)

    def _summary(self, x: torch.Tensor) -> torch.Tensor:
        state = self._forward
        if state.last[0] is not x:   # identity, not equality: the same tensor object, still held here
            state.last = (x, gate_summary(x, state.positions))
        return state.last[1]

    def scores(self, piece: str, x: torch.Tensor) -> torch.Tensor:
        """(S,) score of every sharer at ``piece`` for this forward's positions (gates.gate_scores)."""
        if self.calibration is not None:
            return self._scores_of(piece, gate_summary(x, self._forward.positions))
        return gate_scores(x, self._forward.positions, self.pool.G[piece])

    def _scores_of(self, piece: str, summary: torch.Tensor) -> torch.Tensor:
        """(S,) every sharer's score from a batch's summary: published, or calibrated (--score_calibration)."""
        if self.calibration is None:
            return summary_scores(summary, self.pool.G[piece])
        return self.calibration.scores(piece, summary, self.pool.G[piece])

    def choose(self, piece: str, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the sharers mixed at this position, by the selection mode (method/selection.py); ties in the
        ranking go to the lower sharer index. Draws use the user's generator, in forward order (batches, then
        pieces)."""
        allowed = self.allowed[piece]       # ascending sharer indices: the pool order
        s = scores[allowed].float()
        order = torch.sort(-s, stable=True).indices
        return allowed[self.settings.selection_entry.choose(s, order, self.settings,
                                                 lambda probs, k: self._draw(piece, probs, k))]

    def _draw(self, piece: str, probs: torch.Tensor, k: int) -> torch.Tensor:
        """k indices into probs, without replacement, from the user's generator (on the CPU: the same draws on
        every device)."""
        probs = probs.cpu()
        if int((probs > 0).sum()) < k:   # torch would quietly draw zero-probability categories
            fail(f"piece {piece}: {k} pieces must be drawn without replacement, but only {int((probs > 0).sum())} "
                 f"have a non-zero probability at this temperature: raise --agg_temperature (with --sample_top_p) "
                 f"or --sample_temperature (without)")
        return torch.multinomial(probs, k, replacement=False, generator=self.generator).to(self.allowed[piece].device)

    def _decide(self, piece: str, summary: torch.Tensor):
        """Once per batch and piece, from the batch's summary: every sharer's score, the choice, the mixed A and
        B (B times the LoRA scaling, so the forward adds B(A(x)) as it is)."""
        scores = self._scores_of(piece, summary)
        self.score_sum[piece] += scores.double()
        pooled = self.pooled_sum.get(piece)
        self.pooled_sum[piece] = summary.double() if pooled is None else pooled + summary.double()
        chosen = self.choose(piece, scores)
        w = torch.softmax(scores[chosen] / self.settings.agg_temperature, dim=0)
        self.weight_sum[piece].index_add_(0, chosen, w.double())
        a = torch.einsum("k,krd->rd", w, self.pool.A[piece][chosen])
        b = torch.einsum("k,kdr->dr", w * self.pool.scaling, self.pool.B[piece][chosen])
        return a, b


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


# --- micro-batches -----------------------------------------------------------------------------------------
# A recipe averages per-batch choices, so the published batches stay as they are; only how one batch runs
# changes: its rows, sorted by length, form micro-batches whose forwards advance in lockstep, piece by piece,
# pooling their score summaries before each piece's choice (the batch's scores, up to float order: the same
# choices and weights within 1e-6). The lockstep is per module, not per layer: o_proj's input depends on the q, k
# and v chosen in the same layer. Each micro-batch's forward runs in its own thread and the threads take turns
# (one computes at a time: no oversubscribed cores, a fixed summation order, draws in forward order), handing
# over at each composed module; the last one to arrive decides. Threads rather than a hand-written layer loop:
# the model's own forward runs unchanged, whatever the family's attention and masks.
MICRO_BATCH_OVERHEAD = {"cpu": 32, "cuda": 1024}   # a micro-batch's fixed cost in padded tokens (weight reads, launches)


def micro_batch_overhead(split: bool, device) -> float | None:
    """assemble_user's micro_batch_overhead on ``device``; None (one pass per batch) when not ``split``."""
    return MICRO_BATCH_OVERHEAD.get(torch.device(device).type, MICRO_BATCH_OVERHEAD["cuda"]) if split else None


def micro_batches(lengths: list, overhead: float) -> list:
    """Positions of one batch's rows grouped into micro-batches: the rows sorted longest first, cut into runs so
    that padded tokens + ``overhead`` per run are least (exact, by dynamic programming over the batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):   # order[i:j] the last run: as wide as its first (longest) row
            cost = best[i] + lengths[order[i]] * (j - i) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], len(order)
    while j:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


class _Aborted(Exception):
    """Another micro-batch's thread failed: this one stops."""


class Lockstep:
    """The turns of one batch's micro-batch threads: thread i runs while ``turn`` is i, hands over at each composed
    module (its summary deposited) and at its end; the last thread pools the summaries in micro-batch order and
    decides, every thread then mixes with that decision."""

    def __init__(self, n: int):
        self.n, self.turn, self.done = n, 0, 0
        self.cond = threading.Condition()
        self.parts: list = [None] * n
        self.result, self.error = None, None

    def _wait(self, i: int) -> None:
        while self.turn != i and self.error is None:
            self.cond.wait()
        if self.error is not None:
            raise _Aborted

    def start(self, i: int) -> None:
        with self.cond:
            self._wait(i)

    def pool(self, i: int, piece: str, summary: torch.Tensor, decide):
        with self.cond:
            if self.done:
                raise RuntimeError(f"micro-batch {i} reached piece {piece} after another one had finished its forward")
            self.parts[i] = (piece, summary)
            if i == self.n - 1:
                if any(p != piece for p, _ in self.parts):
                    raise RuntimeError(f"micro-batches met different pieces: {[p for p, _ in self.parts]}")
                total = self.parts[0][1]
                for _, part in self.parts[1:]:
                    total = total + part
                self.result = decide(piece, total)
            self.turn = (i + 1) % self.n
            self.cond.notify_all()
            self._wait(i)
            return self.result

    def finish(self, i: int) -> None:
        with self.cond:
            self.done += 1
            self.turn = (i + 1) % self.n
            self.cond.notify_all()

    def abort(self, err: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = err
            self.cond.notify_all()


def _lockstep_forward(decoder, composer: Composer, parts: list, batch_rows: int, pad_id: int, device,
                      cpu_bf16: bool) -> None:
    """One batch as micro-batches (lists of its examples), each forward in its thread, in lockstep."""
    from perpcs.engine.training import collate
    from perpcs.models.devices import autocast_context
    lock, threads = Lockstep(len(parts)), torch.get_num_threads()

    def work(i: int, rows: list) -> None:
        try:
            torch.set_num_threads(threads)   # a new thread would start from the default
            lock.start(i)
            batch = collate(rows, pad_id, device)
            composer.set_batch(answer_predicting_mask(batch["labels"]), batch_rows, (lock, i))
            with torch.no_grad(), autocast_context(device, cpu_bf16):   # both are per thread
                decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            composer.set_batch(None)
            lock.finish(i)
        except BaseException as err:   # noqa: BLE001 (handed to the caller's thread below)
            lock.abort(err)

    workers = [threading.Thread(target=work, args=(i, rows), daemon=True) for i, rows in enumerate(parts)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if lock.error is not None:
        raise lock.error


@torch.no_grad()
def assemble_user(model, composer: Composer, tokenized: list, pad_id: int, device, seed: int,
                  who: str = "user", cpu_bf16: bool = False, micro_batch_overhead: float | None = None) -> tuple:
    """Assemble one user's LoRA from its tokenized examples; returns (weights per piece, batches).

    Examples without an answer-predicting position are dropped with a warning that names them.
    ``micro_batch_overhead`` None: each batch in one forward, as published; else (MICRO_BATCH_OVERHEAD of the
    device) each batch as length-sorted micro-batches in lockstep, the same batches, less padding.
    """
    from perpcs.engine.training import collate
    from perpcs.models.devices import autocast_context
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
    try:
        for _ in range(settings.epochs):
            order = [usable[j] for j in torch.randperm(len(usable), generator=generator).tolist()]
            for s in range(0, len(order), settings.batch_size):
                idx = order[s:s + settings.batch_size]
                rows = [tokenized[i] for i in idx]
                runs = ([list(range(len(rows)))] if micro_batch_overhead is None else
                        micro_batches([len(t.input_ids) for t in rows], micro_batch_overhead))
                if len(runs) > 1:
                    _lockstep_forward(decoder, composer, [[rows[r] for r in run] for run in runs], len(rows),
                                      pad_id, device, cpu_bf16)
                else:   # the published single pass
                    batch = collate(rows, pad_id, device)
                    composer.set_batch(answer_predicting_mask(batch["labels"]))
                    with autocast_context(device, cpu_bf16):
                        decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False)
                composer.n_batches += 1
                batches.append(idx)
    finally:
        composer.set_batch(None)
        composer.mode = "off"
    return composer.final_weights(), batches
