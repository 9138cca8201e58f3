"""The fine-tuning loop shared by the task LoRA, sharer LoRAs, gates and OPPU (docs/method.md section 5).

AdamW (0.9, 0.95), the published runs' cosine schedule by fractional epoch with no warm-up (docs/method.md section 5, see
``epoch_cosine_lr``), gradient-norm clip, gradient accumulation, optional gradient checkpointing, loss on answer
tokens only. Whatever parameters have ``requires_grad`` train: LoRA weights for adapters, gate vectors for gates.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from perpcs.atomic import write_bytes_atomic
from perpcs.checks import COUNT, NON_NEGATIVE, POSITIVE, SEED, check_settings, setting
from perpcs.data.prompts import MAX_SEQ_LEN_HELP, Example
from perpcs.data.truncation import count_cuts, fit_example
from perpcs.errors import fail
from perpcs.models.devices import autocast_context

IGNORE_INDEX = -100


@dataclass
class TrainConfig:
    """A fine-tuning run. Each stage's defaults are its own config's (perpcs/stages/config.py); the scripts' flags
    are built from these fields (cli_flags.add_config_flags)."""
    lr: float = setting(1e-4, rule=NON_NEGATIVE, flag_rule=POSITIVE)   # 0 passes here, to measure the loss only
    weight_decay: float = setting(0.01, rule=NON_NEGATIVE)
    batch_size: int = setting(6, rule=COUNT)
    accum_iter: int = setting(1, rule=COUNT, help="gradient accumulation micro-batches per step")
    epochs: int = setting(3, rule=COUNT, help="length of the cosine lr schedule in epochs (docs/method.md section 5), and of the run "
                          "unless --max_step is set")
    max_step: int | None = setting(None, rule=COUNT, help="run exactly this many optimizer steps, repeating epochs as "
                                   "needed; the lr keeps following the cosine over --epochs past its end (it rises "
                                   "again)")
    clip: float = setting(0.3, rule=POSITIVE, help="gradient-norm clip")
    max_seq_len: int = setting(3000, rule=COUNT, help=MAX_SEQ_LEN_HELP)
    grad_ckpt: bool = setting(True, help="gradient checkpointing (less memory, ~30% slower)")
    seed: int = setting(0, rule=SEED)
    betas: tuple = setting((0.9, 0.95), cli=False)
    cpu_bf16: bool = setting(False, shared=True)   # --cpu_bf16 of the model's flags
    # False, as published: a fresh random order each epoch. True: batches of similar lengths (far less padding,
    # the same examples per epoch, but other batches than the published loops'); opt-in, for speed
    group_by_length: bool = setting(False, help="opt-in speed flag: batch examples of similar length together (less "
                                    "padding). It changes the batches vs the published code, whose loops shuffle; "
                                    "off (default): a fresh random order each epoch, seeded per user from --seed (the "
                                    "published generator was unseeded, so its exact order cannot be matched)")

    def __post_init__(self):
        """Bad settings fail here, before a model is loaded (zero steps would save an untrained adapter; nan
        anything would train nothing). lr 0 passes here, for a caller that measures the loss without learning;
        the scripts' --lr must be positive (flag_rule)."""
        check_settings(self)


