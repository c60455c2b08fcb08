"""What the engine samples with, and how its tokens become text (nanochat/engine.py uses all of it).

- `SamplingParams`: one request's sampling (temperature, top-k, top-p, seed, stop tokens, log-probs).
- `sample_tokens`: one token per row by inverse-CDF sampling over the row's own uniform draw, so a
  seed gives the same tokens on any device and in any batch.
- `TokenConstraint` and `apply_bitmask`: constrained rows (a grammar, say) fill a packed bitmask and
  their logits are masked in one op; the engine knows no grammar library (serve_app/grammar.py).
- `IncrementalDecoder`: token ids to streamed text without splitting a UTF-8 character.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


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


class TokenConstraint(Protocol):
    """Per-row hook of the sampler: which tokens may come next, and what was chosen."""

    def fill_bitmask(self, words: torch.Tensor) -> None:
        """Write the allowed next tokens into `words`, a contiguous CPU int32 tensor of
        ceil(vocab_size / 32) words: bit j of word i set = token 32 * i + j allowed. At least one
        token must stay allowed (a finished grammar allows its end-of-sequence tokens)."""

    def accept(self, token: int) -> None:
        """The token chosen for this row (always one the last bitmask allowed)."""


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
