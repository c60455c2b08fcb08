"""Continuous batching: one thread owns one Engine batch and steps it while requests come and go.

    asyncio handlers ──submit()/cancel()──▶ inbox ──▶ scheduler thread ──▶ Engine (KV-cache slots)
          ▲                                                │ one forward pass per step
          └──── call_soon_threadsafe(tokens of the step) ◀─┘

Notable:
- not static batching: a request joins the running batch as soon as it has slots. Waiting
  requests are added to the engine (several at once when they arrive together) and the engine
  prefills them in one padded forward; every other step decodes one token for every running
  sequence, whatever request it belongs to. With chunked prefill a step that has both decodes
  and prefills a piece of each waiting prompt beside the decode ("mixed"); a prompt whose start
  is in the engine's prefix cache only prefills the rest (`Submission.cached_tokens`).
- finished sequences free their slot in the step that finished them; a cancel (client gone,
  stop string matched) frees it before the next step.
- backpressure: at most `max_waiting` sequences wait beyond the free slots; `submit` raises
  `Overloaded` beyond that (the app answers 429). A request for n choices waits until n slots are free
  (first come, first served: a large request is not overtaken forever).
- step log: each step's kind, duration and rows (`request_id/choice`) are kept in a ring
  buffer (`step_log()`), so a test can see sequences of different requests decode together.
- no Ray, no HTTP: tests drive it with a tiny GPT (`python -m pytest tests/test_serve_units.py`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from nanochat.engine import Engine
from nanochat.sampling import SamplingParams, TokenConstraint

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """Too many requests wait for engine slots; retry later."""


class SchedulerClosed(RuntimeError):
    """The scheduler was shut down (model unloaded or replica stopping)."""


class TokenEvent(NamedTuple):
    """One token of one choice of a submission, as produced by one engine step."""

    choice: int  # 0..n-1 within the submission
    token: int
    logprob: float | None
    finished: bool
    finish_reason: str | None  # "stop" (stop token) | "length" | None
    time: float  # time.monotonic() after the step
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token, raw log-prob), most likely first


@dataclass(frozen=True)
class StepRecord:
    """What one engine step did."""

    index: int
    kind: str  # "prefill" | "decode" | "mixed" (decode rows and prefill pieces, chunked prefill)
    start: float  # time.monotonic() at the start of the step
    duration_s: float
    rows: tuple[str, ...]  # "request_id/choice" of every row that got a token
    waiting: int  # requests still waiting for slots after the step

    def as_dict(self) -> dict:
        return {"index": self.index, "kind": self.kind, "start": self.start,
                "duration_ms": round(1000 * self.duration_s, 3), "rows": list(self.rows),
                "waiting": self.waiting}


@dataclass(eq=False)
class Submission:
    """One prompt with params.n choices; events arrive on `queue` as (submission, list[TokenEvent])
    or (submission, Exception)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.monotonic)
    slots: list[int] = field(default_factory=list)  # engine slots, set by the scheduler thread
    constraints: list[TokenConstraint] | None = None  # one per choice (structured output, tool calls)
    cached_tokens: int = 0  # prompt tokens restored from the engine's prefix cache, set at admission


