"""Typed settings of every stage. The scripts parse flags and build these; the library never sees a Namespace.

Each setting is declared once, here (or on the library's TrainConfig and ComposeSettings): its default, its --help
text and its range (perpcs/checks.setting). cli_flags.py builds every script's flags from these fields and the
configs from the parsed flags, so a stage's defaults are the same from a script, a test or Python.

What a stage records about its run (recipes, per-user predictions, summaries, train logs) is written from these
objects, so what was run is recorded the same way whichever script or test started it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from perpcs.checks import (COUNT, DROPOUT, FRACTION, NON_NEGATIVE_INT, POSITIVE, SEED, TEMPERATURE, check_settings,
                           setting)
from perpcs.data.prompts import MAX_SEQ_LEN_HELP, check_max_seq_len
from perpcs.data.tasks import TASK_NAMES_HELP, get_task
from perpcs.engine.generation import AUTO, AUTO_USERS_PER_BATCH
from perpcs.engine.training import TrainConfig
from perpcs.errors import fail
from perpcs.method.calibration import OBJECTIVES
from perpcs.method.composition import ComposeSettings
from perpcs.models.families import DEFAULT_FAMILY
from perpcs.paths import CONTROLS
from perpcs.method.clustering import KMEANS_N_INIT, STRATEGIES
from perpcs.models.encoder import PAPER_ENCODER

LORA_TARGETS = DEFAULT_FAMILY.target_modules
TASK_LORA_HELP = "task LoRA of stage 1; default ./output/<task>/task-base_LLM"
ANCHOR_IDX_HELP = ("stage 2 output; default anchor_selection/<task>/anchor_user_idx.json (a missing published "
                   "anchor_user_idx.pt resolves to it)")


def test_split_setting():
    return setting("test", choices=("test", "leaderboard"),
                   help="the users to predict: test (data/<task>/test_100, with golds) or leaderboard (LaMP's test "
                        "questions, data/<task>/leaderboard; outputs under <output_dir>/leaderboard/)")


def users_per_batch_setting():
    """--users_per_batch of the stages that predict target users (stage 5 and its controls, OPPU)."""
    return setting(AUTO, help="users predicted together, each prompt on its own user's LoRA: their prompts sorted "
                   "by length into batches of --gen_batch_size, so fewer, fuller, less padded batches than one user "
                   "at a time; 1 is one user at a time; auto is "
                   f"{AUTO_USERS_PER_BATCH['cpu']} on the CPU in fp32 with --temperature 0 (outputs identical to one "
                   "user at a time), else 1: when sampling a user's draws would depend on the users beside it, and in "
                   "bf16 (CUDA, --cpu_bf16) the batch changes low bits, which can flip a greedy token; a number "
                   "batches users in bf16 anyway")


def check_users_per_batch(value, temperature: float) -> None:
    """auto or a whole number >= 1; more than 1 only for greedy decoding (resolve_users_per_batch says why)."""
    if value == AUTO:
        return
    COUNT.check("--users_per_batch", value)
    if value > 1 and temperature > 0:
        fail(f"--users_per_batch {value} with --temperature {temperature}: sampled predictions are drawn one user "
             f"at a time (batched with other users, a user's draws would depend on them, so on the shards and on "
             f"resumes); pass --temperature 0 to batch users, or --users_per_batch 1 (auto)")


def output_dir_setting(default_text: str):
    return setting(None, help=default_text)


@dataclass(frozen=True)
class ModelConfig:
    """The base LLM and where it runs."""
    llama_model_path: str = setting("smollm2", help="HF model dir, Meta download dir (params.json + "
                                    "consolidated.*.pth, converted once), or 'smollm2' for the bundled "
                                    "SmolLM2-135M-Instruct")
    tokenizer_path: str | None = setting(None, help="defaults to the model path")
    device: str = setting("auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    # bf16 autocast on the CPU; on CUDA the weights are bf16 anyway
    cpu_bf16: bool = setting(False, help="bf16 autocast on CPU (where supported); default fp32 on CPU, bf16 on CUDA")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA a stage trains (docs/method.md section 5: r 8, alpha 8, dropout 0.05 on q/k/v/o)."""
    r: int = setting(8, rule=COUNT, flag="--lora_r")
    alpha: float = setting(8, rule=POSITIVE, flag="--lora_alpha")
    dropout: float = setting(0.05, rule=DROPOUT, flag="--lora_dropout")
    target_modules: tuple = setting(LORA_TARGETS)   # the model family's (perpcs/models/families.py)

    def __post_init__(self):
        check_settings(self)


