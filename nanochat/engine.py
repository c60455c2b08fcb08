"""Inference engine: batched prefill and decode over a ragged KV cache, sampling, tool use, streaming.

Boundary: the engine knows token ids only. Text enters through callables the caller passes
(`ToolUse.encode/decode` for the Python tool, a `token_bytes` function for IncrementalDecoder);
it never imports a tokenizer, Ray or a web framework.

Notable:
- slots: the KV cache has `max_batch_size` rows, one sequence each, each at its own position, so
  one batch mixes sequences of different lengths (continuous batching, ragged RL rollouts).
- scheduler contract (as vLLM v1): `schedule()` picks the rows of the next step, `execute(plan)`
  runs its forward passes, `update_from_output(plan, logits)` samples and advances state; `step()`
  does all three. A step is a prefill (prompts, right-padded into one batch, then each row's
  length is rolled back to its prompt so pads are never attended), a decode (one token for every
  running row), or with chunked prefill (`prefill_chunk_tokens`) a mixed step: every running row
  decodes one token and waiting prompts advance by a piece of at most that many tokens, so a long
  prompt neither stalls the running streams for its whole prefill nor waits for them to finish.
  For nanochat's GPT a mixed step is one forward pass: SlotCache packs the decode tokens and the
  pieces into one sequence (1, N) and splits attention per row (`SlotCache.set_packed`); a model
  without `logits_at` in its forward (the tests' mocks) gets two passes, decode rows then pieces
  (padding decode rows to a piece's length would multiply their cost). Prefills ask the model for
  the logits of each row's last token only. Without chunking, prefill comes first.
- prefix reuse (`prefix_cache_bytes`, nanochat/prefix_cache.py): a new prompt's longest stored
  prefix (whole blocks, never its last token) is copied into its slot and only the rest is
  prefilled; a prompt is stored when its prefill ends, a whole sequence (prompt and output but
  its last token) when its slot is removed. Matching is on token ids only: a chat client sends
  an assistant reply back as text, and its re-tokenised ids match the sampled ones as far as
  they agree, then reuse stops (the ids a prompt is made of never depend on what the server
  has seen). Blocks are keyed by the weights version: `set_weights_version` and any in-place
  change of a parameter (its version counter) empty the store, and a sequence begun under
  other weights is never stored. `cached_tokens(slot)`: prompt tokens restored, not prefilled.
- `SlotCache` keeps the KVCache contract but reads contiguous active rows as views and writes by
  slices: on CPU the generic gather/index_put cost more than the attention of a decode step.
- `add_group` prefills a prompt once and copies its cache row to n slots (n samples).
- on CPU the engine turns on the model's prepacked-weight path (GPT.set_cpu_prepack: oneDNN
  packed linears, one fused q/k/v matmul): matmuls ~1.7x faster at batch 1 and ~2.2x at 16, for
  one extra copy of the weights; a decode step of rows all at one position passes no mask.
- sampling per row: temperature (0 = greedy), top-k, top-p and a per-request seed. Random draws
  come from a CPU `random.Random` per slot, so a seed gives the same tokens on any device and in
  any batch; log-probs are those of the model (log-softmax of raw logits) for each emitted token,
  plus the `top_logprobs` most likely tokens of that raw distribution when asked (before
  temperature, top-k/top-p and any constraint mask, as vLLM reports them by default).
- constrained rows: `add_group(..., constraints=[...])` gives each sample a `TokenConstraint` (a
  grammar, say). Before sampling, every constrained row of the step fills its row of one packed
  (C, ceil(V/32)) int32 bitmask; those rows' logits are masked in one op, so constrained and free
  rows share a decode step and free rows sample exactly as they would alone. The engine knows no
  grammar library: serve_app/grammar.py adapts one. A constrained row never runs the Python tool
  (its output belongs to its constraint).
- tool use: a sampled <|python_start|> ... <|python_end|> block is decoded and run by `ToolUse.run`
  in a thread pool while the row waits (other rows go on); then <|output_start|> result
  <|output_end|> is forced into the sequence one token per step. Forced tokens carry mask 0 so RL
  does not train on them; stop tokens only count when sampled.
- `stream()` yields every token as it is made; `generate()` collects whole generations; the
  IncrementalDecoder turns token bytes into text without ever splitting a UTF-8 character.

One driver thread per Engine (the serving loop or a rollout worker); tool calls run in its pool.
Tests: `python -m pytest tests/test_engine.py` (mock model + byte tokenizer, and a tiny real GPT).
"""

