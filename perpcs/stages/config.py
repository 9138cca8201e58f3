"""Typed settings of every stage. The scripts parse flags and build these; the library never sees a Namespace.

What a stage records about its run (recipes, per-user predictions, summaries, train logs) is written from these
objects, so what was run is recorded the same way whichever script or test started it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from perpcs.checks import COUNT, DROPOUT, FRACTION, NON_NEGATIVE_INT, POSITIVE, SEED, TEMPERATURE, check_all
from perpcs.data.prompts import check_max_seq_len
from perpcs.data.tasks import get_task
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

    def __post_init__(self):
        check_all((COUNT, "--lora_r", self.r), (POSITIVE, "--lora_alpha", self.alpha),
                  (DROPOUT, "--lora_dropout", self.dropout))


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

    def __post_init__(self):
        """max_gen_len None is the task's own length; 0 is refused (it used to mean the same, silently)."""
        check_all((COUNT, "--max_gen_len", self.max_gen_len), (TEMPERATURE, "--temperature", self.temperature),
                  (FRACTION, "--top_p", self.top_p), (COUNT, "--gen_batch_size", self.batch_size),
                  (COUNT, "--max_seq_len", self.max_seq_len), (SEED, "--seed", self.seed),
                  *((COUNT, "--k_list", k) for k in self.k_list))
        if len(set(self.k_list)) != len(self.k_list):   # each k names a predictions file
            fail(f"--k_list must be distinct, got {' '.join(map(str, self.k_list))}")

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

    def __post_init__(self):
        check_all((COUNT, "--num_shards", self.num_shards), (NON_NEGATIVE_INT, "--shard_id", self.shard_id))
        if self.num_shards is not None and self.shard_id is not None and self.shard_id >= self.num_shards:
            fail(f"--shard_id {self.shard_id} must be in [0, --num_shards {self.num_shards})")

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


def lengths(inputs: StageInputs, max_gen_len: int | None, *max_seq_lens: int) -> None:
    """Each max_seq_len holds the task's instruction and the new tokens (perpcs/data/prompts.check_max_seq_len)."""
    task = get_task(inputs.task_name)
    for max_seq_len in max_seq_lens:
        check_max_seq_len(task, max_seq_len, max_gen_len)


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

    def __post_init__(self):
        lengths(self.inputs, self.generation.max_gen_len, self.train.max_seq_len, self.generation.max_seq_len)


@dataclass(frozen=True)
class SharerLoRAStage:
    """Stage 3: one LoRA per sharer."""
    inputs: StageInputs
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    anchor_idx_path: str | Path | None = None
    output_dir: str | Path | None = None

    def __post_init__(self):
        lengths(self.inputs, None, self.train.max_seq_len)


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

    def __post_init__(self):
        COUNT.check("--recent_k", self.recent_k)
        lengths(self.inputs, None, self.train.max_seq_len)


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
    control: str | None = None       # a control (perpcs.method.controls, paths.CONTROLS): uniform, swapped, ...
    encoder: str | None = None       # --control nearest_sharer: the history encoder (default: stage 2's, else MiniLM)

    def __post_init__(self):
        lengths(self.inputs, self.generation.max_gen_len, self.max_seq_len, self.generation.max_seq_len)


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

    def __post_init__(self):
        lengths(self.inputs, self.generation.max_gen_len, self.train.max_seq_len, self.generation.max_seq_len)


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

    def __post_init__(self):
        check_all((NON_NEGATIVE_INT, "--k", self.k), (COUNT, "--max_gen_len", self.max_gen_len),
                  (COUNT, "--max_seq_len", self.max_seq_len), (COUNT, "--batch_size", self.batch_size),
                  (TEMPERATURE, "--temperature", self.temperature), (FRACTION, "--top_p", self.top_p),
                  (SEED, "--seed", self.seed))
        task = get_task(self.task_name)
        check_max_seq_len(task, self.max_seq_len, self.max_gen_len, template=task.profile_prompts["profile_prompt"],
                          what="the profile instruction")