@dataclass(frozen=True)
class GenerationConfig:
    """How predictions are generated; ``recorded`` is what a per-user predictions file keeps."""
    max_gen_len: int | None = setting(None, rule=COUNT, help="new tokens; default per task")   # None: the task's own
    temperature: float = setting(0.1, rule=TEMPERATURE)
    top_p: float = setting(0.9, rule=FRACTION)
    k_list: tuple = setting((1, 2, 4), rule=COUNT, distinct=True, help="BM25 k of the RAG variants, distinct")
    batch_size: int = setting(16, rule=COUNT, flag="--gen_batch_size")
    kv_cache: str = setting("dynamic", choices=("dynamic", "static"), help="static: preallocated KV cache with a "
                            "compiled decoding step on CUDA (same outputs)")
    max_seq_len: int = setting(3000, rule=COUNT, shared=True)
    seed: int = setting(0, rule=SEED, shared=True)
    cpu_bf16: bool = setting(False, shared=True)

    def __post_init__(self):
        """max_gen_len None is the task's own length; 0 is refused (it used to mean the same, silently)."""
        check_settings(self)
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
    num_shards: int | None = setting(None, rule=COUNT, help="default: $WORLD_SIZE or 1")
    shard_id: int | None = setting(None, rule=NON_NEGATIVE_INT, help="below --num_shards; default: $RANK or 0")
    overwrite: bool = setting(False, help="redo users whose outputs already exist")

    def __post_init__(self):
        check_settings(self)
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
    task_name: str = setting(help=TASK_NAMES_HELP)
    data_dir: str | Path = setting("./data", help="holds <task>/ in the layout of docs/method.md section 3")
    model: ModelConfig = setting(default_factory=ModelConfig)
    # the stage-1 task LoRA; None: the default output of stage 1
    lora_ckpt: str | Path | None = setting(None, help=TASK_LORA_HELP)


def lengths(inputs: StageInputs, max_gen_len: int | None, *max_seq_lens: int) -> None:
    """Each max_seq_len holds the task's instruction and the new tokens (perpcs/data/prompts.check_max_seq_len)."""
    task = get_task(inputs.task_name)
    for max_seq_len in max_seq_lens:
        check_max_seq_len(task, max_seq_len, max_gen_len)


@dataclass(frozen=True)
class TaskLoRAStage:
    """Stage 1: the task LoRA and the baseline predictions."""
    inputs: StageInputs = setting(help_of={"lora_ckpt": "with --infer: the task LoRA dir (or .../lora_ckpt.pt)"})
    lora: LoraSettings = setting(default_factory=LoraSettings)
    train: TrainConfig = setting(default_factory=TrainConfig)     # lr 1e-4, batch 6, 3 epochs (docs/method.md section 5)
    generation: GenerationConfig = setting(default_factory=GenerationConfig)
    output_dir: str | Path | None = output_dir_setting("default ./output/<task>/task-base_LLM")
    test_split: str = test_split_setting()   # "leaderboard": LaMP's test questions, outputs under .../leaderboard
    infer: bool = setting(False, help="skip training; load the task LoRA and predict")   # with inputs.lora_ckpt
    overwrite: bool = setting(False, help="train again even if the adapter exists (predictions are always made "
                              "again)")
    # no LoRA: the base model's predictions only (output/<task>/base_LLM)
    base_only: bool = setting(False, help="no task LoRA: predict the test users with the plain base model (a "
                              "reference row of the results table); default output ./output/<task>/base_LLM")

    def __post_init__(self):
        lengths(self.inputs, self.generation.max_gen_len, self.train.max_seq_len, self.generation.max_seq_len)


