"""The plain specs the cluster layer runs: one frozen dataclass per run kind, no defaults.

Every knob, its default and its description live in one place, the stage's pydantic config
(jobs/config.py, jobs/pretrain.py, jobs/chat_stage.py, jobs/rl.py); each config has one explicit
conversion to its spec (`to_spec()`), the only place "auto" values (a null GPU count, a horizon
from the task's size, the data location of a preset) are resolved. A spec field is a config field
of the same name, or is listed in its spec's DERIVED set with where it comes from;
tests/test_settings.py holds both rules (and that no spec field has a default).

    PretrainSpec   = TrainSpec + ShardReading + inputs       (PretrainConfig.to_spec)
    ChatStageSpec  -> TrainSpec per run (cluster/chat_train.py's chat_train_spec, from the model)
    RLSpec                                                   (RLConfig.to_spec)

The pieces the core takes are built here once: LearningRates (nanochat/schedule.py) for
GPT.setup_optimizers, the Schedule for nanochat.train.LoopConfig (cluster/train.py's loop_config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nanochat.schedule import LearningRates


@dataclass(frozen=True)
class Schedule:
    """The loop's schedule and cadence (jobs/config.py's TrainingConfig documents and defaults each)."""

    grad_clip: float
    warmup_ratio: float
    warmdown_ratio: float
    final_lr_frac: float
    log_every: int
    eval_every: int
    checkpoint_every: int
    compile: bool | None  # None: nanochat.train.compile_pays_back decides
    precision: str  # "auto", "float32", "bfloat16": nanochat.common.training_dtype, on the worker's device


@dataclass(frozen=True)
class WorkerGroup:
    """The Ray Train worker group, its retries and checkpoint retention (TrainingConfig documents each)."""

    num_workers: int  # the most workers (the fixed count unless min_workers is set)
    min_workers: int | None  # elastic: the fewest the run goes on with
    resize_check_s: float  # elastic: seconds between checks for capacity to grow back
    cpus_per_worker: float
    use_gpu: bool
    max_failures: int
    max_preemptions: int  # restarts after spot preemptions, apart from max_failures
    preemption_poll_every: int  # steps between get_preemption_info() polls (0: never)
    async_checkpoints: bool  # regular checkpoints upload in the background
    checkpoints_to_keep: int
    storage_is_shared: bool  # a local storage path is an NFS-like mount on every node
    metrics_interval_s: float  # how often workers push metrics to the node's exporter (Ray: 10 s)


@dataclass(frozen=True)
class TrainSpec:
    """Plain values of one training run, built by one conversion per stage config
    (jobs/pretrain.py's PretrainConfig.to_spec, cluster/chat_train.py's chat_train_spec from a
    ChatStageSpec); no field has a default here: the configs own them (tests/test_settings.py)."""

    depth: int  # the one dial: width 64 * depth, heads of head_dim
    head_dim: int
    sequence_len: int  # tokens per row (a row holds sequence_len + 1 for the shifted targets)
    norm_eps: float | None  # RMSNorm epsilon (None: the dtype's; set from an imported model)
    device_batch_size: int  # rows per micro-batch per worker
    total_batch_tokens: int  # tokens per optimizer step over all workers
    num_iterations: int  # horizon: explicit steps (> 0) ...
    flops_budget: float  # ... or a FLOPs budget (> 0) ...
    target_param_data_ratio: float  # ... or tokens per parameter
    seed: int  # model initialisation
    lrs: LearningRates
    schedule: Schedule
    group: WorkerGroup


@dataclass(frozen=True)
class ShardReading:
    """How pretraining reads its shards (PretrainConfig documents each)."""

    eval_tokens: int  # validation tokens per evaluation
    tokenizer_actors: int  # Ray Data tokenizer actors per worker
    tokenizer_actor_cpus: float
    prefetch_batches: int


@dataclass(frozen=True)
class PretrainSpec:
    """A pretraining run: the training, how the shards are read, and the inputs (resolved)."""

    train: TrainSpec
    reading: ShardReading
    data: str  # directory or object-store prefix of the parquet shards
    tokenizer: str | None  # tokenizer directory URI; None: the run's tokenizer stage


@dataclass(frozen=True)
class ChatStageSpec:
    """One chat training stage (jobs/chat_stage.py's ChatStageConfig documents each field). Its
    TrainSpec is made per run by cluster/chat_train.py's chat_train_spec, from this and the initial
    model (whose shape the stage continues)."""

    DERIVED = {"stage": "the config class's STAGE", "previous": "its PREVIOUS", "layout": "its LAYOUT"}

    stage: str  # "midtrain" or "sft": the mixture, the run directory, the Ray Train run name
    previous: str  # the stage whose exported model starts this one
    layout: Literal["pack", "pad"]  # packed rows (midtrain) or one padded conversation per row (SFT)
    init_from: str | None
    source: Literal["auto", "hub", "pack"]  # the mixture's data
    tasks: tuple[str, ...] | None  # task specs replacing the stage's own mixture
    mixture_seed: int
    val_conversations: int
    num_epochs: float
    num_iterations: int
    rows_per_step: int
    device_batch_size: int
    init_lr_frac: float
    lrs: LearningRates  # as configured; chat_train_spec multiplies them by init_lr_frac
    schedule: Schedule
    group: WorkerGroup

    @property
    def offline(self) -> bool | None:
        return {"auto": None, "hub": False, "pack": True}[self.source]


@dataclass(frozen=True)
class RLSpec:
    """An RL run (jobs/rl.py's RLConfig documents each field; RLConfig.to_spec resolves its "auto"
    values: the number of steps from the task's size, offline from the hub's reachability, and
    null GPU counts from the cluster's GPUs)."""

    DERIVED = {"advantage_sign": "1.0: the loss's sign; tests set -1.0 with dataclasses.replace to check the "
                                 "sign is what makes the reward rise"}

    num_steps: int
    task: Literal["gsm8k", "toy"]
    offline: bool | None
    examples_per_step: int
    group_size: int
    max_new_tokens: int
    temperature: float
    top_k: int
    max_seq_len: int | None  # engine context; None: the model's sequence_len
    device_batch_size: int
    lrs: LearningRates  # as configured; the learner multiplies them by init_lr_frac
    init_lr_frac: float
    normalize_std: bool
    max_staleness: int
    clip_eps: float
    advantage_sign: float
    num_rollout_actors: int
    rollout_cpus: float
    rollout_gpus: float
    rollout_slots: int  # engine KV-cache rows per actor; 0: 2 x group_size
    rollout_resources: dict[str, float]  # custom Ray resources per rollout actor ({}: none)
    num_learners: int
    learner_cpus: float
    learner_gpus: float
    learner_resources: dict[str, float]  # custom Ray resources per learner rank ({}: none)
    sandbox_actors: int  # 0: no Python tool
    sandbox_cpus: float
    weight_sync: Literal["auto", "object_store", "broadcast"]
    probe_atol: float
    max_actor_restarts: int
    replace_wait_s: float  # how long a lost rollout actor's replacement may take to be placed
    eval_every: int
    eval_examples: int
    eval_samples: int
    checkpoint_every: int
    checkpoints_to_keep: int
    seed: int

    @property
    def sync_method(self) -> str:
        if self.weight_sync != "auto":
            return self.weight_sync
        return "broadcast" if self.learner_gpus > 0 and self.rollout_gpus > 0 else "object_store"
