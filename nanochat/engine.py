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
- the cache is nanochat/kv_cache.py's `SlotCache`: the KVCache contract, read as views and written by
  slices (on CPU the generic gather/index_put cost more than the attention of a decode step).
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

Sampling (`SamplingParams`, `sample_tokens`, constraints' bitmask, `IncrementalDecoder`) is
nanochat/sampling.py. This file is over 500 lines: `Engine` is one state machine over one slot
table (admission, prefix reuse, chunked and packed prefill, decode, constraints, tool use), and each
part reads and moves the same slots' state within one step; split, a step would span several files.

One driver thread per Engine (the serving loop or a rollout worker); tool calls run in its pool.
Tests: `python -m pytest tests/test_engine.py` (mock model + byte tokenizer, and a tiny real GPT).
"""

from __future__ import annotations

import inspect
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from nanochat.kv_cache import SlotCache
from nanochat.prefix_cache import PrefixCache
from nanochat.sampling import SamplingParams, TokenConstraint, apply_bitmask, sample_tokens

FinishReason = Literal["stop", "length"]


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


def takes_logits_at(model: Any) -> bool:
    """Whether `model`'s forward takes `logits_at` (nanochat's GPT does; the tests' mocks do not)."""
    return "logits_at" in inspect.signature(getattr(model, "forward", model)).parameters


def _seeded_per_prompt(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: a seeded `params` gives prompt i the seed params.seed + i."""
    return [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(n)]


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
        self.prefix_cache = (PrefixCache(self.cache, prefix_cache_bytes, prefix_block_size)
                             if prefix_cache_bytes else None)
        self._params = list(model.parameters()) if hasattr(model, "parameters") else []
        # a model whose forward takes logits_at (nanochat's GPT) also goes through KVCache.attend and
        # token_positions, so it can be fed packed rows; others (test mocks) get padded forwards
        self._model_packs = takes_logits_at(model)
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
            raise ValueError(f"{len(constraints)} constraints for n = {params.n} samples; "
                             "give one per sample")
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
        # by slot: contiguous rows are views
        running = sorted(s for s, e in self._slots.items() if e.state == "running")
        if not waiting and not running and any(e.state == "tool" for e in self._slots.values()):
            self._collect_tool_results(block=True)
            # by slot: contiguous rows are views
            running = sorted(s for s, e in self._slots.items() if e.state == "running")
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
            elif chosen and (new_longest * (len(chosen) + 1) > budget
                             or new_furthest + new_longest > self.max_seq_len):
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
            # drop the pads' keys
            self.cache.pos[torch.tensor(feed.slots, device=self.device)] = ends.to(self.device)
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
            return (logits if last is None
                    else logits.gather(1, last[:, :, None].expand(-1, -1, logits.size(-1))))
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
        # the last token is never fed
        seq = s.prompt[: s.fed] if s.state == "prefill" else s.prompt + s.tokens[:-1]
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
        (row, output) for every token, row = prompt_index * n + sample_index. A seeded `params`
        gives prompt i the seed params.seed + i."""
        each = _seeded_per_prompt(params, len(prompts))
        for i, j, out in self.stream_each(prompts, each):
            yield i * params.n + j, out

    def stream_each(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> Iterator[tuple[int, int, StepOutput]]:
        """Like `stream`, with one SamplingParams per prompt (its own seed, n, limits); yields
        (prompt index, sample index, output). Prompts are admitted in order while slots are free,
        so a batch of requests shares decode steps; each row samples from its own seeded draws."""
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts; give one per prompt")
        for p, sp in zip(prompts, params, strict=True):
            if sp.n > self.cache.batch_size:
                raise ValueError(f"n = {sp.n} exceeds max_batch_size = {self.cache.batch_size}")
            self._check_prompt(p)  # fail before any work
        queue = deque(enumerate(zip(prompts, params, strict=True)))
        row_of: dict[int, tuple[int, int]] = {}
        try:
            while queue or row_of:
                while queue and len(self.free_slots()) >= queue[0][1][1].n:
                    i, (prompt, sp) = queue.popleft()
                    for j, slot in enumerate(self.add_group(prompt, sp)):
                        row_of[slot] = (i, j)
                outputs = self.step()
                if not outputs and not self.has_unfinished():
                    raise RuntimeError("engine idle with rows outstanding: slots were removed elsewhere")
                for out in outputs:
                    if out.slot in row_of:
                        yield *row_of[out.slot], out
                        if out.finished:
                            row_of.pop(out.slot)
                            self.remove(out.slot)
        finally:
            for slot in row_of:
                self.remove(slot)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """All generations, ordered prompt-major (len(prompts) * params.n of them)."""
        each = _seeded_per_prompt(params, len(prompts))
        return [g for gens in self.generate_each(prompts, each) for g in gens]

    def generate_each(self, prompts: Sequence[Sequence[int]],
                      params: Sequence[SamplingParams]) -> list[list[Generation]]:
        """Every prompt's generations (params[i].n of them), the prompts sharing decode steps."""
        gens = [[Generation([], [], [] if sp.logprobs else None, "length") for _ in range(sp.n)]
                for sp in params]
        for i, j, out in self.stream_each(prompts, params):
            g = gens[i][j]
            g.tokens.append(out.token)
            g.mask.append(0 if out.forced else 1)
            if g.logprobs is not None:
                g.logprobs.append(out.logprob)
            if out.finished:
                g.finish_reason = out.finish_reason
        return gens