from __future__ import annotations

import codecs
import inspect
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from nanochat.kv_cache import KVCache, RowsLike
from nanochat.prefix_cache import PrefixCache

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled; validated on construction."""

    max_new_tokens: int = 256  # emitted tokens, forced tool output included
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set with this much probability; 1 = off
    seed: int | None = None  # None = fresh entropy
    stop_token_ids: tuple[int, ...] = ()  # a sampled stop token ends the sequence (and is kept)
    n: int = 1  # samples per prompt (generate/add_group), sharing one prefill
    logprobs: bool = False
    top_logprobs: int = 0  # also report this many most likely tokens per step (raw distribution)

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if self.top_logprobs < 0:
            problems.append(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))


@dataclass(frozen=True)
class ToolUse:
    """The Python tool: `run(code) -> output text`, and the token ids that delimit its blocks."""

    run: Callable[[str], str]
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    python_start: int
    python_end: int
    output_start: int
    output_end: int
    max_workers: int = 4  # tool calls in flight at once


class TokenConstraint(Protocol):
    """Per-row hook of the sampler: which tokens may come next, and what was chosen."""

    def fill_bitmask(self, words: torch.Tensor) -> None:
        """Write the allowed next tokens into `words`, a contiguous CPU int32 tensor of
        ceil(vocab_size / 32) words: bit j of word i set = token 32 * i + j allowed. At least one
        token must stay allowed (a finished grammar allows its end-of-sequence tokens)."""

    def accept(self, token: int) -> None:
        """The token chosen for this row (always one the last bitmask allowed)."""


@dataclass(frozen=True)
class StepOutput:
    """One token emitted for one slot in one step."""

    slot: int
    token: int
    forced: bool  # True for tool output forced into the sequence (RL mask 0)
    logprob: float | None  # model log-prob of `token` (when params.logprobs)
    finished: bool
    finish_reason: FinishReason | None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token, log-prob), most likely first


@dataclass
class Generation:
    """A finished sequence: new tokens only (the prompt is not repeated)."""

    tokens: list[int]
    mask: list[int]  # 1 = sampled by the model, 0 = forced tool output
    logprobs: list[float] | None
    finish_reason: FinishReason


@dataclass(frozen=True)
class Feed:
    """One forward pass's rows: cache rows, their tokens (R, T) right-padded, real tokens per row."""

    slots: tuple[int, ...]
    tokens: torch.Tensor  # (R, T) long
    lengths: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    """What one step feeds: a decode (one token for every running row), a prefill (a piece of
    each chosen prompt, `ends[i]`: the piece finishes row i's prompt), or both (a mixed step of
    chunked prefill). `slots`: the rows that emit a token after the step, in logits order."""

    decode: Feed | None = None
    prefill: Feed | None = None
    ends: tuple[bool, ...] = ()

    @property
    def kind(self) -> Literal["prefill", "decode", "mixed", "idle"]:
        if self.decode is not None:
            return "mixed" if self.prefill is not None else "decode"
        return "prefill" if self.prefill is not None else "idle"

    @property
    def slots(self) -> tuple[int, ...]:
        decoded = self.decode.slots if self.decode is not None else ()
        if self.prefill is None:
            return decoded
        return decoded + tuple(s for s, end in zip(self.prefill.slots, self.ends, strict=True) if end)


@dataclass
class _Slot:
    prompt: list[int]
    params: SamplingParams
    rng: random.Random
    state: Literal["prefill", "copy", "running", "tool", "finished"]
    leader: int  # slot whose prefill this one copies (itself for a leader)
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: deque[int] = field(default_factory=deque)
    python: list[int] | None = None  # tokens of an open python block
    tool_future: Future | None = None
    finish_reason: FinishReason | None = None
    constraint: TokenConstraint | None = None
    fed: int = 0  # prompt tokens in the slot's KV row (a prefix restored from the prefix cache counts)
    cached: int = 0  # of those, restored from the prefix cache
    version: Any = None  # weights version at admission (the prefix cache never mixes versions)


