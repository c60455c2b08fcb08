"""Pretraining rows: BOS-aligned packing, a fixed per-rank order of row groups, and a data
position that resumes exactly. Pure Python (numpy + torch); the cluster's Ray Data pipeline
(cluster/pretrain_data.py) and the single-process path here call the same functions, so both
produce the same rows.

Notable:
- The unit of reading is one row group of one training shard, an "item". Items form one endless
  sequence: item i is row group `plan[i % N]` (N row groups in all) in epoch i // N. Rank r of W
  reads items r, r + W, r + 2W, ... — a fixed assignment, never a dynamic split, so every rank
  always has data. Its place is a `DataPosition` (nanochat/data/positions.py): the item being read
  and how many of its rows are already used, plus, after a change of world size, the leftover items
  dealt to it and where its strided tail starts.
- `pack_rows` turns one item's documents into rows of exactly `row_len` tokens, each starting
  with BOS: a document longer than a row is cut into row-sized pieces, every piece after the
  first getting a BOS of its own; the remaining shorter pieces are packed best-fit (largest piece
  that fits the space left); when nothing fits, a piece is cropped to fill the row and its rest,
  behind a new BOS, goes back to the pool. No token is lost except the last partial row of an
  item (< row_len tokens per row group of ~1,000 documents). Deterministic: same documents,
  same rows.
- Exact resume: re-read and re-pack item `item`, skip `row` rows, go on with the rank's stream.
- Exact at another world size too (`resume_positions`, any sequence of sizes): the old ranks'
  partly read items and the items below the frontier they had not reached are dealt round-robin to
  the new ranks, each item going on at the row its old owner stopped at; the untouched tail is
  strided over the new ranks. No row is skipped or read twice; the global batch (rows per step)
  does not depend on the world size. What a resize costs: the re-read and re-pack of each partly
  read item (as at any resume), and ranks whose streams drift apart in item numbers (harmless).
  A fixed world size reads exactly the order above.
- `RowBatcher` turns chunks of rows into (B, T) input/target micro-batches and keeps the position
  just after the last row it handed out: that is what a checkpoint saves.
"""

from __future__ import annotations

import bisect
import concurrent.futures
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import chain, islice
from typing import Any, Protocol

import numpy as np
import torch

from nanochat.data.dataset import iter_row_groups, validate_shard
from nanochat.data.positions import DataPosition, resume_positions, start_positions
from nanochat.errors import ConfigError

__all__ = ["DataPosition", "resume_positions", "start_positions"]  # re-exported (home: positions.py)

Item = tuple[str, int]  # (shard path or URI, row group index inside it)
# rows (n, row_len) int, their items (n,), row indices (n,)
RowChunk = tuple[np.ndarray, np.ndarray, np.ndarray]


class TextTokenizer(Protocol):
    """What packing needs from a tokenizer (nanochat.tokenizer.Tokenizer has it)."""

    def encode(self, text: Any, prepend: Any = None, append: Any = None,
               num_threads: int | None = None) -> Any: ...

    def get_bos_token_id(self) -> int: ...


def plan_row_groups(shards: Sequence[str], threads: int = 16) -> list[Item]:
    """Every (shard, row group) of `shards`, in shard then row-group order (footers read in parallel)."""
    if not shards:
        raise ConfigError("no training shards given: "
                          "point the stage at a directory/prefix with parquet shards")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        infos = list(pool.map(validate_shard, shards))
    plan = [(info.path, g) for info in infos for g in range(info.num_row_groups)]
    if not plan:
        raise ValueError(f"the shards {list(shards)[:3]}... hold no row groups (empty files?)")
    return plan


def item_source(plan: Sequence[Item], item: int) -> Item:
    """(shard, row group) that global item `item` reads."""
    return plan[item % len(plan)]


def read_texts(shard: str, row_group: int) -> list[str]:
    """The documents of one row group of one shard (local path or s3:// / gs:// URI)."""
    return next(iter_row_groups([shard], start=(0, row_group))).texts


