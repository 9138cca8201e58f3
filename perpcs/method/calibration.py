"""Beyond the paper (opt-in, docs/method.md section 7.1): the input side of the composition's score without
composing, and what is built on it.

The composition scores sharer s at a piece from one vector per batch, gate_summary (the weighted sum of
LayerNorm(x_t) over the answer-predicting positions, method/gates.py), dotted with LN(g_s) / sqrt(d). A batch's
summary is the mean of its examples' own summaries (the weights are 1 / (examples x the example's positions)),
so per-example summaries give every batch's exactly: the core below (example_summaries) computes them once for a
set of examples, by running base + task model with no pieces and hooking every piece's input.

Two uses:
- score calibration (stage 5 ``--score_calibration``): the reference population's mean summary per piece
  (Calibration: centre, optionally z-score each sharer's score over the reference users);
- the routing objective (stage 4 ``--gate_objective routing``, fit_routing_gates): every sharer's gates trained
  together so that this score ranks the owner of a batch of examples first.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from perpcs.errors import fail
from perpcs.method.gates import (LN_EPS, answer_positions, answer_predicting_mask, gate_summary, normalised_gates,
                                 summary_scores)

CALIBRATIONS = ("none", "center", "zscore")
OBJECTIVES = ("published", "routing")
SUMMARY_FILE = "summary.safetensors"   # beside a sharer's gates: its mean summary per piece
HELD_OUT = 0.2                          # share of each sharer's examples the routing fit keeps out to report on


# ---- the core: per-example summaries without composition ------------------------------------------------

def per_example_positions(mask: torch.Tensor) -> tuple:
    """answer_positions for one example per row: (rows, cols, W) with W (batch, N) one row per example, so that
    gate_summary's ``W @ LN(x)`` gives every example's own mean over its answer-predicting positions."""
    rows, cols, w = answer_positions(mask, batch_rows=1)
    weights = torch.zeros(mask.shape[0], rows.numel(), device=w.device)
    weights[rows, torch.arange(rows.numel(), device=w.device)] = w
    return rows, cols, weights


@torch.no_grad()
def example_summaries(model, pieces: list, tokenized: list, pad_id: int, device, batch_size: int = 8,
                      cpu_bf16: bool = False) -> dict:
    """{piece: (n, d) fp32 on the CPU}: each usable example's gate_summary at each piece's input, on ``model`` as it
    is (base + task model: no piece installed). Examples without an answer-predicting position are left out, as
    the assembly leaves them out of its scores."""
    from perpcs.engine.training import collate
    from perpcs.models.devices import autocast_context
    usable = [t for t in tokenized if t.n_answer > 0 and len(t.input_ids) >= 2]
    if not usable:
        fail("no example with an answer token to summarise")
    modules = dict(model.named_modules())
    missing = [p for p in pieces if p not in modules]
    if missing:
        fail(f"the model has no module {missing[0]!r} (of {len(missing)} pieces): another base model?")
    out = {p: [] for p in pieces}
    state = {}

    def hook(piece):
        def pre(module, args):
            out[piece].append(gate_summary(args[0], state["positions"]).cpu())
        return pre

    handles = [modules[p].register_forward_pre_hook(hook(p)) for p in pieces]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(usable), batch_size):
            batch = collate(usable[s:s + batch_size], pad_id, device)
            state["positions"] = per_example_positions(answer_predicting_mask(batch["labels"]))
            with autocast_context(device, cpu_bf16):
                decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {p: torch.cat(v).float().contiguous() for p, v in out.items()}


# ---- score calibration (stage 5) -------------------------------------------------------------------------

class Calibration:
    """What ``--score_calibration`` subtracts (and divides by) before a piece's scores rank the sharers.

    ``means``: every reference user's mean summary {piece: (d,)} (the sharers' own histories). center: the summary
    minus the reference mean m (score_s - m . LN(g_s) / sqrt(d): the per-sharer offset every user shares, gone);
    zscore: that centred score divided by sharer s's spread (standard deviation) over the reference users."""

    def __init__(self, kind: str, means: list, gates: dict):
        if kind not in CALIBRATIONS[1:]:
            fail(f"unknown score calibration {kind!r}; use one of {', '.join(CALIBRATIONS)}")
        self.kind = kind
        self.reference = {p: torch.stack([m[p].float() for m in means]).mean(0) for p in gates}
        self.spread = {}
        if kind == "zscore":
            if len(means) < 2:
                fail("--score_calibration zscore needs at least 2 reference users (sharers) to measure a spread")
            for p, g in gates.items():
                centred = torch.stack([m[p].float() for m in means]) - self.reference[p]   # (U, d)
                spread = summary_scores(centred.to(g.device), g).std(dim=0)                  # (S,)
                self.spread[p] = spread.clamp(min=1e-12)   # a sharer whose score never moves: no division by 0

    def to(self, device) -> "Calibration":
        self.reference = {p: v.to(device) for p, v in self.reference.items()}
        self.spread = {p: v.to(device) for p, v in self.spread.items()}
        return self

    def scores(self, piece: str, summary: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """(S,) calibrated scores of a batch's summary (a batch's summary is a mean, so the reference mean
        subtracts from it as from each example's)."""
        scores = summary_scores(summary - self.reference[piece].to(summary.device), gates)
        return scores / self.spread[piece] if self.kind == "zscore" else scores


# ---- the routing objective (stage 4) ---------------------------------------------------------------------

def split_held_out(n: int, seed: int) -> tuple:
    """(train, held-out) example indices of one sharer: a seeded HELD_OUT share held out (none below 2 examples)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = int(round(HELD_OUT * n)) if n >= 2 else 0
    k = max(k, 1) if n >= 2 else 0
    return sorted(order[k:]), sorted(order[:k])


def batch_means(x: torch.Tensor, idx: list, batch_size: int, generator: torch.Generator, n_batches: int):
    """(n_batches, d): means of random batches of ``batch_size`` examples (fewer if the sharer has fewer) drawn
    from x[idx]: the summaries of batches as the assembly forms them."""
    size = min(batch_size, len(idx))
    pick = torch.stack([torch.randperm(len(idx), generator=generator)[:size] for _ in range(n_batches)])
    return x[torch.tensor(idx)[pick]].mean(dim=1)


def fixed_batches(x: torch.Tensor, idx: list, batch_size: int) -> torch.Tensor:
    """(B, d): the means of idx in order, cut into batches (the held-out batches reported on)."""
    return torch.stack([x[idx[s:s + batch_size]].mean(0) for s in range(0, len(idx), batch_size)])


def fit_routing_gates(summaries: list, steps: int, lr: float, temperature: float, batch_size: int, seed: int,
                      log=None) -> tuple:
    """Every sharer's gates of every piece, trained together: ``summaries`` is, per sharer (pool order), {piece:
    (n_s, d)} of its examples (example_summaries). Per piece, the score the composition uses
    (summary_scores(batch summary, normalised_gates)) of every sharer for a batch of sharer u's examples, softmax
    over sharers at ``temperature``, cross-entropy to u; Adam, ``steps`` steps, every sharer's batches in each.
    Returns ({piece: (S, d) raw gates}, report): the report holds top-1 owner accuracy on train and held-out
    batches (mean over pieces) and the loss. Gates start from a seeded normal draw (LN of a zero gate is 0/0)."""
    S = len(summaries)
    if S < 2:
        fail("--gate_objective routing ranks sharers against each other: it needs at least 2 sharers")
    pieces = list(summaries[0])
    splits = [split_held_out(next(iter(s.values())).shape[0], seed + i) for i, s in enumerate(summaries)]
    if any(not tr for tr, _ in splits):
        fail("--gate_objective routing: a sharer has no example to train on")
    generator = torch.Generator().manual_seed(seed)
    gates, report = {}, {"pieces": {}}
    per_step = max(1, 64 // S)   # batches per sharer per step: every step sees every sharer
    owners = torch.arange(S).repeat_interleave(per_step)
    for piece in pieces:
        xs = [s[piece].float() for s in summaries]
        d = xs[0].shape[1]
        g = torch.nn.Parameter(torch.randn(S, d, generator=generator))
        opt = torch.optim.Adam([g], lr=lr)
        for _ in range(steps):
            batch = torch.cat([batch_means(x, tr, batch_size, generator, per_step) for x, (tr, _) in zip(xs, splits)])
            logits = summary_scores(batch, F.layer_norm(g, (d,), eps=LN_EPS)) / temperature
            loss = F.cross_entropy(logits, owners)
            opt.zero_grad()
            loss.backward()
            opt.step()
        final = g.detach().contiguous()
        gates[piece] = final
        report["pieces"][piece] = {"loss": float(loss.detach()), **_accuracy(final, xs, splits, batch_size)}
    for key in ("train_top1", "held_out_top1", "loss"):
        values = [r[key] for r in report["pieces"].values() if r.get(key) is not None]
        report[key] = sum(values) / len(values) if values else None
    report["chance_top1"] = 1 / S
    if log is not None:
        log(report)
    return gates, report


def _accuracy(gates: torch.Tensor, xs: list, splits: list, batch_size: int) -> dict:
    """Top-1 owner rate of the score over fixed batches of each sharer's train and held-out examples."""
    normed = normalised_gates([{"g": row} for row in gates], "g")
    out = {}
    for name, which in (("train_top1", 0), ("held_out_top1", 1)):
        hits = total = 0
        for owner, (x, split) in enumerate(zip(xs, splits)):
            if not split[which]:
                continue
            top = summary_scores(fixed_batches(x, split[which], batch_size), normed).argmax(dim=1)
            hits, total = hits + int((top == owner).sum()), total + top.numel()
        out[name] = hits / total if total else None
    return out


def routing_report_line(report: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"
    return (f"routing gates: top-1 owner rate {pct(report['held_out_top1'])} on held-out batches, "
            f"{pct(report['train_top1'])} on training batches (chance {pct(report['chance_top1'])}), "
            f"mean final loss {report['loss']:.4f}")

