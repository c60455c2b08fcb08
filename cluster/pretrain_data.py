"""Pretraining data on Ray Data: read row groups → tokenize and pack in an actor pool → rows.

Each Train worker builds its own pipeline over ITS items (nanochat/data/dataloader.py: rank r of W
reads items r, r + W, ...; after a change of world size first the leftover items dealt to it,
nanochat/data/positions.py), starting at its checkpointed DataPosition, and consumes it with
prefetching. No streaming_split: the assignment is fixed, so the position is exact and ranks
never wait on each other for data.

    items (from_items: item, shard, row group, rows to skip)
      ─▶ map_batches(ReadTokenizePack): an ActorPoolStrategy pool, fractional CPU per actor, the
         tokenizer loaded once per actor; each call reads one row group, tokenizes and packs it
      ─▶ rows {tokens (row_len,), item, row} ─▶ iter_batches(prefetch) in the worker
      ─▶ RowBatcher ─▶ train_loop

Reading happens inside the actor rather than in separate read tasks: on a small machine each
extra Ray worker process (Python + torch imports) costs seconds of start-up per pipeline, while a
row group (~1,000 documents) takes milliseconds to read next to its tokenization.

The rows are exactly those of `nanochat.data.dataloader.local_row_chunks` (same read, tokenizer and
packing functions), which the single-process reference and the tests use.
CPUs: the actors take fractions of a CPU so that they fit next to Train workers
on a small machine (the local cluster advertises 2 logical CPUs per core for this).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import islice

import numpy as np
import ray

from cluster.artifacts import load_tokenizer
from nanochat.data.dataloader import DataPosition, Item, RowChunk, item_source, read_texts, tokenize_and_pack


class ReadTokenizePack:
    """Actor-pool UDF: loads the tokenizer once; each item's row group → packed rows."""

    def __init__(self, tokenizer_uri: str, row_len: int) -> None:
        self.tokenizer = load_tokenizer(tokenizer_uri)
        self.row_len = row_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens, items, rows = [], [], []
        for item, shard, group, skip in zip(batch["item"], batch["shard"], batch["row_group"], batch["skip"],
                                            strict=True):
            packed = tokenize_and_pack(self.tokenizer, read_texts(str(shard), int(group)), self.row_len)
            tokens.append(packed[skip:])
            items.append(np.full(max(0, len(packed) - skip), item, dtype=np.int64))
            rows.append(np.arange(skip, len(packed), dtype=np.int64))
        return {"tokens": np.concatenate(tokens), "item": np.concatenate(items), "row": np.concatenate(rows)}


def rank_dataset(
    plan: Sequence[Item],
    items: Sequence[tuple[int, int]],
    tokenizer_uri: str,
    row_len: int,
    *,
    actors: int = 1,
    actor_cpus: float = 0.25,
) -> ray.data.Dataset:
    """Rows of `items` ((item, rows to skip) pairs) in order, each item without its first skipped rows."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the position is only exact if rows come in order
    ctx.enable_progress_bars = False  # runs inside Train workers: keep their logs readable
    ctx.print_on_execution_start = False
    records = [
        {"item": i, "shard": item_source(plan, i)[0], "row_group": item_source(plan, i)[1],
         "skip": skip}
        for i, skip in items
    ]
    return ray.data.from_items(records, override_num_blocks=len(records)).map_batches(
        ReadTokenizePack,
        fn_constructor_kwargs={"tokenizer_uri": tokenizer_uri, "row_len": row_len},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
    )


def ray_row_chunks(
    plan: Sequence[Item],
    tokenizer_uri: str,
    row_len: int,
    start: DataPosition,
    world_size: int,
    *,
    batch_size: int,
    prefetch_batches: int = 4,
    actors: int = 1,
    actor_cpus: float = 0.25,
) -> Iterator[RowChunk]:
    """This rank's rows from `start` on (its items: `start.stream`), endless: one Dataset per pass
    over the next ceil(N / W) items of the stream (a pass over the rank's share of the row groups),
    the next pass built when one ends."""
    per_pass = max(1, math.ceil(len(plan) / world_size))
    stream = start.stream(world_size)
    while True:
        items = list(islice(stream, per_pass))
        ds = rank_dataset(plan, items, tokenizer_uri, row_len, actors=actors, actor_cpus=actor_cpus)
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy",
                                     prefetch_batches=prefetch_batches):
            yield batch["tokens"], batch["item"], batch["row"]

