"""Midtraining and SFT on the cluster: the chat stages' batch source, inputs, horizon and driver.

    settings = settings_from("sft", "midtrain", "pad", cfg.model_dump())     # jobs/sft.py
    meta = run_chat_stage(storage, settings, config={...}, force=False)

Built on cluster/train.py's machinery (the same TorchTrainer, checkpoints, retries, resume and
export), with what is particular to the chat stages:
- inputs: the exported model of the stage before (`{run}/pretrain/model` for midtrain,
  `{run}/midtrain/model` for SFT) or an explicit `init_from`, and the tokenizer exported beside it
  (else the run's own); a missing one is an error naming the stage to run first;
- the model's shape (depth, head_dim, sequence_len) comes from that model's config.json: the one
  dial was set at pretraining, and a chat stage only continues it;
- the batch: `rows_per_step` rows per optimizer step over all workers (packed conversations for
  midtrain, one conversation each for SFT), so total_batch_tokens = rows_per_step x sequence_len
  (row capacity: padding counts in the "tokens" metrics);
- the horizon: `num_iterations` when > 0, else `num_epochs` passes over the training conversations
  (rows per epoch counted on up to 4,000 of them, nanochat/chat_data.py);
- the learning rates: the configured ones times `init_lr_frac` (the seed's SFT uses 0.02); the
  optimizers start fresh, only the weights are carried over.
Each worker renders its own conversations (`ChatSource`): no Ray Data pipeline, since a rank's
rows for one step take milliseconds to render next to the step itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import pyarrow.fs as pafs
import ray

from cluster.pretrain_data import load_tokenizer
from cluster.storage import RunStorage
from cluster.train import (
    Batcher,
    Plan,
    Prepared,
    TrainSpec,
    check_resume,
    clear_stage,
    make_plan,
    train_and_export,
)
from nanochat import checkpoint as ckpt
from nanochat import hf_format
from nanochat.chat_data import ChatData, Layout
from nanochat.common import DistInfo
from nanochat.dataloader import DataPosition
from nanochat.errors import ConfigError, NotFoundError
from nanochat.train import Batch

LR_FIELDS = ("embedding_lr", "unembedding_lr", "matrix_lr")  # scaled by init_lr_frac


@dataclass(frozen=True)
class ChatSource:
    """Batch source of the chat stages: the stage's conversations (nanochat/chat_data.py), rendered in
    the worker; validation on the held-out conversations (bits per byte of the assistant's tokens)."""

    data: ChatData

    def train_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer_uri: str, tokenizer: Any,
                      start: DataPosition) -> Batcher:
        return self.data.batcher(tokenizer, spec.sequence_len + 1, spec.device_batch_size, start, dist.world_size)

    def val_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer: Any, plan: Plan) -> list[Batch] | None:
        if self.data.val_conversations == 0:
            return None  # no validation loss: the metrics carry none
        return self.data.validation_batches(tokenizer, spec.sequence_len + 1, spec.device_batch_size, dist.rank,
                                            dist.world_size)


@dataclass(frozen=True)
class ChatStageSettings:
    """Plain values of one chat stage (jobs/midtrain.py and jobs/sft.py document each field)."""

    stage: str  # "midtrain" or "sft": the mixture, the run directory, the Ray Train run name
    previous: str  # the stage whose exported model starts this one
    layout: Layout  # "pack" (midtrain) or "pad" (SFT)
    init_from: str | None = None
    source: str = "auto"  # the mixture's data: "auto", "hub" or "pack"
    tasks: tuple[str, ...] | None = None  # task specs replacing the stage's own mixture
    mixture_seed: int = 42
    val_conversations: int = 0
    num_epochs: float = 1.0
    num_iterations: int = -1
    rows_per_step: int = 32
    init_lr_frac: float = 1.0
    train: dict[str, Any] = field(default_factory=dict)  # TrainSpec fields, as configured

    @property
    def offline(self) -> bool | None:
        return {"auto": None, "hub": False, "pack": True}[self.source]


def settings_from(stage: str, previous: str, layout: Layout, values: dict[str, Any]) -> ChatStageSettings:
    """Split a stage config's values into the chat settings and the TrainSpec fields."""
    own = {f.name for f in fields(ChatStageSettings)} - {"stage", "previous", "layout", "train"}
    spec_fields = {f.name for f in fields(TrainSpec)}
    unknown = sorted(set(values) - own - spec_fields)
    if unknown:
        raise ValueError(f"{stage} config fields {unknown} are neither chat-stage settings nor TrainSpec fields")
    chat = {k: v for k, v in values.items() if k in own}
    if chat.get("tasks") is not None:
        chat["tasks"] = tuple(chat["tasks"])
    return ChatStageSettings(stage, previous, layout, **chat,
                             train={k: v for k, v in values.items() if k in spec_fields})


def _exists(uri: str) -> bool:
    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_model_config(model_uri: str) -> dict[str, Any]:
    """config.json of an exported model (local path or URI); FileNotFoundError naming it when absent.
    A transformers NanoChat config.json is translated to {"model_config": GPTConfig fields, "hf_config"}."""
    fs, path = pafs.FileSystem.from_uri(model_uri) if "://" in model_uri else (pafs.LocalFileSystem(), model_uri)
    if fs.get_file_info(f"{path}/{ckpt.CONFIG_FILE}").type != pafs.FileType.File:
        raise NotFoundError(f"no exported model at {model_uri}: its {ckpt.CONFIG_FILE} is missing")
    with fs.open_input_stream(f"{path}/{ckpt.CONFIG_FILE}") as f:
        config = json.loads(f.read().decode())
    if "model_type" in config and "model_config" not in config:  # transformers' NanoChat format
        return {"model_config": asdict(hf_format.gpt_config_from_hf(config, model_uri)), "hf_config": config}
    return config


