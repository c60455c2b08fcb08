"""One HTTP request's generation: submits its prompts to the model's Scheduler and turns the token
events into visible updates per choice (text, tool parts, stop strings, finish reasons, timing).

    gen = Generation(served, request_id, prompts, params, stop=[...], logprobs=False, metrics=m)
    gen.start()                         # may raise Overloaded (-> 429) or SchedulerClosed (-> 503)
    async for updates in gen.updates(): # list[ChoiceUpdate] per engine step (or per batch of steps)
        ...
Leaving `updates()` early (client disconnect, error) cancels every unfinished choice, so the
engine frees their slots before its next step. A stop string matched in the text cancels that
choice at once. Choice indexes are prompt-major: prompt i, sample j -> i * n + j.
With a `grammar` (structured output, tool calls) every choice gets its own matcher, applied by
the engine's sampler; a choice that made function calls and stopped finishes with "tool_calls".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from nanochat.sampling import SamplingParams
from serve_app.grammar import Grammar, GrammarConstraint
from serve_app.metrics import ServeMetrics
from serve_app.models import ServedModel
from serve_app.scheduler import Submission, TokenEvent
from serve_app.textstream import ChoiceText, Piece


class GenerationFailed(RuntimeError):
    """The engine failed or the model was unloaded while this request was running."""


@dataclass
class ChoiceUpdate:
    index: int
    pieces: list[Piece]
    finish_reason: str | None  # set on the choice's last update


@dataclass
class _Choice:
    text: ChoiceText
    tokens: int = 0
    last_time: float | None = None
    finish_reason: str | None = None
    pieces: list[Piece] = field(default_factory=list)  # kept for collect()
    constraint: GrammarConstraint | None = None


class Generation:
    """See the module docstring."""

    def __init__(self, served: ServedModel, request_id: str, prompts: Sequence[list[int]],
                 params: SamplingParams, stop: Sequence[str] = (), logprobs: bool = False,
                 metrics: ServeMetrics | None = None, arrived: float | None = None,
                 grammar: Grammar | None = None, tool_calls: bool = False) -> None:
        self.served = served
        self.request_id = request_id
        self.prompts = [list(p) for p in prompts]
        self.params = params
        self.metrics = metrics
        self.arrived = arrived if arrived is not None else time.monotonic()
        self.first_token_time: float | None = None
        n = params.n
        self._choices = [_Choice(ChoiceText(served.token_bytes, served.tools, served.hidden, stop, logprobs,
                                            tool_calls, served.special_names),
                                 constraint=grammar.constraint() if grammar is not None else None)
                         for _ in range(len(self.prompts) * n)]
        self._constrained = grammar is not None
        self._subs: list[Submission] = []
        self._offset: dict[Submission, int] = {}
        self._queue: asyncio.Queue | None = None
        self._open = len(self._choices)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the engine restored from its prefix cache (known once admitted)."""
        return sum(sub.cached_tokens for sub in self._subs)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self._choices)

    def start(self) -> None:
        """Submit every prompt (prompt i seeded with seed + i); all or none are queued."""
        self._queue = asyncio.Queue()
        n = self.params.n
        try:
            for i, prompt in enumerate(self.prompts):
                params = (self.params if self.params.seed is None
                          else replace(self.params, seed=self.params.seed + i))
                constraints = ([c.constraint for c in self._choices[i * n: (i + 1) * n]]
                               if self._constrained else None)
                sub = self.served.scheduler.submit(f"{self.request_id}#{i}" if i else self.request_id,
                                                   prompt, params, self._queue, constraints)
                self._subs.append(sub)
                self._offset[sub] = i * self.params.n
        except Exception:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Stop every unfinished choice (idempotent)."""
        n = self.params.n
        for sub in self._subs:
            base = self._offset[sub]
            if any(self._choices[base + j].finish_reason is None for j in range(n)):
                self.served.scheduler.cancel(sub)
        for c in self._choices:
            if c.finish_reason is None:
                c.finish_reason = "cancelled"
        self._open = 0

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        """Updates of all choices, batched per wake-up; ends when every choice has finished."""
        if self._queue is None:
            raise RuntimeError("call start() before updates()")
        try:
            while self._open > 0:
                items = [await self._queue.get()]
                while not self._queue.empty():
                    items.append(self._queue.get_nowait())
                out = []
                for sub, payload in items:
                    if isinstance(payload, BaseException):
                        raise GenerationFailed(str(payload))
                    out.extend(u for ev in payload if (u := self._on_event(sub, ev)) is not None)
                if out:
                    yield out
        finally:
            if self._open > 0:
                self.cancel()

    async def collect(self) -> list[tuple[list[Piece], str]]:
        """Run to the end; (pieces, finish_reason) per choice."""
        async for _ in self.updates():
            pass
        return [(c.pieces, c.finish_reason or "length") for c in self._choices]

    def _on_event(self, sub: Submission, ev: TokenEvent) -> ChoiceUpdate | None:
        index = self._offset[sub] + ev.choice
        c = self._choices[index]
        if c.finish_reason is not None:  # tokens of a step that ran before our cancel landed
            return None
        c.tokens += 1
        self._time(c, ev.time)
        pieces = c.text.push(ev.token, ev.logprob, ev.top_logprobs)
        if c.text.stopped:
            c.finish_reason = "stop"
            if not ev.finished:
                self.served.scheduler.cancel(sub, ev.choice)
        elif ev.finished:
            if c.constraint is not None and c.constraint.error:
                raise GenerationFailed(f"choice {index}: the grammar matcher failed: {c.constraint.error}")
            pieces += c.text.finish()
            c.finish_reason = ev.finish_reason or "length"
            if c.finish_reason == "stop" and c.text.calls:
                c.finish_reason = "tool_calls"
        c.pieces.extend(pieces)
        if c.finish_reason is not None:
            self._open -= 1
        elif not pieces:
            return None
        return ChoiceUpdate(index, pieces, c.finish_reason)

    def _time(self, c: _Choice, t: float) -> None:
        name = self.served.spec.name
        if self.first_token_time is None:
            self.first_token_time = t
            if self.metrics is not None:
                self.metrics.first_token(name, t - self.arrived)
        if c.last_time is not None and self.metrics is not None:
            self.metrics.inter_token(name, t - c.last_time)
        c.last_time = t