class IncrementalDecoder:
    """Token ids -> text for streaming; holds back bytes of an incomplete UTF-8 character."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """Text completed by this token ('' while a character is still incomplete)."""
        return self._utf8.decode(self._token_bytes(token))

    def flush(self) -> str:
        """Whatever is held back, with U+FFFD for bytes that never became a character."""
        return self._utf8.decode(b"", final=True)


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Pick one token per row. logits (R, V) float; temperature (R,) (0 = greedy); top_k (R,) long
    (0 = off); top_p (R,) (1 = off); uniforms (R,) in [0, 1): the row's random draw, used by
    inverse-CDF sampling so the draw, not the device's RNG, decides the token. Returns (R,) long."""
    vocab = logits.size(-1)
    greedy = logits.argmax(-1)
    if not bool((temperature > 0).any()):
        return greedy  # all rows greedy: no softmax over the vocabulary
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(logits.device)
    scaled = logits.float() / safe_t[:, None]  # greedy rows are replaced by argmax at the end
    probs = scaled.softmax(-1)  # (R, V), vocabulary order
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=logits.device)
        keep = rank[None, :] < torch.where(top_k > 0, top_k, vocab)[:, None]  # top-k, sorted space
        kept = sorted_probs * keep
        kept = kept / kept.sum(-1, keepdim=True)  # top-p acts on the renormalised top-k
        keep &= kept.cumsum(-1) - kept < top_p[:, None]  # mass before a token not yet enough
        keep[:, 0] = True
        probs = probs * torch.zeros_like(keep).scatter(-1, order, keep)
    # inverse CDF in vocabulary order for every row, so a row's token never depends on its batch
    cdf = probs.cumsum(-1)  # (R, V)
    draw = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, draw, right=True).clamp_max(vocab - 1)[:, 0]
    return torch.where(temperature.to(logits.device) == 0, greedy, choice)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits (R, V) with -inf where the packed bitmask (R, ceil(V/32)) int32 has a 0 bit."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, : logits.size(-1)]  # (R, V)
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


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

    def set_packed(self, decode_rows: Sequence[int], piece_rows: Sequence[int], piece_lengths: Sequence[int]) -> None:
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
        self._packed_pos = torch.cat([dec.pos] + [torch.arange(p, p + n, device=dev) for _, p, n, _ in pieces])
        self._packed_lengths = torch.tensor(lengths, device=dev)

    def token_positions(self, t_new: int) -> torch.Tensor:
        if self._packed is None:
            return super().token_positions(t_new)
        return self._packed_pos[None]  # (1, N)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               enable_gqa: bool = False) -> torch.Tensor:
        if self._packed is None:
            k_all, v_all, mask = self._insert(layer_idx, k, v, cover=True)
            if self._span is None and self._cover is not None:  # queries of the holes are zeros, dropped after
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
                self._cover_mask = (key_idx[None, :] <= cover_pos[:, None])[:, None, None, :]  # (R_cover, 1, 1, T)
        if self._uniform and t_new == 1:  # every row sees all keys up to its new one: no mask
            self._mask = None
            return
        positions = pos[:, None] + torch.arange(t_new, device=self.device)  # (R, T_new)
        key_idx = torch.arange(self._keys_len, device=self.device)
        self._mask = (key_idx[None, None, :] <= positions[:, :, None])[:, None]  # (R, 1, T_new, T_keys)
        heads = torch.arange(self.num_heads, device=self.device)
        self._index = (self.active_rows()[:, None, None], heads[None, :, None], positions[:, None, :])  # (R, H, T)

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


