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

`SlotCache` (below) is the engine's cache: the same contract, cheaper for how the engine feeds it
(contiguous rows as views, slice writes, packed mixed decode + prefill steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass
class _PackedDecode:
    """The decode rows of a packed forward: count, positions (R_d,), key length, rows, mask."""

    count: int
    pos: torch.Tensor
    keys: int
    span: slice | None
    mask: torch.Tensor | None
    rows: torch.Tensor | None = None
    cover_idx: torch.Tensor | None = None  # with holes: each row's index in the covering span


class SlotCache(KVCache):
    """The engine's KVCache: the same contract (nanochat/kv_cache.py), cheaper for how the engine
    feeds it. On CPU the advanced-index write and the gather of the active rows cost more than
    the attention itself, so: active rows that form a contiguous range (all rows, a prefill
    group, a batch without holes) are read as views; new keys/values are written with one slice
    copy when every fed row is at the same position, else one slice copy per row on CPU (one
    index_put kernel elsewhere, where a copy per row would be a kernel launch per row); positions
    and mask are computed once per forward instead of once per layer. A decode whose rows have
    holes between them (finished slots) attends over the covering range of rows as a view, the
    holes' queries zero and their outputs dropped, when the cover is at most twice the rows: a
    gather of every row's keys costs more than attending over a few extra rows.

    Packed feeding (`set_packed`, for a mixed step): the model gets one sequence (1, N) made of
    one token for each decoding row, then a piece of each prefilling row; `token_positions` and
    `attend` split it again: the decode rows attend as one batch (R_d, H, 1, keys), each piece
    alone (1, H, n, keys). So decodes ride along with a prefill chunk in one forward pass (one
    read of the weights, one step's overhead) and nothing is padded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_active(None)

    def set_packed(self, decode_rows: Sequence[int], piece_rows: Sequence[int],
                   piece_lengths: Sequence[int]) -> None:
        """Feed the next forward as one packed sequence: a token for each of decode_rows, then
        piece_lengths[i] tokens for piece_rows[i]; stays until set_active."""
        self.set_active(list(decode_rows) + list(piece_rows))
        pos = self.pos[self.active_rows()].tolist()  # one host sync per forward
        d = len(decode_rows)
        lengths = [1] * d + list(piece_lengths)
        if max(p + n for p, n in zip(pos, lengths, strict=True)) > self.seq_len:
            raise ValueError(f"KV cache full: a packed row would pass seq_len {self.seq_len}")
        dev = self.device
        dec = _PackedDecode(d, torch.tensor(pos[:d], device=dev), max(pos[:d], default=0) + 1, None, None)
        if d:
            rows_d = list(decode_rows)
            lo, hi = min(rows_d), max(rows_d) + 1
            dec.rows = torch.tensor(rows_d, device=dev)
            key_idx = torch.arange(dec.keys, device=dev)
            if rows_d == list(range(lo, hi)):
                dec.span = slice(lo, hi)
                if min(pos[:d]) != max(pos[:d]):  # ragged: each row sees its own keys only
                    dec.mask = (key_idx[None, :] <= dec.pos[:, None])[:, None, None, :]
            elif hi - lo <= 2 * d:  # holes: attend over the covering rows (see the class docstring)
                dec.span, dec.cover_idx = slice(lo, hi), dec.rows - lo
                cover_pos = torch.zeros(hi - lo, dtype=torch.long, device=dev)
                cover_pos[dec.cover_idx] = dec.pos
                dec.mask = (key_idx[None, :] <= cover_pos[:, None])[:, None, None, :]
            else:
                dec.mask = (key_idx[None, :] <= dec.pos[:, None])[:, None, None, :]
        pieces = []
        for row, start, n in zip(piece_rows, pos[d:], piece_lengths, strict=True):
            mask = None
            if start:  # query i sees keys 0 .. start + i
                mask = (torch.arange(start + n, device=dev)[None, :]
                        <= start + torch.arange(n, device=dev)[:, None])[None, None]  # (1, 1, n, start+n)
            pieces.append((row, start, n, mask))
        self._packed = (dec, pieces)
        self._packed_pos = torch.cat([dec.pos]
                                     + [torch.arange(p, p + n, device=dev) for _, p, n, _ in pieces])
        self._packed_lengths = torch.tensor(lengths, device=dev)

    def token_positions(self, t_new: int) -> torch.Tensor:
        if self._packed is None:
            return super().token_positions(t_new)
        return self._packed_pos[None]  # (1, N)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               enable_gqa: bool = False) -> torch.Tensor:
        if self._packed is None:
            k_all, v_all, mask = self._insert(layer_idx, k, v, cover=True)
            # queries of the holes are zeros, dropped after
            if self._span is None and self._cover is not None:
                q_cover = q.new_zeros((k_all.size(0),) + q.shape[1:])
                q_cover[self._cover_idx] = q
                y = F.scaled_dot_product_attention(q_cover, k_all.to(q.dtype), v_all.to(q.dtype),
                                                   attn_mask=self._cover_mask, enable_gqa=enable_gqa)
                return y[self._cover_idx]
            # rows that all start at 0: SDPA's causal kernel, faster than a mask
            causal = self._from_zero and k.size(2) > 1  # right-padding never precedes a real token
            return F.scaled_dot_product_attention(q, k_all.to(q.dtype), v_all.to(q.dtype),
                                                  attn_mask=None if causal else mask, is_causal=causal,
                                                  enable_gqa=enable_gqa)
        dec, pieces = self._packed  # q (1, H, N, D), k/v (1, H_kv, N, D)
        out = []
        if dec.count:
            d = dec.count
            self.k[layer_idx, dec.rows, :, dec.pos] = k[0, :, :d].transpose(0, 1)  # (R_d, H_kv, D)
            self.v[layer_idx, dec.rows, :, dec.pos] = v[0, :, :d].transpose(0, 1)
            rows = dec.span if dec.span is not None else dec.rows
            k_all = self.k[layer_idx, rows, :, : dec.keys].to(q.dtype)  # (R_d or cover, H_kv, keys, D)
            v_all = self.v[layer_idx, rows, :, : dec.keys].to(q.dtype)
            q_dec = q[0, :, :d].transpose(0, 1)[:, :, None]  # (R_d, H, 1, D)
            if dec.cover_idx is not None:
                q_cover = q_dec.new_zeros((k_all.size(0),) + q_dec.shape[1:])
                q_cover[dec.cover_idx] = q_dec
                q_dec = q_cover
            y = F.scaled_dot_product_attention(q_dec, k_all, v_all, attn_mask=dec.mask, enable_gqa=enable_gqa)
            if dec.cover_idx is not None:
                y = y[dec.cover_idx]  # (R_d, H, 1, D)
            out.append(y[:, :, 0].transpose(0, 1))  # (H, R_d, D)
        offset = dec.count
        for row, start, n, mask in pieces:
            self.k[layer_idx, row, :, start: start + n] = k[0, :, offset: offset + n]
            self.v[layer_idx, row, :, start: start + n] = v[0, :, offset: offset + n]
            k_all = self.k[layer_idx, row: row + 1, :, : start + n].to(q.dtype)
            v_all = self.v[layer_idx, row: row + 1, :, : start + n].to(q.dtype)
            y = F.scaled_dot_product_attention(q[:, :, offset: offset + n], k_all, v_all, attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=enable_gqa)
            out.append(y[0])  # (H, n, D)
            offset += n
        if layer_idx == self.num_layers - 1:
            self.pos[self.active_rows()] += self._packed_lengths
        return torch.cat(out, dim=1)[None]  # (1, H, N, D)

    def set_active(self, rows: RowsLike | None) -> None:
        self._packed = None
        super().set_active(rows)
        if rows is None:
            self._row_list = list(range(self.batch_size))
        else:
            self._row_list = self._rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]
        first = self._row_list[0] if self._row_list else 0
        contiguous = self._row_list == list(range(first, first + len(self._row_list)))
        self._span = slice(first, first + len(self._row_list)) if contiguous else None

    def get_pos(self) -> torch.Tensor:
        return self.pos[self._span] if self._span is not None else super().get_pos()

    def _begin_forward(self, k: torch.Tensor) -> None:
        """At layer 0: check the input, then fix positions, key length, mask and write plan."""
        n_rows, n_heads, t_new, head_dim = k.shape
        if n_rows != len(self._row_list) or n_heads != self.num_heads or head_dim != self.head_dim:
            raise ValueError(
                f"insert_kv got k of shape {tuple(k.shape)} but the cache expects "
                f"({len(self._row_list)} active rows, {self.num_heads} kv heads, T_new, {self.head_dim}); "
                "call set_active(rows) so the number of active rows matches idx.size(0)"
            )
        pos = self.get_pos()  # (R,)
        self._start = pos.tolist()  # one host sync per forward
        self._keys_len = max(self._start) + t_new
        if self._keys_len > self.seq_len:
            raise ValueError(
                f"KV cache full: a row would reach {self._keys_len} tokens but seq_len is "
                f"{self.seq_len}; make the cache longer or reset/stop that row"
            )
        self._t_new = t_new
        self._uniform = self._span is not None and min(self._start) == max(self._start)
        self._from_zero = max(self._start) == 0
        self._cover = None
        if self._span is None and t_new == 1:  # a decode with holes between its rows
            lo, hi = min(self._row_list), max(self._row_list) + 1
            if hi - lo <= 2 * len(self._row_list):  # attending over the holes costs less than a gather
                self._cover = slice(lo, hi)
                self._cover_idx = torch.tensor(self._row_list, device=self.device) - lo  # (R,)
                cover_pos = torch.zeros(hi - lo, dtype=torch.long, device=self.device)  # holes see key 0 only
                cover_pos[self._cover_idx] = pos
                key_idx = torch.arange(self._keys_len, device=self.device)
                # (R_cover, 1, 1, T)
                self._cover_mask = (key_idx[None, :] <= cover_pos[:, None])[:, None, None, :]
        if self._uniform and t_new == 1:  # every row sees all keys up to its new one: no mask
            self._mask = None
            return
        positions = pos[:, None] + torch.arange(t_new, device=self.device)  # (R, T_new)
        key_idx = torch.arange(self._keys_len, device=self.device)
        self._mask = (key_idx[None, None, :] <= positions[:, :, None])[:, None]  # (R, 1, T_new, T_keys)
        heads = torch.arange(self.num_heads, device=self.device)
        # (R, H, T)
        self._index = (self.active_rows()[:, None, None], heads[None, :, None], positions[:, None, :])

    def insert_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As KVCache.insert_kv: write k, v (R, H_kv, T_new, D); return keys/values up to the
        longest fed row (R, H_kv, T_keys, D) and the mask (R, 1, T_new, T_keys), or None when
        every key may be attended (a decode step of rows all at the same position)."""
        return self._insert(layer_idx, k, v, cover=False)

    def _insert(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                cover: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """insert_kv; with `cover`, a decode with holes returns the covering rows' views instead
        of gathering the active ones (the caller attends over the cover, see attend)."""
        if layer_idx == 0:
            self._begin_forward(k)
        t = self._t_new
        if self._uniform:
            p = self._start[0]
            self.k[layer_idx, self._span, :, p : p + t] = k
            self.v[layer_idx, self._span, :, p : p + t] = v
        elif self.device.type == "cpu":
            for i, (row, p) in enumerate(zip(self._row_list, self._start, strict=True)):
                self.k[layer_idx, row, :, p : p + t] = k[i]
                self.v[layer_idx, row, :, p : p + t] = v[i]
        else:
            self.k[layer_idx].index_put_(self._index, k.to(self.k.dtype))
            self.v[layer_idx].index_put_(self._index, v.to(self.v.dtype))
        keys = slice(0, self._keys_len)
        if self._span is not None:
            k_all, v_all = self.k[layer_idx, self._span, :, keys], self.v[layer_idx, self._span, :, keys]
        elif cover and self._cover is not None:
            k_all, v_all = self.k[layer_idx, self._cover, :, keys], self.v[layer_idx, self._cover, :, keys]
        else:
            rows = self.active_rows()
            k_all, v_all = self.k[layer_idx, rows, :, keys], self.v[layer_idx, rows, :, keys]
        if layer_idx == self.num_layers - 1:
            if self._span is not None:
                self.pos[self._span] += t
            else:
                self.pos[self.active_rows()] += t
        return k_all, v_all, self._mask
