"""Training rows of the chat stages: conversations rendered with loss masks, packed (midtrain) or
padded one per row (SFT), with a per-rank order and a position that resumes exactly. Pure Python.

    data = ChatData("midtrain", layout="pack", offline=True)
    batches = data.batcher(tokenizer, row_len=257, batch_size=8, start=DataPosition(rank), world_size=W)
    x, y = next(batches)        # (8, 256) inputs, targets (-1 = no loss); batches.position -> checkpoint

Notable:
- the mixture (nanochat/tasks `training_mixture`, or task specs "name[:split][,key=value]") is split
  once: its last `val_conversations` are held out for validation loss, the rest is trained on.
  `check` refuses a mixture that holds an item of the run's evaluation sets (`check_disjoint`)
  and an empty one, naming the stage;
- stream: conversation g (g = 0, 1, 2, ...) is training conversation g mod N (epoch g // N); rank r
  of W reads g = r, r + W, r + 2W, ... A rank's place is a `DataPosition` whose item g is the next
  conversation it has not put in a handed-out row (row always 0: rows end on conversations). Its
  type is pretraining's (nanochat/data/positions.py), so a different world size resumes exactly as
  pretraining does: the old ranks' next conversations and those below the frontier their strides
  had not reached are dealt to the new ranks, none read twice or skipped;
- every conversation is `Tokenizer.render_conversation` (BOS first; mask 1 on what the assistant
  writes). One longer than a row keeps its first row_len tokens; one left with no assistant token
  to learn is skipped (both counted in `stats`);
- targets: y[t] = ids[t + 1] where mask[t + 1] is 1, else -1; padding is BOS with target -1;
- pack (midtrain): a row of row_len tokens takes whole conversations in order while they fit (so
  every row starts with BOS); the first that does not fit starts the next row; the rest of the row
  is padding. Rows end on conversation boundaries, so the position is one number;
- pad (SFT): one conversation per row, a micro-batch padded to its longest conversation.

Tests: `python -m pytest tests/test_chat_stages.py -m "not cluster"`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from nanochat.data.dataloader import DataPosition
from nanochat.errors import ConfigError
from nanochat.tasks import SEED, Task, TaskMixture, check_disjoint, eval_tasks, get_task, training_mixture

Layout = Literal["pack", "pad"]
Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, T) long, targets (B, T) long (-1 = no loss)
Rendered = tuple[int, list[int], list[int]]  # (global index g, ids, mask)


@dataclass
class StreamStats:
    """What a stream did to the conversations it read."""

    read: int = 0
    cropped: int = 0  # longer than a row: kept their first row_len tokens
    skipped: int = 0  # nothing for the assistant left to learn (after cropping): not used


def targets(ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    """Next-token targets of a rendered sequence: ids[t + 1] where mask[t + 1] else -1 (len(ids) - 1
    of them)."""
    return [i if m else -1 for i, m in zip(ids[1:], mask[1:], strict=True)]


def conversations(task: Task, indices: Sequence[int], tokenizer: Any, max_tokens: int, start: DataPosition,
                  world_size: int, stats: StreamStats | None = None,
                  stop: int | None = None) -> Iterator[Rendered]:
    """This rank's rendered conversations from `start`: g in `start.stream(world_size)` (g = start.item,
    + world_size, ... at a fixed world size) until `stop` (None: endless); g reads task item
    indices[g % len(indices)]. Cropped to max_tokens; those without a target are skipped."""
    if not indices:
        raise ConfigError(f"no training conversations in {task.describe()}: the mixture is empty")
    stats = stats if stats is not None else StreamStats()
    for g, _ in start.stream(world_size):
        if stop is not None and g >= stop:
            break
        ids, mask = tokenizer.render_conversation(task.get(indices[g % len(indices)]), max_tokens + 1)
        stats.read += 1
        if len(ids) > max_tokens:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            stats.cropped += 1
        if any(mask[1:]):
            yield g, ids, mask
        else:
            stats.skipped += 1


def build_rows(stream: Iterator[Rendered], layout: Layout, row_len: int,
               world_size: int) -> Iterator[tuple[list[int], list[int], int]]:
    """Rows (ids, mask, g of the first conversation not in this row or an earlier one) from a
    stream of conversations no longer than row_len: one per row ("pad"), or whole conversations
    in order while they fit ("pack"). A finite stream ends with its last, partly filled row (its g:
    the last conversation's + world_size; an endless stream always names the one it read ahead)."""
    if layout not in ("pack", "pad"):
        raise ConfigError(f"layout must be 'pack' (midtrain) or 'pad' (SFT), got {layout!r}")
    pending = next(stream, None)
    while pending is not None:
        g, ids, mask = pending
        ids, mask, next_g = list(ids), list(mask), g + world_size
        pending = next(stream, None)
        while layout == "pack" and pending is not None and len(ids) + len(pending[1]) <= row_len:
            ids += pending[1]
            mask += pending[2]
            next_g = pending[0] + world_size
            pending = next(stream, None)
        if pending is not None:
            next_g = pending[0]  # read ahead, not placed: the next row starts with it
        yield ids, mask, next_g


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], width: int, pad_id: int) -> Batch:
    """(x, y) of rows of at most width + 1 tokens: x (B, width) padded with pad_id, y (B, width) with -1."""
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[b, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        y[b, :n] = torch.tensor(targets(ids, mask), dtype=torch.long)
    return x, y


def batch_width(layout: Layout, row_len: int, rows: Sequence[tuple[list[int], list[int]]]) -> int:
    """Positions of a micro-batch: row_len - 1 when packed, the longest row - 1 when padded."""
    return row_len - 1 if layout == "pack" else max(len(ids) for ids, _ in rows) - 1


class ChatBatcher:
    """Iterator of (x, y) micro-batches of `batch_size` rows from a rank's conversation stream;
    `position` is always the first conversation not in a handed-out batch (what a checkpoint saves)."""

    def __init__(self, stream: Iterator[Rendered], layout: Layout, batch_size: int, row_len: int, pad_id: int,
                 start: DataPosition, world_size: int, stats: StreamStats | None = None) -> None:
        if batch_size < 1 or row_len < 2:
            raise ValueError(f"need batch_size >= 1 and row_len >= 2, got {batch_size} and {row_len}")
        self.rows = build_rows(stream, layout, row_len, world_size)
        self.layout, self.batch_size, self.row_len, self.pad_id = layout, batch_size, row_len, pad_id
        self.position = start
        self.stats = stats if stats is not None else StreamStats()

    def __iter__(self) -> ChatBatcher:
        return self

    def __next__(self) -> Batch:
        rows = []
        for ids, mask, next_g in self.rows:
            rows.append((ids, mask))
            if len(rows) == self.batch_size:
                self.position = self.position.at(next_g, 0)
                return pad_rows(rows, batch_width(self.layout, self.row_len, rows), self.pad_id)
        raise StopIteration  # only a finite stream ends

    def prime(self) -> None:
        """Nothing to start: rows are rendered on demand (the trainer's batch-source contract)."""

    def close(self) -> None:
        """Nothing to stop (the trainer's batch-source contract)."""


def parse_task_spec(spec: str) -> Task:
    """A task from "name[:split][,key=value...]", e.g. "sciq:validation,stop=500" or "spelling,size=300"
    (integer values are converted); unknown names and options are errors naming them."""
    head, *options = [part.strip() for part in spec.split(",")]
    name, _, split = head.partition(":")
    kwargs: dict[str, Any] = {"split": split.strip()} if split else {}
    for option in options:
        key, eq, value = (x.strip() for x in option.partition("="))
        if not eq or not key:
            raise ConfigError(f"task spec {spec!r}: option {option!r} must look like key=value")
        kwargs[key] = int(value) if value.lstrip("-").isdigit() else value
    return get_task(name.strip(), **kwargs)


class ChatData:
    """The conversations of one chat stage and how they become rows; picklable (the mixture is
    rebuilt where it is first used, e.g. in each Ray Train worker)."""

    def __init__(self, stage: str, layout: Layout, *, offline: bool | None = None,
                 tasks: Sequence[str] | None = None, seed: int = SEED, val_conversations: int = 0) -> None:
        if layout not in ("pack", "pad"):
            raise ConfigError(f"layout must be 'pack' (midtrain) or 'pad' (SFT), got {layout!r}")
        if val_conversations < 0:
            raise ConfigError(f"val_conversations must be >= 0, got {val_conversations}")
        self.stage, self.layout, self.offline, self.seed = stage, layout, offline, seed
        self.tasks = list(tasks) if tasks is not None else None
        self.val_conversations = val_conversations
        self._mixture: Task | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mixture": None}

    def mixture(self) -> Task:
        """The stage's mixture (built once per process)."""
        if self._mixture is None:
            if self.tasks is None:
                self._mixture = training_mixture(self.stage, self.offline, seed=self.seed)
            elif not self.tasks:
                raise ConfigError(f"the {self.stage} mixture lists no tasks: name at least one (or leave "
                                 "`tasks` unset for the stage's own mixture)")
            else:
                self._mixture = TaskMixture([parse_task_spec(s) for s in self.tasks], seed=self.seed)
        return self._mixture

    def split(self) -> tuple[list[int], list[int]]:
        """(training item indices, validation item indices): the mixture's last val_conversations are
        held out."""
        mixture = self.mixture()
        n = len(mixture)
        if n == 0:
            raise ConfigError(f"the {self.stage} mixture has zero conversations ({mixture.describe()}): "
                             "check its tasks, their slices and their data")
        if self.val_conversations >= n:
            raise ConfigError(f"val_conversations {self.val_conversations} leaves nothing to train on in the "
                             f"{self.stage} mixture of {n} conversations: lower it")
        cut = n - self.val_conversations
        return list(range(cut)), list(range(cut, n))

    def check(self, evals: dict[str, Task] | None = None) -> dict[str, Any]:
        """Refuse an empty mixture or one sharing items with the evaluation sets; describe it."""
        train, val = self.split()
        mixture = self.mixture()
        check_disjoint(mixture, (eval_tasks(self.offline) if evals is None else evals).values())
        counts = mixture.counts() if isinstance(mixture, TaskMixture) else {mixture.name: len(mixture)}
        return {"conversations": len(mixture), "train": len(train), "validation": len(val), "tasks": counts}

    def batcher(self, tokenizer: Any, row_len: int, batch_size: int, start: DataPosition,
                world_size: int) -> ChatBatcher:
        """This rank's endless training micro-batches from `start` (rows of row_len tokens at most)."""
        train, _ = self.split()
        stats = StreamStats()
        stream = conversations(self.mixture(), train, tokenizer, row_len, start, world_size, stats)
        return ChatBatcher(stream, self.layout, batch_size, row_len, tokenizer.get_bos_token_id(), start,
                           world_size, stats)

    def _rows(self, indices: Sequence[int], tokenizer: Any,
              row_len: int) -> list[tuple[list[int], list[int]]]:
        """One pass over `indices` of the mixture, laid out as in training."""
        if not indices:
            return []
        stream = conversations(self.mixture(), indices, tokenizer, row_len, DataPosition(0), 1,
                               stop=len(indices))
        return [(ids, mask) for ids, mask, _ in build_rows(stream, self.layout, row_len, 1)]

    def validation_batches(self, tokenizer: Any, row_len: int, batch_size: int, rank: int,
                           world_size: int) -> list[Batch]:
        """Rank `rank`'s share (every world_size-th) of the held-out conversations as micro-batches."""
        _, val = self.split()
        rows = self._rows(val[rank::world_size], tokenizer, row_len)
        bos = tokenizer.get_bos_token_id()
        chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        return [pad_rows(c, batch_width(self.layout, row_len, c), bos) for c in chunks]

    def rows_per_epoch(self, tokenizer: Any, row_len: int, sample: int = 4000) -> int:
        """Rows one pass over the training conversations makes, extrapolated from its first `sample`
        (exact when there are no more): the horizon of `num_epochs`."""
        train, _ = self.split()
        n = min(sample, len(train))
        return max(1, math.ceil(len(self._rows(train[:n], tokenizer, row_len)) * len(train) / n))
