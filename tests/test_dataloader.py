"""Tests of pretraining rows (nanochat/data/dataloader.py): BOS-aligned packing, the per-rank item
order, exact resume from a DataPosition, re-sharding positions, validation rows. No Ray.

Run: PYTHONPATH=. python -m pytest tests/test_dataloader.py -q
"""

from __future__ import annotations

from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.data import dataloader as dl
from nanochat.data.dataset import write_shards
from tests.helpers import ByteTokenizer

BOS = ByteTokenizer.BOS


docs_strategy = st.lists(st.lists(st.integers(0, 40), max_size=30), max_size=25)


def _segments(rows: np.ndarray) -> list[list[int]]:
    """Pieces of rows between BOS tokens (each piece is a slice of one document)."""
    out, cur = [], None
    for row in rows.tolist():
        for t in row:
            if t == BOS:
                if cur:
                    out.append(cur)
                cur = []
            else:
                cur.append(t)
        if cur:
            out.append(cur)
        cur = None
    return out


def _is_slice(piece: list[int], docs: list[list[int]]) -> bool:
    n = len(piece)
    return any(doc[i : i + n] == piece for doc in docs for i in range(len(doc) - n + 1))


@settings(max_examples=200, deadline=None)
@given(docs=docs_strategy, row_len=st.integers(2, 17))
def test_packed_rows_start_with_bos_and_lose_at_most_one_row(docs, row_len):
    rows = dl.pack_rows(docs, row_len, BOS)
    assert rows.shape[1] == row_len and rows.dtype == np.int32
    assert (rows[:, 0] == BOS).all() if len(rows) else True
    placed = Counter(t for t in rows.ravel().tolist() if t != BOS)
    given_tokens = Counter(t for d in docs for t in d)
    assert not placed - given_tokens  # nothing invented, nothing placed twice
    assert sum(given_tokens.values()) - sum(placed.values()) < row_len  # only the last partial row is dropped
    for piece in _segments(rows):  # a run after a BOS is a contiguous slice of one document
        assert _is_slice(piece, docs)
    assert np.array_equal(rows, dl.pack_rows(docs, row_len, BOS))  # deterministic


def test_long_document_fills_whole_rows_in_order():
    doc = list(range(1, 20))
    rows = dl.pack_rows([doc], 5, BOS)  # 4 document tokens behind each BOS
    assert rows[:4].tolist() == [[BOS, 1, 2, 3, 4], [BOS, 5, 6, 7, 8], [BOS, 9, 10, 11, 12], [BOS, 13, 14, 15, 16]]
    assert len(rows) == 4  # the rest (BOS 17 18 19) is under a row: dropped


def test_short_documents_are_packed_best_fit():
    rows = dl.pack_rows([[1], [2, 2], [3, 3, 3]], 6, BOS)  # pieces of 2, 3 and 4 tokens
    assert rows.tolist() == [[BOS, 3, 3, 3, BOS, 1]]  # largest first, then the largest that fits
    with pytest.raises(ValueError, match="row_len"):
        dl.pack_rows([[1]], 1, BOS)


@pytest.fixture
def shards(tmp_path):
    """6 small training row groups (2 shards x 3) of varied documents, and a validation shard."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(60)]
    paths = write_shards(docs[:48], docs[48:], tmp_path / "shards", docs_per_shard=24, docs_per_rowgroup=8)
    return [str(p) for p in paths[:-1]], [str(paths[-1])]


def test_ranks_read_disjoint_items_and_wrap_into_the_next_epoch(shards):
    train, _ = shards
    plan = dl.plan_row_groups(train)
    assert len(plan) == 6 and plan[0] == (train[0], 0) and plan[3] == (train[1], 0)
    tok = ByteTokenizer()
    seen = {r: [int(c[1][0]) for c in islice(dl.local_row_chunks(plan, tok, 33, dl.DataPosition(r), 4), 3)]
            for r in range(4)}
    assert seen == {0: [0, 4, 8], 1: [1, 5, 9], 2: [2, 6, 10], 3: [3, 7, 11]}
    assert dl.item_source(plan, 8) == plan[2]  # item 8 is row group 2 of the second epoch


def test_resume_from_a_position_continues_exactly(shards):
    train, _ = shards
    plan, tok = dl.plan_row_groups(train), ByteTokenizer()
    start = dl.DataPosition(1)
    first = dl.RowBatcher(dl.local_row_chunks(plan, tok, 17, start, 2), 3, start)
    for _ in range(7):  # crosses at least one item boundary (rows per item ~10-20)
        next(first)
    saved = first.position
    expected = [next(first) for _ in range(12)]
    second = dl.RowBatcher(dl.local_row_chunks(plan, tok, 17, saved, 2), 3, saved)
    for (x, y), (ex, ey) in zip((next(second) for _ in range(12)), expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert saved.item in (1, 3, 5) and second.position == first.position


def test_batches_are_shifted_rows():
    rows = np.arange(12, dtype=np.int32).reshape(3, 4)
    chunks = iter([(rows, np.zeros(3, dtype=np.int64), np.arange(3))])
    batcher = dl.RowBatcher(chunks, 2, dl.DataPosition(0))
    x, y = next(batcher)
    assert x.tolist() == [[0, 1, 2], [4, 5, 6]] and y.tolist() == [[1, 2, 3], [5, 6, 7]]
    assert x.dtype == torch.long and batcher.position == dl.DataPosition(0, 2)


def test_resume_positions_at_the_same_world_size_keep_the_stride_rule():
    saved = [dl.DataPosition(9, 3), dl.DataPosition(4, 0), dl.DataPosition(11, 1)]  # 3 ranks
    assert dl.resume_positions(saved, 3) == [p.pinned(3) for p in saved]
    assert list(islice(dl.resume_positions(saved, 3)[1].stream(3), 3)) == [(4, 0), (7, 0), (10, 0)]
    assert dl.start_positions(2) == [dl.DataPosition(0, 0, (), 2, 2), dl.DataPosition(1, 0, (), 3, 2)]
    # another world size: exact, tests/test_data_positions.py


def test_validation_rows_are_shared_out_over_ranks(shards):
    _, val = shards
    rows = dl.validation_rows(val, ByteTokenizer(), 9, 10)
    assert rows.shape == (10, 9) and (rows[:, 0] == BOS).all()
    parts = [dl.rank_batches(rows, 2, r, 3) for r in range(3)]
    got = sorted(tuple(row) for p in parts for x, y in p for row in torch.cat([x, y[:, -1:]], 1).tolist())
    assert got == sorted(tuple(r) for r in rows.tolist())  # every row on exactly one rank
    with pytest.raises(ValueError, match="lower eval_tokens"):
        dl.validation_rows(val, ByteTokenizer(), 9, 10_000)


def test_empty_shard_list_is_refused():
    with pytest.raises(ValueError, match="no training shards"):
        dl.plan_row_groups([])
