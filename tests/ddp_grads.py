"""Run by tests/test_scaleout.py, as one process or under torchrun: trains a LoRA on the tiny model with train()
and saves, per rank, the gradient of every parameter at every optimizer step (after the reduction over ranks) and
how many gradient buckets DistributedDataParallel all-reduced.

usage: ddp_grads.py MODEL_DIR OUT_DIR
"""
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perpcs.models.loading import load_base_model  # noqa: E402
from perpcs.models.lora import lora_config  # noqa: E402
from perpcs.data.prompts import Example  # noqa: E402
from perpcs.engine.training import TrainConfig, train  # noqa: E402
from transformers import set_seed  # noqa: E402

# 7 examples in batches of 3: two 3-example batches (split 2/1) and one of 1 that leaves rank 1 nothing; answers of
# 1 to 3 words, so the ranks' answer-token counts differ and a per-rank mean would not equal the global one.
# With accum_iter 2 an epoch is one full window (the first micro-step under no_sync) and one short window.
EXAMPLES = [Example(f"Review {i}: " + "fine " * (i % 4) + "Score:", " " + " ".join(["yes"] * (i % 3 + 1)))
            for i in range(7)]
CONFIG = TrainConfig(lr=1e-2, batch_size=3, accum_iter=2, epochs=2, max_seq_len=64, clip=1e9, seed=0)


def main(model_dir: str, out: Path) -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:   # a short timeout: a rank left waiting fails instead of hanging
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    reductions = []
    ddp_class = torch.nn.parallel.DistributedDataParallel

    class CountingDDP(ddp_class):   # the default all-reduce (sum / world), counted
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                reductions.append(bucket.index())
                return allreduce_hook(state, bucket)
            self.register_comm_hook(None, hook)

    torch.nn.parallel.DistributedDataParallel = CountingDDP
    steps = []
    register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: steps.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))

    from peft import get_peft_model
    model, tokenizer, device = load_base_model(model_dir, device="cpu")
    set_seed(0)
    model = get_peft_model(model, lora_config(dropout=0.0))
    stats = train(model, tokenizer, EXAMPLES, CONFIG, device, show_progress=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"steps": steps, "reductions": reductions, "stats": stats}, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