class Engine:
    """Slots over one KV cache; see the module docstring for the step contract."""

    def __init__(
        self,
        model: Any,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        tool_use: ToolUse | None = None,
        max_prefill_tokens: int = 4096,
        dtype: torch.dtype | None = None,
        cpu_prepack: bool = True,
        prefill_chunk_tokens: int = 0,
        prefix_cache_bytes: int = 0,
        prefix_block_size: int = 16,
    ) -> None:
        """model: forward(idx (B, T) long, kv_cache=KVCache) -> logits (B, T, V), with `config`
        holding n_layer, n_head, n_kv_head, n_embd, sequence_len, vocab_size.
        max_prefill_tokens bounds rows x padded length of one prefill (its logits are (R, T, V)).
        cpu_prepack: on CPU, turn on the model's prepacked-weight linear path (GPT.set_cpu_prepack)
        for this and every other user of the model (it only acts under no-grad).
        prefill_chunk_tokens: while rows are decoding, prefill at most this many (padded) prompt
        tokens per step, in the same step as their decode (0 = off: whole prompts, prefill first).
        prefix_cache_bytes: budget of the prefix cache (nanochat/prefix_cache.py; 0 = off), in
        blocks of prefix_block_size tokens."""
        if prefill_chunk_tokens < 0 or prefix_cache_bytes < 0:
            raise ValueError(f"prefill_chunk_tokens ({prefill_chunk_tokens}) and prefix_cache_bytes "
                             f"({prefix_cache_bytes}) must be >= 0 (0 = off)")
        cfg = model.config
        self.model = model
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = max_seq_len or cfg.sequence_len
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.tool_use = tool_use
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
        if cpu_prepack and device.type == "cpu" and hasattr(model, "set_cpu_prepack"):
            model.set_cpu_prepack(True)
        self.cache = SlotCache(
            max_batch_size, cfg.n_kv_head, self.max_seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer,
            device=device, dtype=dtype or (param.dtype if param is not None else torch.float32),
        )
        self._slots: dict[int, _Slot] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.prefix_cache = PrefixCache(self.cache, prefix_cache_bytes, prefix_block_size) if prefix_cache_bytes else None
        self._params = list(model.parameters()) if hasattr(model, "parameters") else []
        # a model whose forward takes logits_at (nanochat's GPT) also goes through KVCache.attend and
        # token_positions, so it can be fed packed rows; others (test mocks) get padded forwards
        self._model_packs = "logits_at" in inspect.signature(getattr(model, "forward", model)).parameters
        self.weights_version = 0
        self._cached_version: tuple | None = None  # the version the prefix cache's blocks belong to

    # ---- weights version: what the prefix cache is keyed by --------------------------------------

    def set_weights_version(self, version: int) -> None:
        """Declare new weights (a reload, an RL weight sync): nothing computed before is reused.
        In-place changes to the parameters (load_state_dict, copy_, an optimizer step, a broadcast
        that bumps the version counters) are also seen without this call."""
        self.weights_version = version

    def _version(self) -> tuple:
        """(declared version, each parameter's storage and in-place version counter); when it
        differs from the prefix cache's, the cache is emptied."""
        version = (self.weights_version, tuple((p.data_ptr(), p._version) for p in self._params))
        if self.prefix_cache is not None and version != self._cached_version:
            self.prefix_cache.clear()
            self._cached_version = version
        return version

    def cached_tokens(self, slot: int) -> int:
        """Prompt tokens of this slot's sequence restored from the prefix cache (not prefilled)."""
        s = self._slots[slot]
        return self._slots[s.leader].cached if s.leader in self._slots else s.cached

    # ---- slot management -----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def free_slots(self) -> list[int]:
        return [s for s in range(self.cache.batch_size) if s not in self._slots]

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Queue one sequence for prefill; returns its slot (for n > 1 use add_group)."""
        if params.n != 1:
            raise ValueError(f"add_request makes one sequence but params.n = {params.n}; use add_group")
        return self.add_group(prompt_ids, params)[0]

    def add_group(self, prompt_ids: Sequence[int], params: SamplingParams,
                  constraints: Sequence[TokenConstraint] | None = None) -> list[int]:
        """Queue params.n samples of one prompt, prefilled once; returns their slots.
        constraints: one TokenConstraint per sample (fresh objects: each follows its own row)."""
        prompt = self._check_prompt(prompt_ids)
        if constraints is not None and len(constraints) != params.n:
            raise ValueError(f"{len(constraints)} constraints for n = {params.n} samples; give one per sample")
        free = self.free_slots()
        if params.n > len(free):
            raise RuntimeError(
                f"{params.n} slots requested but {len(free)} of {self.cache.batch_size} are free; "
                "remove finished slots first or build the Engine with a larger max_batch_size"
            )
        slots = free[: params.n]
        version = self._version()
        for j, slot in enumerate(slots):
            rng = random.Random(f"{params.seed}/{j}") if params.seed is not None else random.Random()
            state = "prefill" if j == 0 else "copy"
            self._slots[slot] = _Slot(prompt, params, rng, state, leader=slots[0],
                                      constraint=constraints[j] if constraints is not None else None,
                                      version=version)
        self.cache.reset_rows(slots)
        if self.prefix_cache is not None:  # at least the last prompt token is fed: its logits are needed
            leader = self._slots[slots[0]]
            restored = self.prefix_cache.restore(version, prompt, self.cache, slots[0], len(prompt) - 1)
            leader.fed = leader.cached = min(restored, len(prompt) - 1)
            self.cache.pos[slots[0]] = leader.fed
        return slots

    def remove(self, slot: int) -> None:
        """Free a slot (finished or cancelled) for reuse; a running tool call is abandoned."""
        entry = self._slots.pop(slot, None)
        if entry is None:
            raise KeyError(f"slot {slot} is not in use")
        self._store_prefix(slot, entry)
        if entry.tool_future is not None:
            entry.tool_future.cancel()
        followers = [s for s, e in self._slots.items() if e.state == "copy" and e.leader == slot]
        for follower in followers:  # they waited for this leader's prefill: the first one takes over
            self._slots[follower].leader = followers[0]
        if followers:
            self._slots[followers[0]].state = "prefill"

    def is_finished(self, slot: int) -> bool:
        return self._slots[slot].state == "finished"

    def result(self, slot: int) -> Generation:
        """The generation of a finished slot (call before remove)."""
        s = self._slots[slot]
        if s.state != "finished":
            raise RuntimeError(f"slot {slot} is still generating ({s.state})")
        return Generation(list(s.tokens), list(s.mask), list(s.logprobs) if s.params.logprobs else None,
                          s.finish_reason)

    def has_unfinished(self) -> bool:
        return any(s.state != "finished" for s in self._slots.values())

    def close(self) -> None:
        """Stop the tool thread pool (running tool calls finish in the background)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt: pass at least one token id (e.g. the BOS token)")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room in the context of {self.max_seq_len}; "
                "shorten the prompt or build the Engine with a larger max_seq_len"
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return prompt

    # ---- one step: schedule -> execute -> update_from_output -----------------------------------

    def step(self) -> list[StepOutput]:
        """One forward pass (or none when idle): the tokens emitted by it."""
        plan = self.schedule()
        if plan.kind == "idle":
            return []
        return self.update_from_output(plan, self.execute(plan))

    def schedule(self) -> StepPlan:
        """Pick the next step's rows. Unchunked (prefill_chunk_tokens 0): prefill waiting prompts in
        arrival order while rows x padded length fit max_prefill_tokens (at least one), else decode
        every running row. Chunked: decode every running row and, in the same step, prefill pieces
        of waiting prompts of at most prefill_chunk_tokens (rows x padded length); with no row
        decoding, prefill as unchunked. Blocks on tool calls only when every unfinished row is
        waiting for one."""
        self._collect_tool_results(block=False)
        waiting = [s for s, e in self._slots.items() if e.state == "prefill"]
        running = sorted(s for s, e in self._slots.items() if e.state == "running")  # by slot: contiguous rows are views
        if not waiting and not running and any(e.state == "tool" for e in self._slots.values()):
            self._collect_tool_results(block=True)
            running = sorted(s for s, e in self._slots.items() if e.state == "running")  # by slot: contiguous rows are views
        chunked = self.prefill_chunk_tokens > 0 and bool(running)
        prefill, ends = self._prefill_feed(waiting, self.prefill_chunk_tokens if chunked else None,
                                           packed=chunked and self._model_packs)
        decode = None
        if running and (chunked or prefill is None):
            last = torch.tensor([[self._slots[s].tokens[-1]] for s in running], dtype=torch.long)
            decode = Feed(tuple(running), last.to(self.device), (1,) * len(running))
        return StepPlan(decode, prefill, ends)

    def _prefill_feed(self, waiting: list[int], chunk: int | None,
                      packed: bool = False) -> tuple[Feed | None, tuple[bool, ...]]:
        """The next piece of each waiting prompt that fits one batch: whole prompts within
        max_prefill_tokens (chunk None), or pieces of at most `chunk` tokens within `chunk`. Rows
        start where their KV row ends (after a restored prefix or earlier pieces). Padded (rows x
        longest piece counts, and a row joins only if the padded length fits its context) unless
        `packed` (pieces of a packed mixed step: their sum counts)."""
        budget = chunk or self.max_prefill_tokens
        chosen: list[int] = []
        pieces: list[int] = []
        longest = furthest = 0
        for s in waiting:
            e = self._slots[s]
            remaining = len(e.prompt) - e.fed
            piece = remaining if chunk is None else min(remaining, chunk - sum(pieces) if packed else chunk)
            new_longest, new_furthest = max(longest, piece), max(furthest, e.fed)
            if packed:
                if piece < 1:
                    break
            elif chosen and (new_longest * (len(chosen) + 1) > budget or new_furthest + new_longest > self.max_seq_len):
                break
            chosen.append(s)
            pieces.append(piece)
            longest, furthest = new_longest, new_furthest
        if not chosen:
            return None, ()
        tokens = torch.zeros(len(chosen), longest, dtype=torch.long)  # pad id 0: never attended
        ends = []
        for i, s in enumerate(chosen):
            e = self._slots[s]
            tokens[i, : pieces[i]] = torch.tensor(e.prompt[e.fed: e.fed + pieces[i]])
            ends.append(e.fed + pieces[i] == len(e.prompt))
        return Feed(tuple(chosen), tokens.to(self.device), tuple(pieces)), tuple(ends)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan's forward passes (the decode rows, then the prefill pieces); returns the
        logits (R, V) after each emitting row's last real token, in `plan.slots` order. After a
        padded prefill, rolls each row back to its true length."""
        if plan.decode is not None and plan.prefill is not None and self._model_packs:
            return self._forward_packed(plan)
        out = []
        if plan.decode is not None:
            out.append(self._forward(plan.decode)[:, -1])
        if plan.prefill is not None:
            feed = plan.prefill
            last = torch.tensor(feed.lengths, device=self.device)[:, None] - 1  # (R, 1)
            logits = self._forward(feed, last)[:, 0]  # (R, V) after each row's last real token
            starts = [self._slots[s].fed for s in feed.slots]
            for s, n in zip(feed.slots, feed.lengths, strict=True):
                self._slots[s].fed += n
            ends = torch.tensor([start + n for start, n in zip(starts, feed.lengths, strict=True)])
            self.cache.pos[torch.tensor(feed.slots, device=self.device)] = ends.to(self.device)  # drop the pads' keys
            done = [i for i, end in enumerate(plan.ends) if end]
            if done:
                out.append(logits[torch.tensor(done, device=self.device)])
        return torch.cat(out) if len(out) > 1 else out[0] if out else torch.empty(0, self.vocab_size)

    def _forward(self, feed: Feed, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (R, T, V), or (R, 1, V) at `last` (R, 1) when the model can skip the others."""
        self.cache.set_active(feed.slots)
        try:
            if self._model_packs and last is not None:
                return self.model(feed.tokens, kv_cache=self.cache, logits_at=last)
            logits = self.model(feed.tokens, kv_cache=self.cache)  # (R, T, V)
            return logits if last is None else logits.gather(1, last[:, :, None].expand(-1, -1, logits.size(-1)))
        finally:
            self.cache.set_active(None)

    def _forward_packed(self, plan: StepPlan) -> torch.Tensor:
        """A mixed step in one forward: decode tokens then prompt pieces as one sequence (1, N)."""
        decode, feed = plan.decode, plan.prefill
        d = len(decode.slots)
        parts = [decode.tokens[:, 0]] + [feed.tokens[i, :n] for i, n in enumerate(feed.lengths)]
        ends, offset = [], d
        for n, end in zip(feed.lengths, plan.ends, strict=True):
            offset += n
            if end:
                ends.append(offset - 1)
        at = torch.tensor(list(range(d)) + ends, device=self.device)[None]  # (1, K)
        self.cache.set_packed(decode.slots, feed.slots, feed.lengths)
        try:
            logits = self.model(torch.cat(parts)[None], kv_cache=self.cache, logits_at=at)[0]  # (K, V)
        finally:
            self.cache.set_active(None)
        for s, n in zip(feed.slots, feed.lengths, strict=True):
            self._slots[s].fed += n
        return logits

    def update_from_output(self, plan: StepPlan, logits: torch.Tensor) -> list[StepOutput]:
        """Choose each row's next token (forced tool output, else sampled), record it, and
        finish rows on stop tokens, max_new_tokens or a full context. A prompt whose prefill
        ended is stored in the prefix cache and copied to the other samples of its group."""
        rows = list(plan.slots)
        source = list(range(len(rows)))  # logits row of each slot
        n_decode = len(plan.decode.slots) if plan.decode is not None else 0
        for i, leader in enumerate(rows[n_decode:], start=n_decode):
            self._store_prefix(leader, self._slots[leader])
            followers = [s for s, e in self._slots.items() if e.state == "copy" and e.leader == leader]
            if followers:
                self.cache.copy_row(leader, followers)
                rows += followers
                source += [i] * len(followers)
        if len(source) > logits.size(0):
            logits = logits[torch.tensor(source, device=logits.device)]  # (R', V)
        slots = [self._slots[s] for s in rows]
        sampled_idx = [i for i, s in enumerate(slots) if not s.forced]
        chosen = [s.forced[0] if s.forced else -1 for s in slots]
        if sampled_idx:
            sampled = [slots[i] for i in sampled_idx]
            picked = self._sample(self._constrain(logits[sampled_idx], sampled), sampled)
            for i, s, tok in zip(sampled_idx, sampled, picked, strict=True):
                chosen[i] = tok
                if s.constraint is not None:
                    s.constraint.accept(tok)
        logprobs, tops = None, None
        if any(s.params.logprobs for s in slots):  # raw distribution: no temperature, no mask
            logp = F.log_softmax(logits.float(), -1)  # (R', V)
            token_t = torch.tensor(chosen, device=logits.device)
            logprobs = logp.gather(-1, token_t[:, None])[:, 0].tolist()
            k = max(s.params.top_logprobs for s in slots)
            if k > 0:
                values, ids = logp.topk(min(k, logp.size(-1)), dim=-1)  # (R', k), most likely first
                tops = [list(zip(r_ids, r_vals, strict=True)) for r_ids, r_vals in
                        zip(ids.tolist(), values.tolist(), strict=True)]
        return [self._emit(slot, s, tok, logprobs[i] if logprobs else None,
                           tuple(tops[i][: s.params.top_logprobs]) if tops else ())
                for i, (slot, s, tok) in enumerate(zip(rows, slots, chosen, strict=True))]

    # ---- internals -------------------------------------------------------------------------------

    def _store_prefix(self, slot: int, s: _Slot) -> None:
        """Keep the computed part of a slot's sequence in the prefix cache (same weights only)."""
        if self.prefix_cache is None or s.state == "copy" or s.version != self._version():
            return
        seq = s.prompt[: s.fed] if s.state == "prefill" else s.prompt + s.tokens[:-1]  # the last token is never fed
        self.prefix_cache.insert(s.version, seq, self.cache, slot)

    def _constrain(self, logits: torch.Tensor, slots: list[_Slot]) -> torch.Tensor:
        """logits (R, V) with each constrained row's forbidden tokens at -inf (a copy; free rows
        unchanged). One packed bitmask (C, ceil(V/32)) for the C constrained rows, filled row by
        row, applied in one op."""
        constrained = [i for i, s in enumerate(slots) if s.constraint is not None]
        if not constrained:
            return logits
        bitmask = torch.zeros((len(constrained), (logits.size(-1) + 31) // 32), dtype=torch.int32)
        for k, i in enumerate(constrained):
            slots[i].constraint.fill_bitmask(bitmask[k])
        rows = torch.tensor(constrained, device=logits.device)
        out = logits.clone()
        out[rows] = apply_bitmask(logits[rows], bitmask)
        return out

    def _sample(self, logits: torch.Tensor, slots: list[_Slot]) -> list[int]:
        if all(s.params.temperature == 0 for s in slots):  # greedy rows never use their draw
            return logits.argmax(-1).tolist()

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=logits.device)

        temperature = column([s.params.temperature for s in slots], torch.float32)
        top_k = column([s.params.top_k for s in slots], torch.long)
        top_p = column([s.params.top_p for s in slots], torch.float32)
        uniforms = torch.tensor([s.rng.random() for s in slots], dtype=torch.float64)
        return sample_tokens(logits, temperature, top_k, top_p, uniforms).tolist()

    def _emit(self, slot: int, s: _Slot, token: int, logprob: float | None,
              top_logprobs: tuple[tuple[int, float], ...] = ()) -> StepOutput:
        forced = bool(s.forced)
        if forced:
            s.forced.popleft()
        else:
            s.state = "running"
        s.tokens.append(token)
        s.mask.append(0 if forced else 1)
        if logprob is not None:
            s.logprobs.append(logprob)
        if not forced and token in s.params.stop_token_ids:
            s.finish_reason = "stop"
        elif len(s.tokens) >= s.params.max_new_tokens or len(s.prompt) + len(s.tokens) >= self.max_seq_len:
            s.finish_reason = "length"  # the last token never needs a cache position
        elif not forced and self.tool_use is not None and s.constraint is None:
            self._track_tool_block(s, token)
        if s.finish_reason is not None:
            s.state = "finished"
        return StepOutput(slot, token, forced, logprob, s.finish_reason is not None, s.finish_reason,
                          top_logprobs)

    def _track_tool_block(self, s: _Slot, token: int) -> None:
        tool = self.tool_use
        if s.python is None:
            if token == tool.python_start:
                s.python = []
        elif token == tool.python_end:
            code = tool.decode(s.python)
            s.python = None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(tool.max_workers, thread_name_prefix="engine-tool")
            s.tool_future = self._pool.submit(tool.run, code)
            s.state = "tool"
        else:
            s.python.append(token)

    def _collect_tool_results(self, block: bool) -> None:
        """Move rows whose tool call finished back to running, their output queued as forced."""
        pending = {e.tool_future: e for e in self._slots.values() if e.state == "tool"}
        if block and pending:
            wait(pending, return_when=FIRST_COMPLETED)
        tool = self.tool_use
        for future, e in pending.items():
            if not future.done():
                continue
            try:
                text = future.result()
            except Exception as exc:  # noqa: BLE001 - a failing tool becomes text the model reads
                text = f"{type(exc).__name__}: {exc}"
            e.forced.extend([tool.output_start, *tool.encode(text), tool.output_end])
            e.tool_future, e.state = None, "running"

    # ---- drivers for RL, eval and batch use -----------------------------------------------------

    def stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[tuple[int, StepOutput]]:
        """Generate params.n samples per prompt, admitting prompts as slots free up; yields
        (row, output) for every token, row = prompt_index * n + sample_index."""
        if params.n > self.cache.batch_size:
            raise ValueError(f"n = {params.n} exceeds max_batch_size = {self.cache.batch_size}")
        for p in prompts:
            self._check_prompt(p)  # fail before any work
        queue = deque(enumerate(prompts))
        row_of: dict[int, int] = {}
        try:
            while queue or row_of:
                while queue and len(self.free_slots()) >= params.n:
                    i, prompt = queue.popleft()
                    seeded = params if params.seed is None else replace(params, seed=params.seed + i)
                    for j, slot in enumerate(self.add_group(prompt, seeded)):
                        row_of[slot] = i * params.n + j
                outputs = self.step()
                if not outputs and not self.has_unfinished():
                    raise RuntimeError("engine idle with rows outstanding: slots were removed elsewhere")
                for out in outputs:
                    if out.slot in row_of:
                        yield row_of[out.slot], out
                        if out.finished:
                            row_of.pop(out.slot)
                            self.remove(out.slot)
        finally:
            for slot in row_of:
                self.remove(slot)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """All generations, ordered prompt-major (len(prompts) * params.n of them)."""
        gens = [Generation([], [], [] if params.logprobs else None, "length")
                for _ in range(len(prompts) * params.n)]
        for row, out in self.stream(prompts, params):
            g = gens[row]
            g.tokens.append(out.token)
            g.mask.append(0 if out.forced else 1)
            if g.logprobs is not None:
                g.logprobs.append(out.logprob)
            if out.finished:
                g.finish_reason = out.finish_reason
        return gens
