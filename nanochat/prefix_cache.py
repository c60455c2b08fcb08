"""Prefix cache: keys/values of earlier sequences, kept in blocks and reused by prompts that start alike.

A chat client re-sends the whole conversation every turn, and many requests share a system
prompt; their first tokens were already computed. This store keeps those keys/values between
requests so the engine prefills only what is new.

Notable:
- blocks of `block_size` tokens, chained: a block is found by (its parent block, its token ids),
  and the first block's parent is the root of a weights version. A block therefore matches only
  when every token before it matches too (vLLM chains hashes of blocks the same way; here the key
  is the exact tokens, so there are no collisions to guard against).
- one store for every slot: a system prompt shared by 32 conversations is kept once.
- keyed by the weights version: a lookup under another version finds nothing, and the engine
  clears the store when the version changes (a reload, an RL weight sync), so nothing computed
  with other weights is ever reused.
- copies, not references: a match is copied into the slot's own KV row (one copy per layer and
  tensor) and new blocks are copied out of it; eviction never touches a running sequence, and
  the engine's contiguous slot rows stay as they are.
- LRU eviction under a byte budget, leaves only: every touch moves a chain to the recent end
  leaf first and root last, so a parent is always more recent than its children and the least
  recently used block is a leaf; a block with children is never evicted (no unreachable blocks).
- knows token ids and tensors only (no tokenizer): how text maps to ids is the caller's business.

Tests: `python -m pytest tests/test_prefix_cache.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from nanochat.kv_cache import KVCache


@dataclass(eq=False)
class _Block:
    key: tuple  # (parent id or root, token ids)
    id: int
    k: torch.Tensor  # (num_layers, num_heads, block_size, head_dim)
    v: torch.Tensor
    children: int = 0


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hit_tokens: int = 0  # tokens restored into slots
    stored_blocks: int = 0  # blocks created
    evicted_blocks: int = 0
    blocks: int = 0  # blocks held now
    bytes: int = 0  # bytes held now


class PrefixCache:
    """Blocks of cached keys/values for one KVCache's layout; see the module docstring."""

    def __init__(self, cache: KVCache, capacity_bytes: int, block_size: int = 16) -> None:
        """cache: the engine's KV cache (its layers, heads, head_dim, dtype and device are the
        blocks'); capacity_bytes: the most the stored blocks may take; block_size: tokens per block."""
        if block_size < 1:
            raise ValueError(f"prefix cache block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        elem = torch.empty((), dtype=cache.k.dtype).element_size()
        self.block_bytes = 2 * cache.num_layers * cache.num_heads * block_size * cache.head_dim * elem
        if capacity_bytes < self.block_bytes:
            raise ValueError(
                f"prefix cache budget {capacity_bytes} bytes holds no block of {self.block_bytes} bytes "
                f"({block_size} tokens); give at least that, or 0 to turn the prefix cache off")
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # least recently used first
        self._by_id: dict[int, _Block] = {}
        self._next_id = 0
        self.stats = PrefixCacheStats()

    @property
    def max_blocks(self) -> int:
        return self.capacity_bytes // self.block_bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Drop every block (a new weights version)."""
        self._blocks.clear()
        self._by_id.clear()
        self._sync_stats()

    def _chain(self, version: Hashable, tokens: Sequence[int]) -> list[_Block]:
        """The stored blocks that match tokens' full blocks from the start (root to leaf)."""
        chain: list[_Block] = []
        parent: Hashable = ("root", version)
        bs = self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            block = self._blocks.get((parent, tuple(tokens[start: start + bs])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        for block in reversed(chain):  # leaf first, root last: parents stay more recent than children
            self._blocks.move_to_end(block.key)

    def restore(self, version: Hashable, tokens: Sequence[int], cache: KVCache, row: int,
                max_tokens: int) -> int:
        """Copy the longest stored prefix of `tokens` (at most max_tokens, whole blocks) into cache
        row `row` at positions 0..; returns how many tokens it copied (the row's length is the
        caller's to set)."""
        self.stats.lookups += 1
        chain = self._chain(version, tokens[: max(0, max_tokens)])
        if not chain:
            return 0
        self._touch(chain)
        n = len(chain) * self.block_size
        cache.k[:, row, :, :n] = torch.cat([b.k for b in chain], dim=2)  # (L, H, n, D)
        cache.v[:, row, :, :n] = torch.cat([b.v for b in chain], dim=2)
        self.stats.hit_tokens += n
        return n

    def insert(self, version: Hashable, tokens: Sequence[int], cache: KVCache, row: int) -> int:
        """Store the full blocks of `tokens`, whose keys/values are cache row `row` at positions
        0..len(tokens)-1; blocks already stored are only touched. Returns the blocks added (fewer
        when the budget cannot hold the whole chain)."""
        bs = self.block_size
        chain = self._chain(version, tokens)
        self._touch(chain)
        protected = {b.id for b in chain}
        parent: Hashable = chain[-1].id if chain else ("root", version)
        added = 0
        for start in range(len(chain) * bs, len(tokens) - bs + 1, bs):
            while len(self._blocks) >= self.max_blocks:
                if not self._evict_one(protected):
                    self._touch(chain)
                    self._sync_stats()
                    return added
            key = (parent, tuple(tokens[start: start + bs]))
            block = _Block(key, self._next_id, cache.k[:, row, :, start: start + bs].clone(),
                           cache.v[:, row, :, start: start + bs].clone())
            self._next_id += 1
            if isinstance(parent, int):
                self._by_id[parent].children += 1
            self._blocks[key] = block
            self._by_id[block.id] = block
            chain.append(block)
            protected.add(block.id)
            parent = block.id
            added += 1
        self._touch(chain)
        self.stats.stored_blocks += added
        self._sync_stats()
        return added

    def _evict_one(self, protected: set[int]) -> bool:
        """Drop the least recently used leaf outside `protected`; False when there is none."""
        for key, block in self._blocks.items():
            if block.children == 0 and block.id not in protected:
                del self._blocks[key]
                del self._by_id[block.id]
                parent = key[0]
                if isinstance(parent, int):
                    self._by_id[parent].children -= 1
                self.stats.evicted_blocks += 1
                return True
        return False

    def _sync_stats(self) -> None:
        self.stats.blocks = len(self._blocks)
        self.stats.bytes = len(self._blocks) * self.block_bytes