def user_seed(seed: int, user: str) -> int:
    """A per-user seed, so a user's result does not depend on which users ran before it or in which shard."""
    import hashlib
    digest = hashlib.sha256(f"{seed}:{user}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class Tokenized:
    input_ids: list
    labels: list
    source: str
    cut: tuple = ()   # the parts shortening took off to fit max_seq_len (perpcs/truncation.py), () if none

    @property
    def n_answer(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def tokenize_example(tokenizer, example: Example, max_seq_len: int, add_eos: bool = True) -> Tokenized:
    """Prompt + answer (+ EOS) token ids; labels are -100 on the prompt, so the loss sees the answer only.

    Too long: the example is fitted as generation fits prompts (truncation.fit_example: retrieved history,
    then article words, then profile words go); if the instruction and answer alone are still too long, the
    prompt is cut from the left after BOS, keeping the answer.
    """
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []

    def fits(ex: Example) -> bool:
        return len(tokenizer(ex.prompt + ex.answer, add_special_tokens=True)["input_ids"]) + len(eos) <= max_seq_len

    full_ids = tokenizer(example.prompt + example.answer, add_special_tokens=True)["input_ids"]
    cut = ()
    if len(full_ids) + len(eos) > max_seq_len:
        example, cut = fit_example(example, fits)
        full_ids = tokenizer(example.prompt + example.answer, add_special_tokens=True)["input_ids"]
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    n_prompt = len(prompt_ids)
    if full_ids[:n_prompt] != prompt_ids:   # a token merged across the boundary: use the common prefix
        n_prompt = next(i for i, (a, b) in enumerate(zip(full_ids, prompt_ids)) if a != b)
    full_ids = full_ids + eos
    labels = [IGNORE_INDEX] * n_prompt + full_ids[n_prompt:]
    if len(full_ids) > max_seq_len:
        keep_bos = 1 if tokenizer.bos_token_id is not None and full_ids[0] == tokenizer.bos_token_id else 0
        cut_n = len(full_ids) - max_seq_len
        full_ids = full_ids[:keep_bos] + full_ids[keep_bos + cut_n:]
        labels = labels[:keep_bos] + labels[keep_bos + cut_n:]
    return Tokenized(full_ids, labels, example.source, cut)


def collate(batch: list, pad_id: int, device=None) -> dict:
    """Right-padded tensors; padding masked in attention and labels."""
    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, t in enumerate(batch):
        n = len(t.input_ids)
        ids[row, :n] = torch.tensor(t.input_ids)
        labels[row, :n] = torch.tensor(t.labels)
        mask[row, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def make_batches(n: int, batch_size: int, generator: torch.Generator, lengths=None) -> list:
    """One epoch's index batches: a fresh permutation of all n examples from ``generator``, cut into batches in
    order (the published loops' shuffled sampler; their generator was unseeded, ours is the per-user seed, so
    the order is reproducible but not theirs). Called once per epoch with the same generator, each epoch gets
    a new order.

    With lengths (``--group_by_length``, opt-in): batches hold similar lengths (shuffled among themselves);
    sorting within windows of 16 batches, so an epoch still sees every example once and batch composition stays
    random at a coarse scale, but the batches are not the published loops' (less padding, other gradients).
    """
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is not None:
        window = batch_size * 16
        order = [i for s in range(0, n, window)
                 for i in sorted(order[s:s + window], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if lengths is not None:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def epoch_cosine_lr(x: float, epochs: int, base_lr: float, min_lr: float = 0.0) -> float:
    """docs/method.md section 5: the lr set after an optimizer step taken at fractional epoch x = j / L + e (loader step j of
    epoch e, L loader batches per epoch). x is not capped at ``epochs``: past it the cosine rises again."""
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * x / epochs))


def count_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps of a run: max_step when set (epochs repeat as long as needed), else every epoch's
    ceil(L / accum_iter) updates (the short window at an epoch's end is one update)."""
    if cfg.max_step is not None:
        return cfg.max_step
    return cfg.epochs * math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.accum_iter)


PROGRESS_WINDOW = 10   # optimizer steps the progress bar's loss averages over


def progress_loss(step_losses: list, window: int = PROGRESS_WINDOW) -> str:
    """The progress bar's loss, saying what it is: a mean over the last steps smooths the noise of one batch, and
    so differs from the last step's loss that the stages print at the end ("last loss")."""
    recent = step_losses[-window:]
    return f"loss (avg of last {len(recent)} steps) {float(np.mean(recent)):.4f}"


def answer_loss_sum(model, batch: dict) -> tuple:
    """(sum of cross-entropy over answer tokens, number of answer tokens).

    The LM head runs only where a label is: for a 49k-vocabulary model on short answers that is ~30% of the
    training FLOPs. sum / count equals the HF loss with -100 labels.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state[:, :-1]
    logits = base.get_output_embeddings()(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum"), int(keep.sum())


def answer_loss(model, batch: dict) -> torch.Tensor:
    total, count = answer_loss_sum(model, batch)
    return total / max(count, 1)


def _world():
    """(rank, world size) when running data-parallel under torchrun, else (0, 1)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device(value: torch.Tensor) -> torch.device:
    """Where a tensor must be for a collective: NCCL reduces GPU tensors only, gloo takes either."""
    import torch.distributed as dist
    if value.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return value.device


def _all_reduce(value: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks (a no-op in one process); the result is on ``value``'s device. Only for the per-step
    statistics (loss, answer tokens, tokens): gradients are reduced by DistributedDataParallel."""
    import torch.distributed as dist
    if _world()[1] > 1:
        moved = value.to(_collective_device(value))
        dist.all_reduce(moved)
        if moved is not value:
            value.copy_(moved)
    return value


class _AnswerLoss(torch.nn.Module):
    """What DistributedDataParallel wraps: ``answer_loss_sum`` of ``model``, owning only the parameters that train.

    DDP broadcasts every parameter and buffer of the module it wraps when it starts and reduces the gradients of
    those that require grad; registering just the trained ones (LoRA: a few MB) keeps it from sending the frozen
    base (14 GB on a 7B) to every rank. ``model`` is kept outside the module tree for that reason.
    """

    def __init__(self, model, params: list):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)
        object.__setattr__(self, "model", model)

    def forward(self, batch: dict) -> tuple:
        return answer_loss_sum(self.model, batch)


def _checkpointing(model, on: bool) -> None:
    """Gradient (activation) checkpointing, non-reentrant so frozen inputs need no requires_grad hack."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        if hasattr(base, "activation_checkpointing_enable"):   # transformers >= 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    else:
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()


class StepLog:
    """A training's rows in a train_log.jsonl that the shards of a stage share (they append to one file).

    A training's rows are those with its ``desc`` (one per user and stage, e.g. "OPPU 17"). When it starts, rows an
    earlier attempt left (a run killed during that user's training, then resumed) are dropped, so the file holds one
    set of rows per training; rows a kill tore in half go too. The rewrite and every append hold one lock (a file
    beside the log, ``train_log.jsonl.lock``): another shard's append never lands in a file being replaced."""

    def __init__(self, path, desc: str):
        from filelock import FileLock

        self.path, self.desc = Path(path), desc
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.path) + ".lock")
        with self.lock:
            if self.path.is_file():
                lines = self.path.read_text(encoding="utf-8").splitlines()
                kept = [line for line in lines if self._keep(line)]
                if len(kept) != len(lines):
                    write_bytes_atomic(self.path, "".join(line + "\n" for line in kept).encode("utf-8"))

    def _keep(self, line: str) -> bool:
        try:
            row = json.loads(line)
        except ValueError:
            return False   # half a row: a kill during its write
        return not (isinstance(row, dict) and row.get("desc") == self.desc)

    def write(self, row: dict) -> None:
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def train(model, tokenizer, examples: list, cfg: TrainConfig, device: torch.device,
          desc: str = "train", log_path: Path | None = None, show_progress: bool = True) -> dict:
    """Train the parameters of ``model`` that require grad on ``examples``; returns loss/speed stats.

    A non-finite loss stops with an error naming ``desc`` and the step; the caller saves nothing then.
    """
    from transformers import set_seed

    if not examples:
        fail(f"{desc}: no training examples (empty history?)")
    set_seed(cfg.seed)   # Python's, numpy's and torch's generators (CPU and every accelerator)
    tokenized = [tokenize_example(tokenizer, ex, cfg.max_seq_len) for ex in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        fail(f"{desc}: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    total_steps = count_steps(len(tokenized), cfg)
    rank, world = _world()
    ddp = None
    if world > 1:   # data parallel: torch's DDP reduces the gradients, bucketed and overlapped with the backward
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters off: every trained parameter (LoRA A/B, gate vectors) is used in every forward,
        # and non-reentrant checkpointing recomputes without a second gradient per parameter, so no static_graph
        ddp = DistributedDataParallel(_AnswerLoss(model, params), find_unused_parameters=False)
    if cfg.grad_ckpt:
        _checkpointing(model, True)
    model.train()
    generator = torch.Generator().manual_seed(cfg.seed)
    lengths = [len(t.input_ids) for t in tokenized] if cfg.group_by_length else None
    log = StepLog(log_path, desc) if log_path and rank == 0 else None
    bar = tqdm(total=total_steps, desc=desc, disable=not show_progress, leave=False)
    state = {"step": 0, "micro": 0, "losses": [], "tokens": 0, "step_losses": []}   # tokens: all ranks together
    t0 = time.perf_counter()

    def optimizer_step(x: float) -> None:
        """Clip, step, log (gradients already averaged over ranks by DDP); then set the lr of the next step from
        the fractional epoch x of this one (docs/method.md section 5: the first step uses the base lr)."""
        lr = optimizer.param_groups[0]["lr"]   # the lr this step uses, as logged
        if state["micro"] < cfg.accum_iter:   # a short window at the epoch's end: still a mean, not a part
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(cfg.accum_iter / state["micro"])
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        if not torch.isfinite(norm):   # a finite loss can still overflow in the backward (bf16)
            fail(f"{desc}: non-finite gradient norm ({float(norm)}) at step {state['step'] + 1}; nothing was "
                 f"saved (try a lower --lr)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = epoch_cosine_lr(x, cfg.epochs, cfg.lr)
        state["step"] += 1
        step_loss = float(np.mean(state["losses"][-state["micro"]:]))
        state["micro"] = 0
        state["step_losses"].append(step_loss)
        bar.update(1)
        bar.set_postfix_str(progress_loss(state["step_losses"]))
        if log:
            elapsed = time.perf_counter() - t0
            log.write({"desc": desc, "step": state["step"], "loss": step_loss, "lr": lr,
                       "tokens": state["tokens"], "tokens_per_s": state["tokens"] / max(elapsed, 1e-9)})

    try:
        epoch = 0
        # with max_step, epochs repeat until max_step updates are taken; without, exactly cfg.epochs epochs
        while state["step"] < total_steps and (cfg.max_step is not None or epoch < cfg.epochs):
            batches = make_batches(len(tokenized), cfg.batch_size, generator, lengths)
            for j, batch_idx in enumerate(batches):   # j: loader step (one global batch) within the epoch
                mine = batch_idx[rank::world]     # every rank sees the same global batches, a slice each
                # a global batch smaller than the world leaves a rank nothing: it runs a row without answer tokens
                # (loss 0, zero gradients), since DDP reduces only once every rank's backward has run
                batch = collate([tokenized[i] for i in mine] or [Tokenized([pad_id] * 2, [IGNORE_INDEX] * 2, "")],
                                pad_id, device)
                closes = state["micro"] + 1 == cfg.accum_iter or j == len(batches) - 1   # the window's last micro
                with ddp.no_sync() if ddp is not None and not closes else contextlib.nullcontext():
                    with autocast_context(device, cfg.cpu_bf16):
                        loss_sum, count = ddp(batch) if ddp is not None else answer_loss_sum(model, batch)
                    tokens = int(batch["attention_mask"].sum()) if mine else 0
                    # loss, answer tokens and tokens of the whole global batch (one small collective per micro-step)
                    stats = _all_reduce(torch.tensor([float(loss_sum.detach()), float(count), float(tokens)],
                                                     dtype=torch.float64))
                    global_loss = float(stats[0] / max(stats[1], 1.0))
                    if not math.isfinite(global_loss):
                        fail(f"{desc}: non-finite loss ({global_loss}) at step {state['step'] + 1}, epoch "
                             f"{epoch + 1}; nothing was saved (try a lower --lr)")
                    # normalised by the global batch's answer tokens; DDP averages (divides the sum over ranks by
                    # world), so the factor world makes the reduced gradient sum_r grad(loss_sum_r) / N: the
                    # gradient one process gets from the whole global batch's mean
                    (loss_sum * world / max(float(stats[1]), 1.0) / cfg.accum_iter).backward()
                state["tokens"] += int(stats[2])
                state["losses"].append(global_loss)
                state["micro"] += 1
                if closes:   # an update every accum_iter loader steps, and a short window's at the epoch's end
                    optimizer_step(j / len(batches) + epoch)
                    if state["step"] >= total_steps:
                        break
            epoch += 1
    finally:
        bar.close()
        if cfg.grad_ckpt:
            _checkpointing(model, False)
        model.eval()
    elapsed = time.perf_counter() - t0
    losses, tokens = state["losses"], state["tokens"]
    # next_lr: what the schedule set after the last step, used by no step (after --epochs alone: f(epochs - 1/L), not 0)
    return {"steps": state["step"], "next_lr": optimizer.param_groups[0]["lr"],
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "mean_loss": float(np.mean(losses)) if losses else None,
            "seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
            "truncated": count_cuts([t.cut for t in tokenized], cfg.max_seq_len)}