@dataclass(frozen=True)
class SharerLoRAStage:
    """Stage 3: one LoRA per sharer."""
    inputs: StageInputs = setting(help_of={"lora_ckpt": "task LoRA of stage 1 (dir or .../lora_ckpt.pt); "
                                           "default ./output/<task>/task-base_LLM"})
    lora: LoraSettings = setting(default_factory=LoraSettings)
    # docs/method.md section 5: 100 optimizer steps, the lr a cosine over 3 epochs of this user's batches (repeating past them)
    train: TrainConfig = setting(default_factory=lambda: TrainConfig(lr=2e-5, max_step=100))
    shards: ShardConfig = setting(default_factory=ShardConfig)
    anchor_idx_path: str | Path | None = setting(None, help=ANCHOR_IDX_HELP)
    output_dir: str | Path | None = output_dir_setting("default ./output/<task>/Anchor_PEFT/LoRA (user_<id>/ each)")

    def __post_init__(self):
        lengths(self.inputs, None, self.train.max_seq_len)


@dataclass(frozen=True)
class SharerGateStage:
    """Stage 4: the gates of every sharer piece, on the sharer's last recent_k items."""
    inputs: StageInputs
    # docs/method.md section 5: 200 optimizer steps, the lr a cosine over 2 epochs of this user's batches (repeating past them)
    train: TrainConfig = setting(default_factory=lambda: TrainConfig(lr=2e-5, weight_decay=0.0, epochs=2,
                                                                     max_step=200, max_seq_len=3300))
    shards: ShardConfig = setting(default_factory=ShardConfig)
    anchor_path: str | Path | None = setting(None, help="sharer LoRAs of stage 3 (holding user_<id>/, or the parent "
                                             "Anchor_PEFT/ of its LoRA/); default ./output/<task>/Anchor_PEFT/LoRA")
    anchor_idx_path: str | Path | None = setting(None, help=ANCHOR_IDX_HELP)
    recent_k: int = setting(2000, rule=COUNT, help="gates train on the last recent_k history items")
    # beyond the paper (docs/method.md section 7.1); batch: --batch_size, seed: --seed
    gate_objective: str = setting("published", choices=OBJECTIVES, help="published: each sharer's gates trained "
                                  "alone to scale its own LoRA (x * sigmoid(x . g)); routing: every sharer's gates "
                                  "trained together (--routing_steps Adam steps on batches of --batch_size examples) so "
                                  "that the composition's own score ranks the sharer whose examples they are first "
                                  "(softmax over sharers, cross-entropy to the owner); not shardable")
    # not --max_step: that counts the published gates' LM-training steps (the demo's 8 would leave routing gates
    # near their random start); the fit on fixed summaries costs seconds for hundreds of steps
    routing_steps: int = setting(300, rule=COUNT, help="--gate_objective routing: Adam steps of the fit")
    routing_lr: float = setting(0.01, rule=POSITIVE, help="--gate_objective routing: Adam's learning rate (the "
                                "gates' --lr suits the published training, not this fit)")
    routing_temperature: float = setting(0.1, rule=POSITIVE, help="--gate_objective routing: the softmax "
                                         "temperature of the scores in the fit's cross-entropy")
    output_dir: str | Path | None = output_dir_setting("default ./output/<task>/Anchor_PEFT/gate "
                                                       "(user_<id>/gates.safetensors each)")

    def __post_init__(self):
        check_settings(self)
        lengths(self.inputs, None, self.train.max_seq_len)


