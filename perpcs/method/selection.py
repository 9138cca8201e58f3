"""The selection modes of stage 5 (docs/method.md section 7): which sharers' pieces are mixed at one position.

One named function per mode, each with its description and its settings checks, in ONE table (SELECTION_MODES).
Two flags pick the mode, as in the published code: --sample (draw or not) and whether --sample_top_p is set
(nucleus or not). The published code numbered the modes 1-4; the number stays on each entry because the stage
prints it ("selection mode 1: ...").

A mode's ``choose(s, order, settings, draw)`` gets the scores ``s`` of the sharers allowed at this piece (pool
order), ``order`` (the stable descending ranking of s: ties go to the lower sharer index) and ``draw(probs, k)``
(k indices into probs without replacement, from the user's seeded generator); it returns indices into s.
To add a mode: write its three functions and add an entry (and the flags that pick it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from perpcs.errors import fail


@dataclass(frozen=True)
class SelectionMode:
    number: int                       # the published code's mode number, printed by describe
    sample: bool                      # the flags that pick this mode: --sample ...
    top_p: bool                       # ... and --sample_top_p set
    uses_sample_temperature: bool     # --sample_temperature 0 is refused only by the modes that use it
    choose: Callable                  # (s, order, settings, draw) -> indices into s
    describe: Callable                # settings -> the line stage 5 prints
    check: Callable                   # (settings, usable sharers, pool text) -> None, or fail


def nucleus_size(sorted_scores: torch.Tensor, temperature: float, top_p: float) -> int:
    """Leading positions of descending scores that form the nucleus: c = cumsum(softmax(s / temperature)) in fp32;
    a position is dropped when the previous one already has c > top_p, so the first one always stays."""
    c = torch.cumsum(torch.softmax(sorted_scores.float() / temperature, dim=0), dim=0)
    return 1 + int((c[:-1] <= top_p).sum())   # c never decreases: the kept positions are a prefix


# ---- the modes ---------------------------------------------------------------------------------------------

def top_k(s, order, st, draw):
    """The --topk best."""
    return order[:st.topk]


def nucleus(s, order, st, draw):
    """The nucleus of softmax(s / --sample_temperature) at --sample_top_p: a variable number of pieces."""
    return order[:nucleus_size(s[order], st.sample_temperature, st.sample_top_p)]


def sampled_nucleus_top_k(s, order, st, draw):
    """--topk drawn from softmax(s / --agg_temperature) over the nucleus and the --topk best (pool order)."""
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[nucleus(s, order, st, draw)] = True
    keep[order[:st.topk]] = True              # the k best stay whatever the nucleus
    probs = torch.softmax(s.masked_fill(~keep, -math.inf) / st.agg_temperature, dim=0)   # pool order
    return draw(probs, st.topk)


def sampled_top_k(s, order, st, draw):
    """--topk drawn from softmax(s / --sample_temperature) over the --sample_topk best (best first)."""
    cand = order[:st.sample_topk]
    probs = torch.softmax(s[cand] / st.sample_temperature, dim=0)
    return cand[draw(probs, st.topk)]


# ---- their descriptions --------------------------------------------------------------------------------------

def _describe_top_k(st) -> str:
    return f"mode 1: the top {st.topk} pieces per position, mixed by softmax(score / {st.agg_temperature})"


def _describe_nucleus(st) -> str:
    return (f"mode 2: the nucleus (top-p {st.sample_top_p}, temperature {st.sample_temperature}) of the scores, a "
            f"variable number of pieces per position (--topk ignored), mixed by softmax(score / {st.agg_temperature})")


def _describe_sampled_nucleus_top_k(st) -> str:
    k, t = st.topk, st.agg_temperature
    return (f"mode 3: {k} pieces drawn from softmax(score / {t}) over the nucleus (top-p {st.sample_top_p}, "
            f"temperature {st.sample_temperature}) and the top {k}, mixed by softmax(score / {t})")


def _describe_sampled_top_k(st) -> str:
    return (f"mode 4: {st.topk} pieces drawn from softmax(score / {st.sample_temperature}) over the "
            f"{st.sample_topk} best, mixed by softmax(score / {st.agg_temperature})")


# ---- their checks (after the common ones: ranges, a non-empty pool) -------------------------------------------

def _check_topk(st, usable: int, pool: str) -> None:
    if st.topk > usable:
        fail(f"--topk {st.topk} is larger than the sharer pool ({pool})")


def _check_nothing(st, usable: int, pool: str) -> None:
    """The nucleus ignores --topk."""


def _check_sampled_top_k(st, usable: int, pool: str) -> None:
    _check_topk(st, usable, pool)
    # the published code crashed on both, after loading the model
    if st.sample_topk > usable:
        fail(f"--sample_topk {st.sample_topk} is larger than the sharer pool ({pool}): --sample without "
             f"--sample_top_p draws from the --sample_topk best sharers; lower --sample_topk")
    if st.topk > st.sample_topk:
        fail(f"--topk {st.topk} is larger than --sample_topk {st.sample_topk}: --sample without "
             f"--sample_top_p draws --topk pieces from the --sample_topk best")


SELECTION_MODES = {
    "top_k": SelectionMode(1, sample=False, top_p=False, uses_sample_temperature=False, choose=top_k,
                           describe=_describe_top_k, check=_check_topk),
    "nucleus": SelectionMode(2, sample=False, top_p=True, uses_sample_temperature=True, choose=nucleus,
                             describe=_describe_nucleus, check=_check_nothing),
    "sampled_nucleus_top_k": SelectionMode(3, sample=True, top_p=True, uses_sample_temperature=True,
                                           choose=sampled_nucleus_top_k,
                                           describe=_describe_sampled_nucleus_top_k, check=_check_topk),
    "sampled_top_k": SelectionMode(4, sample=True, top_p=False, uses_sample_temperature=True, choose=sampled_top_k,
                                   describe=_describe_sampled_top_k, check=_check_sampled_top_k),
}


def mode_name(sample: bool, sample_top_p) -> str:
    """The mode the two flags pick (--sample_top_p None = unset, as published)."""
    picked = (bool(sample), sample_top_p is not None)
    return next(name for name, m in SELECTION_MODES.items() if (m.sample, m.top_p) == picked)