class Scheduler:
    """Drives one Engine from a dedicated thread; see the module docstring."""

    def __init__(self, engine: Engine, *, max_waiting: int = 64, step_log_size: int = 4096,
                 on_step: Callable[[StepRecord, int], None] | None = None, name: str = "model") -> None:
        """on_step(record, tokens_emitted) is called in the scheduler thread after every step."""
        self.engine = engine
        self.max_waiting = max_waiting
        self.name = name
        self.on_step = on_step
        self._cv = threading.Condition()
        self._waiting: deque[Submission] = deque()  # guarded by _cv
        self._cancels: list[tuple[Submission, int | None]] = []  # guarded by _cv
        self._closed = False
        self._owner: dict[int, tuple[Submission, int]] = {}  # slot -> (submission, choice); thread only
        self._free = engine.cache.batch_size  # free slots as of the thread's last update; guarded by _cv
        self._log: deque[StepRecord] = deque(maxlen=step_log_size)
        self._steps = 0
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set when the thread died

    # ---- called from any thread ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"scheduler-{self.name}", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; every unfinished submission gets SchedulerClosed."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.engine.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               queue: asyncio.Queue | None = None,
               constraints: list[TokenConstraint] | None = None) -> Submission:
        """Queue a prompt for params.n choices; call from the event loop that will read `queue`
        (a fresh one by default; pass one queue to several submissions to read them together).
        constraints: one per choice, applied by the engine's sampler (see nanochat/engine.py)."""
        if params.n > self.engine.cache.batch_size:
            raise ValueError(f"n = {params.n} exceeds the {self.engine.cache.batch_size} engine slots")
        loop = asyncio.get_running_loop()
        sub = Submission(request_id, list(prompt), params, queue or asyncio.Queue(), loop,
                         constraints=constraints)
        with self._cv:
            if self._closed:
                raise SchedulerClosed(f"model {self.name} is shutting down; retry")
            queued = sum(s.params.n for s in self._waiting) + params.n
            # more would wait than max_waiting, even after free slots
            if queued - self._free > self.max_waiting:
                raise Overloaded(f"{len(self._waiting)} requests already wait for model {self.name}")
            self._waiting.append(sub)
            self._cv.notify_all()
        return sub

    def cancel(self, sub: Submission, choice: int | None = None) -> None:
        """Stop generating one choice of `sub` (or all); its slots are freed before the next step."""
        with self._cv:
            self._cancels.append((sub, choice))
            self._cv.notify_all()

    def waiting(self) -> int:
        with self._cv:
            return len(self._waiting)

    def step_log(self, last: int | None = None) -> list[StepRecord]:
        records = list(self._log)  # deque copy is atomic enough under the GIL
        return records if last is None else records[-last:]

    # ---- the scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._closed or self._cancels or self._owner or self._admissible()):
                        self._cv.wait()
                    if self._closed:
                        break
                    cancels, self._cancels = self._cancels, []
                    admitted = self._admit()
                self._apply_cancels(cancels)
                if admitted or self._owner:
                    self._step()
                with self._cv:
                    self._free = len(self.engine.free_slots())
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting client, then re-raised
            self.error = exc
            log.exception("scheduler thread of %s died", self.name)
            raise
        finally:
            self._fail_all(SchedulerClosed(f"model {self.name} stopped serving; retry"))

    def _admissible(self) -> bool:
        return bool(self._waiting) and len(self.engine.free_slots()) >= self._waiting[0].params.n

    def _admit(self) -> list[Submission]:
        """Move waiting submissions into free engine slots, in arrival order (under _cv)."""
        admitted = []
        while self._admissible():
            sub = self._waiting.popleft()
            sub.slots = self.engine.add_group(sub.prompt, sub.params, sub.constraints)
            sub.cached_tokens = self.engine.cached_tokens(sub.slots[0])
            for choice, slot in enumerate(sub.slots):
                self._owner[slot] = (sub, choice)
            admitted.append(sub)
        self._free = len(self.engine.free_slots())
        return admitted

    def _apply_cancels(self, cancels: list[tuple[Submission, int | None]]) -> None:
        for sub, choice in cancels:
            with self._cv:
                if sub in self._waiting:
                    self._waiting.remove(sub)
                    continue
            for c, slot in enumerate(sub.slots):
                if (choice is None or c == choice) and self._owner.get(slot, (None,))[0] is sub:
                    del self._owner[slot]
                    self.engine.remove(slot)

    def _step(self) -> None:
        start = time.monotonic()
        try:
            plan = self.engine.schedule()
            if plan.kind == "idle":  # only when every owned row vanished; do not spin
                with self._cv:
                    self._cv.wait(0.01)
                return
            outputs = self.engine.update_from_output(plan, self.engine.execute(plan))
        except Exception as exc:  # noqa: BLE001 - one bad step fails its requests, not the replica
            log.exception("engine step failed; failing the %d running sequences", len(self._owner))
            self._fail_running(RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))
            return
        now = time.monotonic()
        per_sub: dict[Submission, list[TokenEvent]] = {}
        rows = []
        for out in outputs:
            sub, choice = self._owner[out.slot]
            per_sub.setdefault(sub, []).append(
                TokenEvent(choice, out.token, out.logprob, out.finished, out.finish_reason, now,
                           out.top_logprobs))
            rows.append(f"{sub.request_id}/{choice}")
            if out.finished:
                del self._owner[out.slot]
                self.engine.remove(out.slot)
        self._deliver(per_sub)
        record = StepRecord(self._steps, plan.kind, start, now - start, tuple(rows), self.waiting())
        self._steps += 1
        self._log.append(record)
        if self.on_step is not None:
            self.on_step(record, len(outputs))

    def _deliver(self, per_sub: dict[Submission, list]) -> None:
        """One thread-safe callback per event loop per step (not one per token)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for sub, item in per_sub.items():
            by_loop.setdefault(sub.loop, []).append((sub, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _fail_running(self, exc: BaseException) -> None:
        subs = {sub for sub, _ in self._owner.values()}
        for slot in list(self._owner):
            self.engine.remove(slot)
        self._owner.clear()
        self._deliver(dict.fromkeys(subs, exc))

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        subs = {sub for sub, _ in self._owner.values()} | set(waiting)
        self._owner.clear()
        self._deliver(dict.fromkeys(subs, exc))


def _put_all(items: list[tuple[Submission, object]]) -> None:
    for sub, item in items:
        sub.queue.put_nowait((sub, item))
