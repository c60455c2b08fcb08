"""Key/value cache for incremental decoding with rows at different positions.

The contract the engine builds on (decided here, tested in tests/test_gpt.py):
- One cache holds `batch_size` rows ("slots"). Each row b has its own length `pos[b]`: the number
  of tokens already cached for it. Rows are independent sequences, so a batch may be ragged
  (continuous batching, RL rollouts that finish at different times).
- Active rows: `set_active(rows)` picks which rows the NEXT forward passes feed, and stays in force
  until changed; `set_active(None)` means all rows. The model is then called with `idx` of shape
  (len(rows), T_new): row i of `idx` continues cache row `rows[i]`. Rows that are not active are
  neither read nor written and their `pos` does not move. Every fed row gets the same number of
  new tokens T_new in one call (prefill prompts of different lengths in separate calls, or one
  row at a time; decode steps feed T_new = 1 to every active row).
- `insert_kv` is called by each attention layer in order 0..num_layers-1. It writes the new keys
  and values at positions pos[b] .. pos[b]+T_new-1 of each fed row and returns the keys/values of
  those rows up to the longest fed row, with a boolean mask (True = may attend) that hides both
  the future and the unused tail of shorter rows. After the last layer, pos of the fed rows
  advances by T_new. A cache may return mask None when every returned key may be attended
  (the engine's SlotCache does for a decode step of rows at the same position); `dense_mask`
  gives the explicit form.
- The model asks the cache for two things beyond insert_kv: `token_positions(T_new)`, the
  position of every fed token (rotary), and `attend(layer_idx, q, k, v)`, which inserts k, v and
  returns the attention output; the defaults here are insert_kv plus one masked SDPA. A cache
  may feed rows another way (the engine's SlotCache packs rows of different lengths into one
  sequence for a mixed decode+prefill step) by overriding both.
- Slot reuse: `reset_rows(rows)` sets their length to 0 (old contents are simply overwritten).
  `copy_row(src, dst_rows)` duplicates one row's cache (n samples from one prefill);
  `prefill_from(other, src_row, dst_rows)` copies a row of another (e.g. batch-1) cache.

Storage is preallocated: k and v are (num_layers, batch_size, num_heads, seq_len, head_dim).
With all rows active the returned keys are views (no copy); with a subset they are gathered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RowsLike = Sequence[int] | torch.Tensor


def dense_mask(mask: torch.Tensor | None, keys: torch.Tensor, t_new: int) -> torch.Tensor:
    """insert_kv's mask as a bool tensor (R, 1, T_new, T_keys), None meaning all True."""
    if mask is not None:
        return mask
    return torch.ones(keys.size(0), 1, t_new, keys.size(2), dtype=torch.bool, device=keys.device)


