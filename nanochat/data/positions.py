"""A rank's place in the training item stream, exact across any number of world-size changes.
Pure Python. Pretraining (items = row groups, nanochat/data/dataloader.py) and the chat stages
(items = conversations, nanochat/data/chat_data.py) share it.

The model: items 0, 1, 2, ... are read in parallel by W ranks. At a fixed world size rank r reads
r, r + W, r + 2W, ... (today's order, unchanged). At a checkpoint the work left of the whole run is
(a) a finite list of leftover items, each with the rows of it already consumed (every rank's partly
read item, and the items its stride had not reached yet below the frontier T), and (b) the untouched
tail, every item >= T. `resume_positions` deals the leftovers, in item order, round-robin to the W'
new ranks (leftover k to rank k mod W'), then rank r goes on with T + r, T + r + W', ... So a rank's
state is: its current item and the rows of it consumed, its queue of leftovers, and (tail, stride).

    rank r's stream = (item, row), *queue, tail, tail + stride, tail + 2 stride, ...

The frontier T is one past the highest item any old rank has touched in its strided tail:
T = max(tail) - stride + 1 (each rank's tail class holds only consumed items below its `tail`, so
every item >= T is untouched, and every item below T is consumed, in someone's queue, or a tail
item a rank had not reached, which becomes a leftover). No row is skipped or read twice, whatever
the sequence of sizes, and a stream only ever increases (leftovers < T <= tail), so "read until
item n" is well defined. A rank holding no leftover starts right at T + r; a rank holding more
leftovers reads them first: the ranks' frontiers drift apart, which is why T is recomputed at
every resize from all ranks' states.

JSON (in each rank's data_rankNNNNN.json of a checkpoint): {"item", "row", "queue": [[item, row],
...], "tail", "stride"}. A legacy {"item", "row"} (checkpoints before this file) has no tail: it
means the old stride rule, tail = item + W with W the world size that saved it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import count
from typing import Any


@dataclass(frozen=True)
class DataPosition:
    """Where one rank is in its item stream (see the module docstring). `tail`/`stride` None: a bare
    position, read with the stride rule of the reader's world size (fresh runs, legacy checkpoints)."""

    item: int  # the item being read (pretraining: item % N is the row group, item // N the epoch)
    row: int = 0  # rows of that item already consumed (chat stages: always 0, `item` is unread)
    queue: tuple[tuple[int, int], ...] = ()  # leftovers (item, rows consumed) read after `item`, ascending
    tail: int | None = None  # first item of the strided tail after the queue
    stride: int | None = None  # the tail's step: the world size since the last resize

    def __post_init__(self) -> None:
        if (self.tail is None) != (self.stride is None) or (self.tail is None and self.queue):
            raise ValueError(f"a data position needs both tail and stride, or neither and no queue: {self}")
        if self.item < 0 or self.row < 0 or (self.stride is not None and self.stride < 1):
            raise ValueError(f"a data position has item, row >= 0 and stride >= 1: {self}")

    def pinned(self, world_size: int) -> DataPosition:
        """This position with its tail and stride explicit (a bare one takes `world_size`'s stride rule)."""
        if self.stride is not None:
            return self
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        return replace(self, tail=self.item + world_size, stride=world_size)

    def stream(self, world_size: int) -> Iterator[tuple[int, int]]:
        """(item, rows to skip) of this rank's stream from here, endless and increasing."""
        p = self.pinned(world_size)
        if p.stride != world_size:
            raise ValueError(f"this data position was dealt to {p.stride} ranks, not {world_size}: "
                             "call resume_positions with the new world size first")
        yield p.item, p.row
        yield from p.queue
        assert p.tail is not None  # pinned
        for k in count():
            yield p.tail + k * p.stride, 0

    def at(self, item: int, row: int) -> DataPosition:
        """The position of this rank's stream once it reads `item` with `row` rows of it consumed."""
        if self.stride is None:
            return DataPosition(item, row)
        if item == self.item:
            return replace(self, row=row)
        for k, (leftover, _) in enumerate(self.queue):
            if leftover == item:
                return replace(self, item=item, row=row, queue=self.queue[k + 1 :])
        assert self.tail is not None
        if item >= self.tail and (item - self.tail) % self.stride == 0:
            return replace(self, item=item, row=row, queue=(), tail=item + self.stride)
        raise ValueError(f"item {item} is not in this rank's stream from {self}")

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"item": self.item, "row": self.row}
        if self.stride is not None:
            d |= {"queue": [list(q) for q in self.queue], "tail": self.tail, "stride": self.stride}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        """From `as_dict` (extra keys such as the checkpoint's rank and world_size are ignored)."""
        if "stride" not in d:
            return cls(int(d["item"]), int(d["row"]))
        queue = tuple((int(i), int(r)) for i, r in d["queue"])
        return cls(int(d["item"]), int(d["row"]), queue, int(d["tail"]), int(d["stride"]))


def start_positions(world_size: int) -> list[DataPosition]:
    """Fresh run: rank r starts at item r with the stride rule of `world_size`."""
    return [DataPosition(r, 0).pinned(world_size) for r in range(world_size)]


def leftovers(saved: Sequence[DataPosition]) -> tuple[list[tuple[int, int]], int]:
    """(leftover (item, rows consumed) in item order, frontier T) of the states of ALL ranks of a world."""
    world = len(saved)
    states = [p.pinned(world) for p in saved]
    if any(p.stride != world for p in states):
        raise ValueError(f"the {world} saved data positions were dealt to worlds of "
                         f"{sorted({p.stride for p in states})} ranks: a checkpoint must hold every rank's")
    frontier = max(p.tail for p in states if p.tail is not None) - world + 1
    left: list[tuple[int, int]] = []
    for p in states:
        assert p.tail is not None
        left += [(p.item, p.row), *p.queue, *((i, 0) for i in range(p.tail, frontier, world))]
    left.sort()
    items = [i for i, _ in left]
    if len(set(items)) != len(items) or (items and items[-1] >= frontier):
        raise ValueError(f"the saved data positions overlap (item read by two ranks): {list(saved)}")
    return left, frontier


def resume_positions(saved: Sequence[DataPosition], new_world_size: int) -> list[DataPosition]:
    """Positions for `new_world_size` ranks from the positions of every rank of a saved run.

    Same world size: the saved positions (with the stride rule made explicit). Otherwise the leftovers
    are dealt round-robin and rank r's tail starts at T + r: exact (module docstring)."""
    if new_world_size < 1 or not saved:
        raise ValueError(f"need saved positions and a world size >= 1, got {len(saved)} and {new_world_size}")
    if len(saved) == new_world_size:
        return [p.pinned(new_world_size) for p in saved]
    left, frontier = leftovers(saved)
    out = []
    for r in range(new_world_size):
        mine = left[r::new_world_size]
        tail = frontier + r
        if mine:
            (item, row), queue = mine[0], tuple(mine[1:])
            out.append(DataPosition(item, row, queue, tail, new_world_size))
        else:
            out.append(DataPosition(tail, 0, (), tail + new_world_size, new_world_size))
    return out