@dataclass(frozen=True)
class CompositionStage:
    """Stage 5: every target user's LoRA assembled from the sharers' pieces, then its predictions."""
    inputs: StageInputs
    compose: ComposeSettings = setting(default_factory=ComposeSettings)
    generation: GenerationConfig = setting(default_factory=GenerationConfig)
    shards: ShardConfig = setting(default_factory=ShardConfig)
    anchor_dir: str | Path | None = setting(None, hidden_aliases=("--anchor_path",), help="sharer LoRAs of stage "
                                            "3; default ./output/<task>/Anchor_PEFT/LoRA")
    gate_dir: str | Path | None = setting(None, hidden_aliases=("--gate_path",), help="sharer gates of stage 4; "
                                          "default ./output/<task>/Anchor_PEFT/gate")
    anchor_idx_path: str | Path | None = setting(None, help="stage 2 output; default "
                                                 "anchor_selection/<task>/anchor_user_idx.json")
    output_dir: str | Path | None = output_dir_setting("default ./output/<task>/LoRA-Composition")
    test_split: str = test_split_setting()   # "leaderboard": LaMP's test questions, outputs under .../leaderboard
    # tokens of an assembly example (and of a prompt, via generation)
    max_seq_len: int = setting(3500, rule=COUNT, help=MAX_SEQ_LEN_HELP)
    save_adapters: bool = setting(False, help="also write each user's assembled peft adapter")
    # every sharer's gate score per piece and user (gate_scores/user_<id>.json)
    save_scores: bool = setting(False, help="also write every sharer's gate score for every piece (mean over the "
                                "user's batches) to gate_scores/user_<id>.json: what the choices were made from; "
                                "python -m perpcs explain reads them (Per-Pcs and --control swapped: the other "
                                "controls score nothing)")
    # speed only, so not a recipe setting: the same choices and weights within 1e-6 (float summation order)
    split_batches: bool = setting(True, help="run each assembly batch (the published batches, unchanged) as "
                                  "length-sorted micro-batches in lockstep, their scores pooled before each piece's "
                                  "choice: less padding, the same recipes within 1e-6 (float order); "
                                  "--no-split_batches: one padded forward per batch, as published")
    # a control (perpcs.method.controls, paths.CONTROLS): uniform, swapped, ...
    control: str | None = setting(None, choices=tuple(CONTROLS), help="a user-blind control instead of Per-Pcs, "
                                  "from the same sharers and gates: uniform (every sharer 1/n in every piece), swapped "
                                  "(each user assembled from another test user's history, a derangement seeded by "
                                  "--seed), peft_merge (peft's add_weighted_adapter, linear, 1/n); or a PEFT-retrieval "
                                  "row, one sharer's whole LoRA per user: nearest_sharer (the highest cosine between "
                                  "mean history embeddings, see --encoder), random_sharer (drawn per user, seeded by "
                                  "--seed); default output ./output/<task>/LoRA-Composition-control-<name>")
    # --control nearest_sharer: the history encoder (default: stage 2's, else MiniLM)
    encoder: str | None = setting(None, help="--control nearest_sharer only: the Hugging Face encoder (id or local "
                                  "directory) that embeds the histories, as stage 2 does "
                                  "(anchor_selection/history_anchor.py --encoder); default: the encoder recorded in "
                                  "the sharer index, else the bundled all-MiniLM-L6-v2")

    # not recorded with the predictions nor compared on resume: it changes how fast they come, not what they are
    users_per_batch: int | str = users_per_batch_setting()

    def __post_init__(self):
        check_settings(self)
        check_users_per_batch(self.users_per_batch, self.generation.temperature)
        lengths(self.inputs, self.generation.max_gen_len, self.max_seq_len, self.generation.max_seq_len)


