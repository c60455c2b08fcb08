"""Token ids of one choice -> what the client sees: text, tool-call parts, stop strings, log-probs.

Notable:
- parts: tokens between <|python_start|> and <|python_end|> are a "python" part (the tool call
  the model wrote), between <|output_start|> and <|output_end|> a "python_output" part (what the
  sandbox answered); everything else is "text". Other special tokens (<|assistant_end|>, <|bos|>,
  ...) are never shown.
- stop strings apply to the text of one contiguous text run: text that could be the beginning of
  a stop string is held back until the next token decides, so a stop string split over several
  tokens never reaches the client; the text before it does, and the choice is over.
- UTF-8: each part has its own incremental decoder, so a character split over tokens is never
  cut (U+FFFD only for bytes that never complete, at a part's end).
- log-probs (text tokens only) are released together with the text that completes them; tokens
  at or after a matched stop string are dropped.

Pure Python: `python -m pytest tests/test_serve_units.py` exercises it without Ray.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

PartKind = Literal["text", "python", "python_output"]


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token and the model's log-probability of it."""

    token: str  # the token's bytes as UTF-8 (U+FFFD where a character is cut)
    bytes: list[int]
    logprob: float


@dataclass
class Piece:
    """Newly visible output of one choice."""

    kind: PartKind
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class ToolTokens:
    """Ids of the tool-block delimiters (None: the tokenizer has no tool tokens)."""

    python_start: int | None = None
    python_end: int | None = None
    output_start: int | None = None
    output_end: int | None = None


class ChoiceText:
    """Turns the tokens of one choice into Pieces; see the module docstring."""

    def __init__(self, token_bytes: Sequence[bytes], tools: ToolTokens, hidden: frozenset[int],
                 stop: Sequence[str] = (), logprobs: bool = False) -> None:
        """token_bytes[i]: bytes of token i (b"" for special tokens); hidden: special ids never shown;
        stop: non-empty stop strings."""
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._token_bytes = token_bytes
        self._tools = tools
        self._hidden = hidden
        self._stop = tuple(stop)
        self._want_logprobs = logprobs
        self.kind: PartKind = "text"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # text not yet released (could start a stop string)
        self._text_len = 0  # characters of text decoded so far (released + held)
        self._pending_lp: deque[tuple[int, TokenLogprob]] = deque()  # (end offset, logprob) not released
        self.stopped = False  # a stop string matched: the choice is over

    # ---- public ------------------------------------------------------------------------------

    def push(self, token: int, logprob: float | None = None) -> list[Piece]:
        """Pieces that became visible with this token (none after a stop string matched)."""
        if self.stopped:
            return []
        t = self._tools
        if token in (t.python_start, t.output_start):
            pieces = self._close_part()
            self.kind = "python" if token == t.python_start else "python_output"
            return pieces
        if token in (t.python_end, t.output_end):
            return self._close_part() if self.kind != "text" else []
        if token in self._hidden:
            return []
        raw = self._token_bytes[token]
        text = self._decoder.decode(raw)
        if self.kind != "text":
            return [Piece(self.kind, text)] if text else []
        self._held += text
        self._text_len += len(text)
        if self._want_logprobs and logprob is not None:
            entry = TokenLogprob(raw.decode("utf-8", errors="replace"), list(raw), float(logprob))
            self._pending_lp.append((self._text_len, entry))
        return self._release(final=False)

    def finish(self) -> list[Piece]:
        """Everything still held back, at the end of the choice."""
        if self.stopped:
            return []
        return self._close_part()

    # ---- internals ----------------------------------------------------------------------------

    def _close_part(self) -> list[Piece]:
        """End the current part: flush its decoder (and, for text, every held character)."""
        tail = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        kind, self.kind = self.kind, "text"
        if kind != "text":
            return [Piece(kind, tail)] if tail else []
        self._held += tail
        self._text_len += len(tail)
        return self._release(final=True)

    def _release(self, final: bool) -> list[Piece]:
        """Release held text up to a stop string, or up to what could still start one."""
        held, cut = self._held, len(self._held)
        hits = [i for i in (held.find(s) for s in self._stop) if i >= 0]
        if hits:
            cut = min(hits)
            self.stopped = True
        elif not final:
            cut -= self._stop_prefix_len(held)
        out = held[:cut]
        self._held = "" if self.stopped else held[cut:]
        end = self._text_len - len(held) + cut  # absolute offset released up to
        lps = []
        while self._pending_lp and self._pending_lp[0][0] <= end:
            lps.append(self._pending_lp.popleft()[1])
        if self.stopped:
            self._pending_lp.clear()
        return [Piece("text", out, lps)] if out or lps else []

    def _stop_prefix_len(self, held: str) -> int:
        """Length of the longest suffix of `held` that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self._stop), default=1) - 1
        for k in range(min(len(held), longest), 0, -1):
            suffix = held[-k:]
            if any(s.startswith(suffix) for s in self._stop):
                return k
        return 0


def merge_pieces(pieces: Sequence[Piece]) -> list[Piece]:
    """Adjacent pieces of the same kind joined (for a whole, non-streamed message)."""
    merged: list[Piece] = []
    for p in pieces:
        if merged and merged[-1].kind == p.kind:
            merged[-1] = Piece(p.kind, merged[-1].text + p.text, merged[-1].logprobs + p.logprobs)
        else:
            merged.append(Piece(p.kind, p.text, list(p.logprobs)))
    return merged
