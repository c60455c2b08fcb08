"""Tests of the data position across world-size changes (nanochat/data/positions.py) with the
pretraining row stream (nanochat/data/dataloader.py): runs that resize 2 -> 1 -> 2 (and random
sequences of sizes) read every row at most once, leave no hole below the frontier, and consume
exactly steps x global batch rows; a fixed world size reads exactly the old stride order. No Ray, but
for one cluster-marked test: Ray Data's rows of a resized position are the local path's.

Run: PYTHONPATH=. python -m pytest tests/test_data_positions.py -q
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.data import dataloader as dl
from nanochat.data.dataset import get_source, list_shards, write_shards
from nanochat.data.positions import DataPosition, leftovers, resume_positions, start_positions
from tests.helpers import ByteTokenizer

Chunks = Callable[[DataPosition, int], Iterator[dl.RowChunk]]


def checkpoint(positions: Sequence[DataPosition]) -> list[DataPosition]:
    """Positions through the JSON of a checkpoint (with the rank and world size it stores beside them)."""
    files = [json.dumps({"rank": r, "world_size": len(positions), **p.as_dict()}) for r, p in enumerate(positions)]
    return [DataPosition.from_dict(json.loads(f)) for f in files]


def attempt(chunks: Chunks, saved: Sequence[DataPosition] | None, world: int, steps: int, global_rows: int,
            micro: int, consumed: Counter) -> list[DataPosition]:
    """Train `steps` steps on `world` ranks (each step: global_rows / world rows per rank, in micro-batches
    of `micro` rows) from a checkpoint's positions (None: a fresh run); count every (item, row) handed
    out; the positions every rank would checkpoint at the end."""
    positions = start_positions(world) if saved is None else resume_positions(saved, world)
    batchers = [dl.RowBatcher(chunks(p, world), micro, p) for p in positions]
    assert global_rows % (world * micro) == 0
    for _ in range(steps):
        for b in batchers:
            for _ in range(global_rows // world // micro):
                x, _ = next(b)
                items, rows = b.last_rows
                assert len(x) == micro == len(items)
                consumed.update(zip(items.tolist(), rows.tolist(), strict=True))
    return checkpoint([b.position for b in batchers])


def check_accounting(consumed: Counter, positions: Sequence[DataPosition], rows_in: Callable[[int], int],
                     total_rows: int) -> None:
    """No row twice; each item's consumed rows are a prefix; below the frontier every item is fully read
    or a leftover continuing exactly where the reading stopped; nothing at or above it is touched."""
    assert sum(consumed.values()) == total_rows and max(consumed.values(), default=1) == 1
    per_item = Counter(item for item, _ in consumed)
    for item, n in per_item.items():
        assert all((item, r) in consumed for r in range(n)), f"item {item}: rows read are not a prefix"
    left, frontier = leftovers(positions)
    dealt = dict(left)
    assert all(per_item[i] == skip for i, skip in dealt.items()), "a leftover does not go on where reading stopped"
    for item in range(frontier):
        assert item in dealt or per_item[item] == rows_in(item), f"item {item} below the frontier is neither"
    assert not any(i >= frontier for i in per_item), "an item at or above the frontier was read"
    streams = [p.stream(len(positions)) for p in positions]  # the ranks' remaining items are disjoint
    ahead = [i for s in streams for i, _ in (next(s) for _ in range(len(left) + 3))]
    assert len(ahead) == len(set(ahead))


@pytest.fixture(scope="module")
def pack_stream() -> tuple[Chunks, Callable[[int], int]]:
    """The embedded pack's real training row groups packed into 16 KiB byte rows (~240 per item):
    (chunks of a position, rows in an item). Packed rows are cached per row group."""
    shards = list_shards(str(get_source("embedded").directory))[:-1]
    plan, tok, row_len = dl.plan_row_groups(shards), ByteTokenizer(), 16385

    @cache
    def packed(group: int) -> np.ndarray:
        return dl.tokenize_and_pack(tok, dl.read_texts(*plan[group]), row_len)

    def chunks(start: DataPosition, world: int) -> Iterator[dl.RowChunk]:
        for item, skip in start.stream(world):
            rows = packed(item % len(plan))[skip:]
            yield rows, np.full(len(rows), item), np.arange(skip, skip + len(rows))

    return chunks, lambda item: len(packed(item % len(plan)))


@pytest.mark.usefixtures("embedded_pack")
def test_a_run_resized_2_1_2_on_the_real_shards_reads_every_row_once(pack_stream):
    chunks, rows_in = pack_stream
    global_rows, consumed, done = 60, Counter(), 0
    saved = None
    for world, steps in [(2, 11), (1, 7), (2, 10), (1, 3)]:
        saved = attempt(chunks, saved, world, steps, global_rows, 10, consumed)
        done += steps
        check_accounting(consumed, saved, rows_in, done * global_rows)
    assert len({i for i, _ in consumed}) > 5  # crossed into the second epoch of the 5 row groups


def test_rows_handed_out_are_the_rows_of_their_item_and_row():
    """The (item, row) record is honest: it names the packed row the batch holds (on the real chunk path)."""
    plan = [("s", 0), ("s", 1)]
    table = {0: np.arange(40, dtype=np.int32).reshape(10, 4), 1: 100 + np.arange(24, dtype=np.int32).reshape(6, 4)}

    def chunks(start: DataPosition, world: int) -> Iterator[dl.RowChunk]:
        for item, skip in start.stream(world):
            rows = table[item % len(plan)][skip:]
            yield rows, np.full(len(rows), item), np.arange(skip, skip + len(rows))

    # W=2 -> 1: frontier 4; leftovers rank 0's item 0 from row 7, item 2 (rank 0's stride had not reached
    # it), rank 1's item 3 from row 2; then the tail 4, 5, ...
    start = resume_positions([DataPosition(0, 7).pinned(2), DataPosition(3, 2).pinned(2)], 1)[0]
    assert start == DataPosition(0, 7, ((2, 0), (3, 2)), 4, 1)
    batcher, handed = dl.RowBatcher(chunks(start, 1), 4, start), []
    for _ in range(5):
        x, y = next(batcher)
        items, rows = batcher.last_rows
        expect = np.stack([table[i % 2][r] for i, r in zip(items, rows, strict=True)])
        assert np.array_equal(np.concatenate([x.numpy(), y.numpy()[:, -1:]], 1), expect)
        handed += zip(items.tolist(), rows.tolist(), strict=True)
    expect_handed = [(0, 7), (0, 8), (0, 9)] + [(2, r) for r in range(10)] + [(3, r) for r in range(2, 6)]
    assert handed == expect_handed + [(4, 0), (4, 1), (4, 2)]
    assert batcher.position == DataPosition(4, 3, (), 5, 1)


def fake_chunks(rows_in: Callable[[int], int]) -> Chunks:
    """Rows that are their own (item, row): a position-only model of the packer."""

    def chunks(start: DataPosition, world: int) -> Iterator[dl.RowChunk]:
        for item, skip in start.stream(world):
            n = max(0, rows_in(item) - skip)
            rows = np.stack([np.full(n, item), np.arange(skip, skip + n)], 1)
            yield rows, rows[:, 0], rows[:, 1]

    return chunks


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=3, max_size=12),
       plan=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 6)), min_size=1, max_size=7))
def test_any_sequence_of_world_sizes_reads_every_row_once(sizes, plan):
    def rows_in(item: int) -> int:  # items of 1..9 rows, and empty ones (never a whole rank's class)
        return 0 if item % 7 == 3 else sizes[item % len(sizes)]

    chunks, consumed, done, saved = fake_chunks(rows_in), Counter(), 0, None
    for world, steps in plan:
        saved = attempt(chunks, saved, world, steps, 12, 1, consumed)
        done += steps
        check_accounting(consumed, saved, rows_in, done * 12)


def test_a_fixed_world_size_reads_the_old_stride_order_and_rows(tmp_path):
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(["ab", "cde", "fghij"], size=int(rng.integers(1, 30)))) for _ in range(60)]
    paths = write_shards(docs[:48], docs[48:], tmp_path, docs_per_shard=24, docs_per_rowgroup=8)
    plan, tok = dl.plan_row_groups([str(p) for p in paths[:-1]]), ByteTokenizer()
    for world in (1, 2, 3):
        batchers = [dl.RowBatcher(dl.local_row_chunks(plan, tok, 17, p, world), 3, p) for p in start_positions(world)]
        got = [[next(b) for _ in range(5)] for b in batchers]
        resumed = resume_positions(checkpoint([b.position for b in batchers]), world)  # same size: as saved
        for r, p in enumerate(resumed):
            again = dl.RowBatcher(dl.local_row_chunks(plan, tok, 17, p, world), 3, p)
            got[r] += [next(again) for _ in range(9)]
            rows = np.concatenate([np.concatenate([x.numpy(), y.numpy()[:, -1:]], 1) for x, y in got[r]])
            old = np.concatenate([dl.tokenize_and_pack(tok, dl.read_texts(*dl.item_source(plan, r + k * world)), 17)
                                  for k in range(10)])  # the rule before positions.py: r, r + W, r + 2W, ...
            assert np.array_equal(rows, old[: len(rows)])


def test_positions_resume_the_old_way_at_the_same_size_and_exactly_at_another():
    saved = [DataPosition(6, 3), DataPosition(4, 0), DataPosition(11, 1)]  # legacy {item, row}, 3 ranks
    assert resume_positions(saved, 3) == [DataPosition(i, r, (), i + 3, 3) for i, r in ((6, 3), (4, 0), (11, 1))]
    # tails 9, 7, 14: frontier 12; rank 0's class had not reached 9, rank 1's 7 and 10
    left = [(4, 0), (6, 3), (7, 0), (9, 0), (10, 0), (11, 1)]
    assert leftovers(saved) == (left, 12)
    assert resume_positions(saved, 2) == [DataPosition(4, 0, ((7, 0), (10, 0)), 12, 2),
                                          DataPosition(6, 3, ((9, 0), (11, 1)), 13, 2)]
    grown = resume_positions(saved, 8)
    assert grown[:6] == [DataPosition(i, r, (), 12 + k, 8) for k, (i, r) in enumerate(left)]
    assert grown[6:] == [DataPosition(18, 0, (), 26, 8), DataPosition(19, 0, (), 27, 8)]
    assert [DataPosition.from_dict(p.as_dict()) for p in grown] == grown
    assert DataPosition.from_dict({"rank": 0, "world_size": 3, "item": 6, "row": 3}) == saved[0]  # old checkpoints


def test_inconsistent_positions_are_refused():
    with pytest.raises(ValueError, match="overlap"):  # items 6 and 3 are both in class 0 of 3 ranks
        resume_positions([DataPosition(6, 3), DataPosition(3, 0), DataPosition(10, 1)], 2)
    with pytest.raises(ValueError, match="dealt to 2 ranks, not 3"):
        next(DataPosition(0, 0, (), 2, 2).stream(3))
    with pytest.raises(ValueError, match="tail and stride"):
        DataPosition(0, 0, ((1, 0),))
    with pytest.raises(ValueError, match="not in this rank's stream"):
        DataPosition(0, 0, (), 2, 2).at(3, 0)


@pytest.mark.cluster  # the session's Ray cluster: the one test of this file that needs Ray
def test_ray_data_reads_a_resized_position_exactly_as_the_local_path(ray_cluster, embedded_pack, pack_tokenizer_dir):
    from cluster.artifacts import load_tokenizer
    from cluster.pretrain_data import ray_row_chunks

    plan, row_len = dl.plan_row_groups(list_shards(str(embedded_pack))[:-1]), 1025
    # 2 -> 1: items 0 from row 5, 2 (unreached), 3 from row 7, then 4, 5, ...: two Datasets of 5 items each
    start = resume_positions([DataPosition(0, 5).pinned(2), DataPosition(3, 7).pinned(2)], 1)[0]
    assert start == DataPosition(0, 5, ((2, 0), (3, 7)), 4, 1)
    local = dl.local_row_chunks(plan, load_tokenizer(pack_tokenizer_dir), row_len, start, 1)
    want = [np.concatenate(part) for part in zip(*(next(local) for _ in range(7)), strict=True)]
    remote = ray_row_chunks(plan, pack_tokenizer_dir, row_len, start, 1, batch_size=64)
    got, n = [], 0
    while n < len(want[0]):
        chunk = next(remote)
        got.append(chunk)
        n += len(chunk[0])
    remote.close()
    got = [np.concatenate(part)[: len(want[0])] for part in zip(*got, strict=True)]
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert want[1][0] == 0 and want[2][0] == 5 and sorted(set(want[1].tolist())) == [0, 2, 3, 4, 5, 6, 7]