def stage_inputs(storage: RunStorage, settings: ChatStageSettings) -> tuple[str, str]:
    """(URI of the model that starts the stage, URI of its tokenizer); errors name what to run first."""
    if settings.init_from:
        init = settings.init_from
    else:
        storage.read_meta(settings.previous)  # "... (run the <previous> stage first)" when incomplete
        init = f"{storage.stage_uri(settings.previous)}/model"
    if not _exists(f"{init}/{ckpt.CONFIG_FILE}"):
        raise NotFoundError(f"the {settings.stage} stage starts from the model at {init}, which has no "
                                f"{ckpt.CONFIG_FILE}: rerun the {settings.previous} stage (with --force) to export it")
    if _exists(f"{init}/{ckpt.TOKENIZER_DIR}"):
        return init, f"{init}/{ckpt.TOKENIZER_DIR}"
    if _exists(f"{init}/{hf_format.TOKENIZER_FILE}"):  # a transformers directory holds its tokenizer.json
        return init, init
    storage.read_meta("tokenizer")
    return init, storage.stage_uri("tokenizer")


def chat_train_spec(settings: ChatStageSettings, model_config: dict[str, Any], num_steps: int) -> TrainSpec:
    """The TrainSpec of a chat stage: the model's shape, the batch in rows, lrs x init_lr_frac."""
    depth, width, heads = model_config["n_layer"], model_config["n_embd"], model_config["n_head"]
    if width != 64 * depth or width % heads:
        raise ConfigError(f"the initial model has {depth} layers of width {width} in {heads} heads, not the "
                         "depth-derived shape (width 64 x depth) the training stages build")
    spec = TrainSpec(**settings.train)
    per_pass = spec.device_batch_size * spec.num_workers
    if settings.rows_per_step % per_pass:
        raise ConfigError(f"rows_per_step {settings.rows_per_step} is not a multiple of device_batch_size "
                         f"{spec.device_batch_size} x num_workers {spec.num_workers}: change one of them")
    lrs = {k: getattr(spec, k) * settings.init_lr_frac for k in LR_FIELDS}
    return replace(spec, depth=depth, head_dim=width // heads, sequence_len=model_config["sequence_len"],
                   norm_eps=model_config.get("norm_eps"),
                   total_batch_tokens=settings.rows_per_step * model_config["sequence_len"],
                   num_iterations=num_steps, **lrs)


def chat_horizon(settings: ChatStageSettings, data: ChatData, tokenizer: Any, row_len: int) -> int:
    """Optimizer steps: num_iterations when > 0, else num_epochs passes over the training rows."""
    if settings.num_iterations > 0:
        return settings.num_iterations
    rows = data.rows_per_epoch(tokenizer, row_len)
    return max(1, math.ceil(settings.num_epochs * rows / settings.rows_per_step))


def preflight_chat(spec: TrainSpec, storage: RunStorage, data: ChatData, init_from: str, tokenizer: str,
                   stage: str) -> Prepared:
    """Every check that needs no worker: the initial model fits the spec and the tokenizer, the
    mixture is not empty and holds no evaluation item, the storage is writable; then joins Ray
    (check_resume looks at the cluster's nodes)."""
    saved = read_model_config(init_from)["model_config"]
    plan = make_plan(spec, load_tokenizer(tokenizer).vocab_size, spec.num_workers)
    ckpt.check_model_config(saved, plan.model, f"at {init_from} (the {stage} stage's initial model)")
    info = data.check()
    storage.check_writable()
    if not ray.is_initialized():
        ray.init()  # the cluster this job was submitted to (or a local one by hand)
    prepared = Prepared(tokenizer, ChatSource(data), plan, stage, init_from, tasks=dict(info["tasks"]))
    prepared.notes.append(f"{info['train']} training and {info['validation']} validation conversations: "
                          + ", ".join(f"{k} {v}" for k, v in sorted(info["tasks"].items())))
    return check_resume(prepared, storage, spec)


def run_chat_stage(storage: RunStorage, settings: ChatStageSettings, *, config: dict[str, Any],
                   force: bool = False) -> dict[str, Any]:
    """Check, train from the previous stage's weights (resuming this stage's last checkpoint unless
    `force`), export {run}/<stage>/model/, write meta.json."""
    if force:
        clear_stage(storage, settings.stage)
    init_from, tokenizer_uri = stage_inputs(storage, settings)
    model_config = read_model_config(init_from)["model_config"]
    data = ChatData(settings.stage, settings.layout, offline=settings.offline, tasks=settings.tasks,
                    seed=settings.mixture_seed, val_conversations=settings.val_conversations)
    steps = chat_horizon(settings, data, load_tokenizer(tokenizer_uri), model_config["sequence_len"] + 1)
    spec = chat_train_spec(settings, model_config, steps)
    prepared = preflight_chat(spec, storage, data, init_from, tokenizer_uri, settings.stage)
    return train_and_export(spec, storage, prepared, {**config, "train_spec": asdict(spec)})