def pack_rows(docs: Sequence[Sequence[int]], row_len: int, bos_id: int) -> np.ndarray:
    """Pack documents (token ids WITHOUT a leading BOS) into (R, row_len) int32 rows that each
    start with BOS; see the module docstring for the rule. Empty documents are skipped.

    Rows: first the full-row pieces of long documents in document order, then the best-fit rows."""
    if row_len < 2:
        raise ValueError(f"row_len must be >= 2 (a BOS and one token), got {row_len}")
    body = row_len - 1  # document tokens that fit behind one BOS
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter(chain.from_iterable(docs), dtype=np.int32, count=int(lengths.sum()))
    starts = np.cumsum(lengths) - lengths  # offset of each document in `flat`
    full = lengths // body  # full-row pieces per document
    piece_starts = np.repeat(starts, full) + body * (np.arange(full.sum())
                                                     - np.repeat(np.cumsum(full) - full, full))
    full_rows = np.empty((len(piece_starts), row_len), dtype=np.int32)
    full_rows[:, 0] = bos_id
    full_rows[:, 1:] = flat[piece_starts[:, None] + np.arange(body)]
    pool = _PiecePool()
    for start, n in zip((starts + full * body).tolist(), (lengths - full * body).tolist(), strict=True):
        if n:
            pool.push(start, n)
    packed: list[list[tuple[int, int]]] = []  # per row: (start in flat, document tokens) of its pieces
    while pool.total >= row_len:
        row: list[tuple[int, int]] = []
        space = row_len
        while space:
            piece = pool.pop_largest_at_most(space)
            if piece is None:  # every piece is longer than the space left: crop one to fill the row
                start, n = pool.pop_smallest()
                row.append((start, space - 1))
                pool.push(start + space - 1, n - (space - 1))
                break
            row.append(piece)
            space -= piece[1] + 1
        packed.append(row)
    best_fit = np.empty((len(packed), row_len), dtype=np.int32)
    for r, row in enumerate(packed):
        at = 0
        for start, n in row:
            best_fit[r, at] = bos_id
            best_fit[r, at + 1 : at + 1 + n] = flat[start : start + n]
            at += n + 1
    return np.concatenate([full_rows, best_fit])


class _PiecePool:
    """Pieces (a BOS + n document tokens at `start` in the flat token array) bucketed by length
    (n + 1); FIFO within a length, so the packing is deterministic."""

    def __init__(self) -> None:
        self.buckets: dict[int, deque[tuple[int, int]]] = {}
        self.lengths: list[int] = []  # sorted distinct piece lengths present
        self.total = 0  # tokens in the pool, BOS included

    def push(self, start: int, n: int) -> None:
        length = n + 1
        if length not in self.buckets:
            self.buckets[length] = deque()
            bisect.insort(self.lengths, length)
        self.buckets[length].append((start, n))
        self.total += length

    def _pop(self, length: int) -> tuple[int, int]:
        bucket = self.buckets[length]
        piece = bucket.popleft()
        if not bucket:
            del self.buckets[length]
            self.lengths.remove(length)
        self.total -= length
        return piece

    def pop_largest_at_most(self, space: int) -> tuple[int, int] | None:
        k = bisect.bisect_right(self.lengths, space) - 1
        return self._pop(self.lengths[k]) if k >= 0 else None

    def pop_smallest(self) -> tuple[int, int]:
        return self._pop(self.lengths[0])


def tokenize_and_pack(tokenizer: TextTokenizer, texts: Any, row_len: int, num_threads: int = 1) -> np.ndarray:
    """Rows of one item: encode its documents (list of str or a pyarrow string array), pack them."""
    docs = tokenizer.encode(texts, num_threads=num_threads)
    return pack_rows(docs, row_len, tokenizer.get_bos_token_id())