@dataclass(frozen=True)
class OPPUStage:
    """The OPPU baseline: a LoRA per target user on its own history, then its predictions."""
    inputs: StageInputs
    # defaults of the authors' OPPU release: r 8 on q_proj and v_proj, lr 1e-4, 2 epochs, batch 16
    lora: LoraSettings = setting(default_factory=lambda: LoraSettings(target_modules=DEFAULT_FAMILY.oppu_modules))
    train: TrainConfig = setting(default_factory=lambda: TrainConfig(batch_size=16, epochs=2))
    generation: GenerationConfig = setting(default_factory=GenerationConfig)
    shards: ShardConfig = setting(default_factory=ShardConfig)
    output_dir: str | Path | None = output_dir_setting("default ./output/<task>/OPPU")
    test_split: str = test_split_setting()   # "leaderboard": LaMP's test questions, outputs under .../leaderboard
    # not recorded with the predictions nor compared on resume: it changes how fast they come, not what they are
    users_per_batch: int | str = users_per_batch_setting()

    def __post_init__(self):
        check_users_per_batch(self.users_per_batch, self.generation.temperature)
        lengths(self.inputs, self.generation.max_gen_len, self.train.max_seq_len, self.generation.max_seq_len)


@dataclass(frozen=True)
class SharerSelectionStage:
    """Stage 2: the sharers chosen among the candidate users (anchor_selection/history_anchor.py)."""
    task_name: str = setting(help="movie_tagging, news_headline, ... or a LaMP id")
    candidate_path: str | Path | None = setting(None, help="candidate users file (default: "
                                                "<repo>/data/<task>/user_anchor_candidate.json)")
    output_dir: str | Path | None = setting(None, help="where to write the index and embeddings (default: "
                                            "<repo>/anchor_selection/<task>)")
    k: int = setting(50, rule=COUNT, help="number of clusters (cluster) or sharers (others)")
    strategy: str = setting("cluster", choices=STRATEGIES,
                            help=f"cluster: k-means (n_init={KMEANS_N_INIT}) over history embeddings, most active "
                                 "user per cluster; most_active: the k longest histories; random: k seeded draws")
    min_history: int = setting(10, rule=NON_NEGATIVE_INT, help="a sharer needs more than this many history items")
    seed: int = setting(0, rule=SEED, help="k-means random_state / random strategy seed")
    encoder: str | None = setting(None, help=f"Hugging Face encoder id (the paper's: {PAPER_ENCODER}; read from the "
                                  "local HF cache, downloaded into it unless HF_HUB_OFFLINE=1) or a local HF model "
                                  "directory (default: the bundled all-MiniLM-L6-v2, offline)")
    batch_size: int = setting(32, rule=COUNT)
    max_length: int = setting(512, rule=COUNT, help="tokens per history item")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N")
    reembed: bool = setting(False, negatable=False, help="recompute the embeddings even if matching ones are stored "
                            "in output_dir")

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            fail(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        check_settings(self)


@dataclass(frozen=True)
class ProfileConfig:
    """data/gen_profile.py: the PAG profile text of every user."""
    task_name: str = setting()
    data_dir: str | Path = setting("./data")
    model_path: str = setting("smollm2", help="'smollm2', an HF dir or a Meta download dir")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N")
    k: int = setting(10, rule=NON_NEGATIVE_INT, help="most recent history items shown to the model (0 = all)")
    max_gen_len: int = setting(128, rule=COUNT)
    max_seq_len: int = setting(3000, rule=COUNT, help="at least 1 (BOS) + the words of the task's profile "
                               "instruction + --max_gen_len, e.g. 159 for citation with the default --max_gen_len")
    batch_size: int = setting(16, rule=COUNT)
    temperature: float = setting(0.0, rule=TEMPERATURE, help="reproducible profiles when 0")
    top_p: float = setting(0.9, rule=FRACTION)
    seed: int = setting(0, rule=SEED)
    chat_template: bool = setting(True, help="wrap the prompt in the tokenizer's chat template when it has one")
    output_file: str | Path | None = setting(None, help="default data/<task>/profile-id2text.json")

    def __post_init__(self):
        check_settings(self)
        task = get_task(self.task_name)
        check_max_seq_len(task, self.max_seq_len, self.max_gen_len, template=task.profile_prompts["profile_prompt"],
                          what="the profile instruction")
