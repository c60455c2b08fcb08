"""Ray Data pipelines over text shards: read → crop → take a character budget → count BPE chunks.

The tokenizer stage's text is defined exactly, so the cluster and a single process agree on it:
documents in shard order (then row order), each cropped to its first `doc_cap` characters, taken
whole until their cropped lengths add up to `max_chars` (the document that crosses the budget is
included, as in the seed). `budget_documents()` is the same definition in plain Python.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from nanochat.data.dataset import TEXT_COLUMN, ShardError, iter_documents


def _crop(batch: pa.Table, doc_cap: int) -> pa.Table:
    """Crop every document to `doc_cap` characters and record its length in column `n`."""
    text = pc.utf8_slice_codeunits(batch[TEXT_COLUMN], 0, doc_cap)
    return pa.table({TEXT_COLUMN: text, "n": pc.utf8_length(text)})


def _budget_count(lengths: np.ndarray, max_chars: int) -> int:
    """How many leading documents the character budget takes (the crossing one included)."""
    if len(lengths) == 0:
        return 0
    cum = np.cumsum(lengths, dtype=np.int64)
    k = int(np.searchsorted(cum, max_chars, side="left")) + 1
    return min(k, len(lengths))


def read_budgeted_text(shards: list[str], *, doc_cap: int, max_chars: int, min_blocks: int = 2) -> tuple[
        ray.data.Dataset, int, int]:
    """Dataset of the budgeted, cropped documents (column `text`), its document count and characters.

    The cropped text is materialized once in the object store (max_chars bytes and a little more),
    so the shards are read once; only the per-document lengths travel to the driver.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the budget is a prefix: order must be kept
    ds = (ray.data.read_parquet(shards, override_num_blocks=max(min_blocks, len(shards)))
          .select_columns([TEXT_COLUMN]))
    ds = ds.map_batches(_crop, fn_kwargs={"doc_cap": doc_cap}, batch_format="pyarrow", batch_size=None)
    ds = ds.materialize()
    lengths = np.concatenate(
        [np.asarray(b["n"])
         for b in ds.select_columns(["n"]).iter_batches(batch_format="numpy", batch_size=None)]
        or [np.zeros(0, dtype=np.int64)]
    )
    k = _budget_count(lengths, max_chars)
    if k == 0 or int(lengths[:k].sum()) == 0:
        raise ShardError(f"no text to train on: the shards {shards[:3]} hold no non-empty documents")
    ds = ds.limit(k).select_columns([TEXT_COLUMN]).repartition(max(min_blocks, 1))
    return ds, k, int(lengths[:k].sum())


def budget_documents(shards: list[str], *, doc_cap: int, max_chars: int) -> Iterator[str]:
    """The same text as `read_budgeted_text`, in one process (reference and small inputs)."""
    total = 0
    for doc in iter_documents(shards):
        doc = doc[:doc_cap]
        yield doc
        total += len(doc)
        if total >= max_chars:
            return


_STATS_LINE = re.compile(r"(\d+)\s+tasks? executed,\s+(\d+)\s+blocks? produced")


def map_stage_counts(stats: str, name: str) -> tuple[int, int]:
    """(tasks, blocks) of the operator whose name contains `name`, parsed from `Dataset.stats()`."""
    tasks = blocks = 0
    for section in stats.split("Operator")[1:]:
        header = section.splitlines()[0] if section.splitlines() else ""
        if name in header:
            m = _STATS_LINE.search(section)
            if m:
                tasks, blocks = tasks + int(m.group(1)), blocks + int(m.group(2))
    return tasks, blocks