class KVCache:
    """Preallocated per-layer keys/values for `batch_size` independent rows (see module doc)."""

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        seq_len: int,
        head_dim: int,
        num_layers: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.batch_size = batch_size
        self.num_heads = num_heads  # key/value heads (n_kv_head), not query heads
        self.seq_len = seq_len  # capacity in tokens per row
        self.head_dim = head_dim
        self.num_layers = num_layers
        shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) tokens cached
        self._all_rows = torch.arange(batch_size, device=device)
        self._rows: torch.Tensor | None = None  # (R,) active rows, None = all
        self._keys_len = 0  # key length returned during the current forward (set at layer 0)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def _as_rows(self, rows: RowsLike) -> torch.Tensor:
        return torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)

    def set_active(self, rows: RowsLike | None) -> None:
        """Feed only `rows` (distinct row indices) in the following forward passes; None = all."""
        self._rows = None if rows is None else self._as_rows(rows)

    def active_rows(self) -> torch.Tensor:
        """(R,) indices of the rows that the next forward feeds."""
        return self._all_rows if self._rows is None else self._rows

    def get_pos(self) -> torch.Tensor:
        """(R,) position of the first token being fed now, for each active row."""
        return self.pos if self._rows is None else self.pos[self._rows]

    def token_positions(self, t_new: int) -> torch.Tensor:
        """(R, T_new) position of every token fed now (row i of idx continues active row i)."""
        return self.get_pos()[:, None] + torch.arange(t_new, device=self.device)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               enable_gqa: bool = False) -> torch.Tensor:
        """Insert k, v (R, H_kv, T_new, D) and attend q (R, H, T_new, D) to the row's keys up to
        each query: (R, H, T_new, D)."""
        k_all, v_all, mask = self.insert_kv(layer_idx, k, v)  # (R, H_kv, T_keys, D)
        return F.scaled_dot_product_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), attn_mask=mask,
                                              enable_gqa=enable_gqa)

    def insert_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v (R, H_kv, T_new, D) for the active rows; return (k_all, v_all, mask).

        k_all, v_all: (R, H_kv, T_keys, D) with T_keys = max over fed rows of pos + T_new;
        mask: bool (R, 1, T_new, T_keys), True where key j <= pos[b] + i (query i may attend)."""
        rows = self.active_rows()
        n_rows, n_heads, t_new, head_dim = k.shape
        if n_rows != rows.numel() or n_heads != self.num_heads or head_dim != self.head_dim:
            raise ValueError(
                f"insert_kv got k of shape {tuple(k.shape)} but the cache expects "
                f"({rows.numel()} active rows, {self.num_heads} kv heads, T_new, {self.head_dim}); "
                "call set_active(rows) so the number of active rows matches idx.size(0)"
            )
        pos = self.pos[rows]  # (R,)
        if layer_idx == 0:
            self._keys_len = int((pos + t_new).max())  # one host sync per forward
            if self._keys_len > self.seq_len:
                raise ValueError(
                    f"KV cache full: a row would reach {self._keys_len} tokens but seq_len is "
                    f"{self.seq_len}; make the cache longer or reset/stop that row"
                )
        positions = pos[:, None] + torch.arange(t_new, device=self.device)  # (R, T_new)
        heads = torch.arange(n_heads, device=self.device)
        index = (rows[:, None, None], heads[None, :, None], positions[:, None, :])  # -> (R, H, T_new)
        self.k[layer_idx].index_put_(index, k.to(self.k.dtype))
        self.v[layer_idx].index_put_(index, v.to(self.v.dtype))

        t_keys = self._keys_len
        if self._rows is None:
            k_all, v_all = self.k[layer_idx, :, :, :t_keys], self.v[layer_idx, :, :, :t_keys]
        else:
            k_all = self.k[layer_idx, :, :, :t_keys].index_select(0, rows)
            v_all = self.v[layer_idx, :, :, :t_keys].index_select(0, rows)
        key_idx = torch.arange(t_keys, device=self.device)
        mask = key_idx[None, None, :] <= positions[:, :, None]  # (R, T_new, T_keys)

        if layer_idx == self.num_layers - 1:
            self.pos[rows] = pos + t_new
        return k_all, v_all, mask[:, None]

    def reset_rows(self, rows: RowsLike) -> None:
        """Empty `rows` for reuse (their old contents are overwritten by later inserts)."""
        self.pos[self._as_rows(rows)] = 0

    def copy_row(self, src: int, dst_rows: RowsLike) -> None:
        """Make every row in `dst_rows` a copy of row `src` (keys, values and length)."""
        dst = self._as_rows(dst_rows)
        self.k[:, dst] = self.k[:, src : src + 1].clone()  # clone: source and target share storage
        self.v[:, dst] = self.v[:, src : src + 1].clone()
        self.pos[dst] = self.pos[src].clone()

    def prefill_from(self, other: KVCache, src_row: int = 0, dst_rows: RowsLike | None = None) -> None:
        """Copy row `src_row` of another cache (same layers/heads/head_dim, seq_len <= ours) into
        `dst_rows` of this one (all rows when None): prefill once at batch 1, decode n samples."""
        if (other.num_layers, other.num_heads, other.head_dim) != (
            self.num_layers,
            self.num_heads,
            self.head_dim,
        ) or other.seq_len > self.seq_len:
            raise ValueError(
                "prefill_from needs a cache with the same layers, heads and head_dim and a seq_len "
                f"<= {self.seq_len}; got layers={other.num_layers} heads={other.num_heads} "
                f"head_dim={other.head_dim} seq_len={other.seq_len}"
            )
        dst = self._all_rows if dst_rows is None else self._as_rows(dst_rows)
        n = other.seq_len
        self.k[:, dst, :, :n] = other.k[:, src_row : src_row + 1].to(self.k.dtype)
        self.v[:, dst, :, :n] = other.v[:, src_row : src_row + 1].to(self.v.dtype)
        self.pos[dst] = other.pos[src_row].to(self.device)
