"""Pretraining on the cluster: the shard batch source and the stage's checks and driver.

    meta = run_pretrain(cfg.to_spec(preset), storage, config={...})   # cfg: jobs/pretrain.py's PretrainConfig

What is particular to pretraining, on cluster/train.py's shared Ray Train machinery:
- the batches (`ShardSource`): parquet row groups tokenized and packed into BOS-led rows by Ray
  Data actors (cluster/pretrain_data.py); validation rows from the validation shards;
- the inputs: the run's tokenizer stage output (or `tokenizer=`), and the shards of a source name
  (embedded, fineweb) or a directory / object-store prefix, the last shard for validation;
- the model starts from the seed (identical on every worker; no broadcast).
`preflight` checks all of it before any worker starts; `run_pretrain` trains and exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.artifacts import clear_stage, load_tokenizer
from cluster.pretrain_data import ray_row_chunks
from cluster.specs import PretrainSpec, ShardReading, TrainSpec
from cluster.storage import RunStorage
from cluster.train import Plan, Prepared, check_resume, plan_every_size, train_and_export
from nanochat.common import DistInfo
from nanochat.data.dataloader import (
    DataPosition,
    Item,
    RowBatcher,
    plan_row_groups,
    rank_batches,
    validation_rows,
)
from nanochat.data.dataset import get_source, list_shards, train_val_split
from nanochat.train import Batch

STAGE = "pretrain"


@dataclass(frozen=True)
class ShardSource:
    """Pretraining's batches: parquet row groups tokenized and packed by Ray Data actors
    (cluster/pretrain_data.py); validation rows from the validation shards."""

    items: list[Item]  # every training row group, in order
    val_shards: list[str]
    reading: ShardReading

    def train_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer_uri: str, tokenizer: Any,
                      start: DataPosition) -> RowBatcher:
        r = self.reading
        chunks = ray_row_chunks(
            [tuple(i) for i in self.items], tokenizer_uri, spec.sequence_len + 1, start, dist.world_size,
            batch_size=spec.device_batch_size, prefetch_batches=r.prefetch_batches,
            actors=r.tokenizer_actors, actor_cpus=r.tokenizer_actor_cpus)
        return RowBatcher(chunks, spec.device_batch_size, start)

    def val_batches(self, spec: TrainSpec, dist: DistInfo, tokenizer: Any, plan: Plan) -> list[Batch]:
        eval_rows = max(1, self.reading.eval_tokens // spec.sequence_len)  # over all ranks
        rows = validation_rows(self.val_shards, tokenizer, spec.sequence_len + 1, eval_rows)
        return rank_batches(rows, spec.device_batch_size, dist.rank, dist.world_size)


def resolve_shards(data: str) -> tuple[list[str], list[str]]:
    """(train shards, val shards) from a source name (embedded, fineweb) or a dir / s3:// / gs:// prefix."""
    if "/" not in data and "://" not in data:
        data = str(get_source(data).directory)
    return train_val_split(list_shards(data))


def preflight(pretrain: PretrainSpec, storage: RunStorage) -> Prepared:
    """Every check that needs no worker: raises with a message that says what to change."""
    spec = pretrain.train
    tok_uri = pretrain.tokenizer or storage.stage_uri("tokenizer")
    if pretrain.tokenizer is None:
        storage.read_meta("tokenizer")  # raises "run the tokenizer stage first" when missing
    vocab = load_tokenizer(tok_uri).vocab_size
    plan = plan_every_size(spec, vocab)
    train, val = resolve_shards(pretrain.data)
    items = plan_row_groups(train)
    storage.check_writable()
    prepared = Prepared(tok_uri, ShardSource(items, val, pretrain.reading), plan, STAGE)
    return check_resume(prepared, storage, spec)


def run_pretrain(spec: PretrainSpec, storage: RunStorage, *, config: dict[str, Any],
                 force: bool = False) -> dict[str, Any]:
    """Check, train (resuming the run's last checkpoint unless `force`), export, write meta.json."""
    if force:
        clear_stage(storage, STAGE)
    return train_and_export(spec.train, storage, preflight(spec, storage), config)