def local_row_chunks(
    plan: Sequence[Item], tokenizer: TextTokenizer, row_len: int, start: DataPosition, world_size: int
) -> Iterator[RowChunk]:
    """This rank's rows item by item (`start.stream`), read and packed in this process (no Ray):
    the reference for the cluster pipeline, and the data path of single-process runs. Endless."""
    for item, skip in start.stream(world_size):
        rows = tokenize_and_pack(tokenizer, read_texts(*item_source(plan, item)), row_len)[skip:]
        n = len(rows)
        yield rows, np.full(n, item, dtype=np.int64), np.arange(skip, skip + n, dtype=np.int64)


class RowBatcher:
    """Iterator of (inputs (B, T), targets (B, T)) int64 micro-batches cut from row chunks.

    `position` is always where the next unread row is: after a checkpoint, a new RowBatcher over
    a stream started at that position continues with exactly the rows this one would have given."""

    def __init__(self, chunks: Iterator[RowChunk], batch_size: int, start: DataPosition) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.chunks, self.batch_size, self.position = chunks, batch_size, start  # `start`: of the stream
        self._rows: list[np.ndarray] = []
        self._items: list[np.ndarray] = []
        self._idx: list[np.ndarray] = []
        self._buffered = 0
        self.last_rows: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __iter__(self) -> RowBatcher:
        return self

    def close(self) -> None:
        """Stop the underlying stream (a Ray Data pipeline shuts down its actors)."""
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()

    def prime(self) -> None:
        """Read ahead until one micro-batch is buffered (starts a lazy pipeline; the position
        does not move)."""
        while self._buffered < self.batch_size:
            rows, items, idx = next(self.chunks)
            if len(rows):
                self._rows.append(np.asarray(rows))
                self._items.append(np.asarray(items))
                self._idx.append(np.asarray(idx))
                self._buffered += len(rows)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.prime()
        rows, items, idx = (np.concatenate(parts) for parts in (self._rows, self._items, self._idx))
        b = self.batch_size
        self._rows, self._items, self._idx = [rows[b:]], [items[b:]], [idx[b:]]
        self._buffered -= b
        self.position = self.position.at(int(items[b - 1]), int(idx[b - 1]) + 1)
        self.last_rows = items[:b], idx[:b]  # (item, row) of each row handed out: for checks
        batch = torch.from_numpy(rows[:b].astype(np.int64))  # (B, row_len)
        return batch[:, :-1], batch[:, 1:]


def validation_rows(val_shards: Sequence[str], tokenizer: TextTokenizer, row_len: int,
                    num_rows: int) -> np.ndarray:
    """The first `num_rows` rows of packing the first k validation documents, k = 64, 128, 256,
    ... the smallest that gives enough rows: (num_rows, row_len) int32. Every rank computes the
    same rows (rank r evaluates rows r, r + W, ...; the sums are all-reduced)."""
    texts = (text for group in iter_row_groups(val_shards) for text in group.texts)
    docs: list[list[int]] = []
    k = 64
    while True:
        new = list(islice(texts, k - len(docs)))
        docs += tokenizer.encode(new, num_threads=1) if new else []
        rows = pack_rows(docs, row_len, tokenizer.get_bos_token_id())
        if len(rows) >= num_rows:
            return rows[:num_rows]
        if len(docs) < k:  # the shards ran out
            break
        k *= 2
    raise ValueError(
        f"the validation shard(s) {list(val_shards)} give only {len(rows)} rows of {row_len} tokens, "
        f"{num_rows} are needed: lower eval_tokens or use a larger validation shard"
    )


def rank_batches(rows: np.ndarray, batch_size: int, rank: int,
                 world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank `rank`'s share (rows rank::world_size) of evaluation rows as (inputs, targets) batches."""
    mine = torch.from_numpy(np.asarray(rows[rank::world_size], dtype=np.int64))
    return [(b[:, :-1], b[:, 1:]) for b in mine.split(batch_size)]
