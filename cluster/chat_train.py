"""Midtraining and SFT on the cluster: the chat stages' batch source, inputs, horizon and driver.

    meta = run_chat_stage(storage, cfg.to_spec(), config={...}, force=False)   # cfg: jobs/sft.py's SftConfig

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
  (rows per epoch counted on up to 4,000 of them, nanochat/data/chat_data.py);
- the learning rates: the configured ones times `init_lr_frac` (the seed's SFT uses 0.02); the
  optimizers start fresh, only the weights are carried over.
Each worker renders its own conversations (`ChatSource`): no Ray Data pipeline, since a rank's
rows for one step take milliseconds to render next to the step itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import ray

from cluster.artifacts import clear_stage, find_model, load_tokenizer, read_model_config
from cluster.specs import ChatStageSpec, TrainSpec
from cluster.storage import RunStorage
from cluster.train import (
    Batcher,
    Plan,
    Prepared,
    check_resume,
    plan_every_size,
    train_and_export,
)
from nanochat import checkpoint as ckpt
from nanochat.common import DistInfo
from nanochat.data.chat_data import ChatData
from nanochat.data.dataloader import DataPosition
from nanochat.errors import ConfigError
from nanochat.train import Batch


@dataclass(frozen=True)
class ChatSource:
    """Batch source of the chat stages: the stage's conversations (nanochat/data/chat_data.py), rendered in
    the worker; validation on the held-out conversations (bits per byte of the assistant's tokens)."""

    data: ChatData

    def train_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer_uri: str, tokenizer: Any,
                      start: DataPosition) -> Batcher:
        return self.data.batcher(tokenizer, spec.sequence_len + 1, spec.device_batch_size, start,
                                 dist.world_size)

    def val_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer: Any, plan: Plan) -> list[Batch] | None:
        if self.data.val_conversations == 0:
            return None  # no validation loss: the metrics carry none
        return self.data.validation_batches(tokenizer, spec.sequence_len + 1, spec.device_batch_size,
                                            dist.rank, dist.world_size)


# The TrainSpec fields a chat stage does not configure, and where they come from.
CHAT_DERIVED = {
    "depth": "the initial model's n_layer", "head_dim": "its n_embd / n_head",
    "sequence_len": "its sequence_len",
    "norm_eps": "its norm_eps", "total_batch_tokens": "rows_per_step x sequence_len",
    "num_iterations": "chat_horizon: num_iterations, else num_epochs over the training rows",
    "flops_budget": "unused (-1): the horizon is in num_iterations",
    "target_param_data_ratio": "unused (0): the horizon is in num_iterations",
    "seed": "mixture_seed (the weights come from the initial model, not from a seeded initialisation)",
}


def chat_train_spec(chat: ChatStageSpec, model_config: dict[str, Any], num_steps: int) -> TrainSpec:
    """The TrainSpec of a chat stage: the model's shape, the batch in rows, lrs x init_lr_frac."""
    depth, width, heads = model_config["n_layer"], model_config["n_embd"], model_config["n_head"]
    if width != 64 * depth or width % heads:
        raise ConfigError(f"the initial model has {depth} layers of width {width} in {heads} heads, not the "
                         "depth-derived shape (width 64 x depth) the training stages build")
    per_pass = chat.device_batch_size * chat.group.num_workers
    if chat.rows_per_step % per_pass:
        raise ConfigError(f"rows_per_step {chat.rows_per_step} is not a multiple of device_batch_size "
                         f"{chat.device_batch_size} x num_workers {chat.group.num_workers}: "
                         "change one of them")
    return TrainSpec(depth=depth, head_dim=width // heads, sequence_len=model_config["sequence_len"],
                     norm_eps=model_config.get("norm_eps"), device_batch_size=chat.device_batch_size,
                     total_batch_tokens=chat.rows_per_step * model_config["sequence_len"],
                     num_iterations=num_steps, flops_budget=-1.0, target_param_data_ratio=0.0,
                     seed=chat.mixture_seed, lrs=chat.lrs.scaled(chat.init_lr_frac), schedule=chat.schedule,
                     group=chat.group)


def chat_horizon(settings: ChatStageSpec, data: ChatData, tokenizer: Any, row_len: int) -> int:
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
    plan = plan_every_size(spec, load_tokenizer(tokenizer).vocab_size)
    ckpt.check_model_config(saved, plan.model, f"at {init_from} (the {stage} stage's initial model)")
    info = data.check()
    storage.check_writable()
    if not ray.is_initialized():
        ray.init()  # the cluster this job was submitted to (or a local one by hand)
    prepared = Prepared(tokenizer, ChatSource(data), plan, stage, init_from, tasks=dict(info["tasks"]))
    prepared.notes.append(f"{info['train']} training and {info['validation']} validation conversations: "
                          + ", ".join(f"{k} {v}" for k, v in sorted(info["tasks"].items())))
    return check_resume(prepared, storage, spec)


def run_chat_stage(storage: RunStorage, settings: ChatStageSpec, *, config: dict[str, Any],
                   force: bool = False) -> dict[str, Any]:
    """Check, train from the previous stage's weights (resuming this stage's last checkpoint unless
    `force`), export {run}/<stage>/model/, write meta.json."""
    if force:
        clear_stage(storage, settings.stage)
    init = find_model(storage, settings.previous, settings.init_from)
    init_from, tokenizer_uri = init.model, init.tokenizer
    model_config = read_model_config(init_from)["model_config"]
    data = ChatData(settings.stage, settings.layout, offline=settings.offline, tasks=settings.tasks,
                    seed=settings.mixture_seed, val_conversations=settings.val_conversations)
    steps = chat_horizon(settings, data, load_tokenizer(tokenizer_uri), model_config["sequence_len"] + 1)
    spec = chat_train_spec(settings, model_config, steps)
    prepared = preflight_chat(spec, storage, data, init_from, tokenizer_uri, settings.stage)
    return train_and_export(spec, storage, prepared, {**config, "train_spec": asdict(spec)})
