"""Typed settings of every stage. The scripts parse flags and build these; the library never sees a Namespace.

What a stage records about its run (recipes, per-user predictions, summaries, train logs) is written from these
objects, so what was run is recorded the same way whichever script or test started it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from perpcs.engine.training import TrainConfig
from perpcs.errors import fail
from perpcs.method.composition import ComposeSettings

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelConfig:
    """The base LLM and where it runs."""
    llama_model_path: str = "smollm2"
    tokenizer_path: str | None = None
    device: str = "auto"
    cpu_bf16: bool = False        # bf16 autocast on the CPU; on CUDA the weights are bf16 anyway


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA a stage trains (SPEC 5: r 8, alpha 8, dropout 0.05 on q/k/v/o)."""
    r: int = 8
    alpha: float = 8
    dropout: float = 0.05
    target_modules: tuple = LORA_TARGETS


@dataclass(frozen=True)
class GenerationConfig:
    """How predictions are generated; ``recorded`` is what a per-user predictions file keeps."""
    max_gen_len: int | None = None   # None: the task's own length
    temperature: float = 0.1
    top_p: float = 0.9
    k_list: tuple = (1, 2, 4)
    batch_size: int = 16
    kv_cache: str = "dynamic"
    max_seq_len: int = 3000
    seed: int = 0
    cpu_bf16: bool = False

    def kwargs(self) -> dict:
        """Keyword arguments of generation.generate / predict_variants."""
        return dict(temperature=self.temperature, top_p=self.top_p, seed=self.seed, batch_size=self.batch_size,
                    max_seq_len=self.max_seq_len, cpu_bf16=self.cpu_bf16, kv_cache=self.kv_cache)

    def recorded(self, task) -> dict:
        """What decides a user's predictions besides the model: kept in each per-user predictions file, so a rerun
        with other settings does not pass the old predictions off as its own."""
        return {"k_list": list(self.k_list), "temperature": self.temperature, "top_p": self.top_p,
                "max_gen_len": self.max_gen_len or task.max_gen_len, "max_seq_len": self.max_seq_len,
                "seed": self.seed}


@dataclass(frozen=True)
class ShardConfig:
    """Which users this process does (per-user stages) and whether finished ones are redone."""
    num_shards: int | None = None    # None: $WORLD_SIZE or 1
    shard_id: int | None = None      # None: $RANK or 0
    overwrite: bool = False

    def resolve(self) -> tuple:
        """(num_shards, shard_id) from the settings, else torchrun's WORLD_SIZE / RANK, else (1, 0)."""
        num = self.num_shards if self.num_shards is not None else int(os.environ.get("WORLD_SIZE", 1))
        sid = self.shard_id if self.shard_id is not None else int(os.environ.get("RANK", 0))
        if num < 1 or not 0 <= sid < num:
            fail(f"--shard_id {sid} must be in [0, --num_shards {num})")
        return num, sid


@dataclass(frozen=True)
class StageInputs:
    """What every model stage reads: the task's data, the base model and (stages 3-5, OPPU) the task LoRA."""
    task_name: str
    data_dir: str | Path = "./data"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora_ckpt: str | Path | None = None   # the stage-1 task LoRA; None: the default output of stage 1


@dataclass(frozen=True)
class TaskLoRAStage:
    """Stage 1: the task LoRA and the baseline predictions."""
    inputs: StageInputs
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output_dir: str | Path | None = None
    test_split: str = "test"         # "leaderboard": LaMP's test questions, outputs under <output_dir>/leaderboard
    infer: bool = False               # predict only, with inputs.lora_ckpt
    overwrite: bool = False           # train again even if the adapter exists
    base_only: bool = False           # no LoRA: the base model's predictions only (output/<task>/base_LLM)


@dataclass(frozen=True)
class SharerLoRAStage:
    """Stage 3: one LoRA per sharer."""
    inputs: StageInputs
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    anchor_idx_path: str | Path | None = None
    output_dir: str | Path | None = None


@dataclass(frozen=True)
class SharerGateStage:
    """Stage 4: the gates of every sharer piece, on the sharer's last recent_k items."""
    inputs: StageInputs
    train: TrainConfig = field(default_factory=TrainConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    anchor_path: str | Path | None = None
    anchor_idx_path: str | Path | None = None
    recent_k: int = 2000
    output_dir: str | Path | None = None


@dataclass(frozen=True)
class CompositionStage:
    """Stage 5: every target user's LoRA assembled from the sharers' pieces, then its predictions."""
    inputs: StageInputs
    compose: ComposeSettings = field(default_factory=ComposeSettings)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    anchor_dir: str | Path | None = None
    gate_dir: str | Path | None = None
    anchor_idx_path: str | Path | None = None
    output_dir: str | Path | None = None
    test_split: str = "test"         # "leaderboard": LaMP's test questions, outputs under <output_dir>/leaderboard
    max_seq_len: int = 3500          # tokens of an assembly example (and of a prompt, via generation)
    save_adapters: bool = False
    save_scores: bool = False        # every sharer's gate score per piece and user (gate_scores/user_<id>.json)
    control: str | None = None       # a user-blind control (perpcs.method.controls): uniform, swapped, peft_merge


@dataclass(frozen=True)
class OPPUStage:
    """The OPPU baseline: a LoRA per target user on its own history, then its predictions."""
    inputs: StageInputs
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(target_modules=("q_proj", "v_proj")))
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    output_dir: str | Path | None = None
    test_split: str = "test"         # "leaderboard": LaMP's test questions, outputs under <output_dir>/leaderboard


@dataclass(frozen=True)
class ProfileConfig:
    """data/gen_profile.py: the PAG profile text of every user."""
    task_name: str
    data_dir: str | Path = "./data"
    model_path: str = "smollm2"
    device: str = "auto"
    k: int = 10
    max_gen_len: int = 128
    max_seq_len: int = 3000
    batch_size: int = 16
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int = 0
    chat_template: bool = True
    output_file: str | Path | None = None
