"""A pool of Ray sandbox actors: many executions of model-written code at once, off the engine's thread.

Used by RL rollouts and serving (the engine's Python tool) and by HumanEval scoring. Each actor
holds one `nanochat.sandbox.Sandbox` (probed once, ~0.2 s) and runs up to `max_concurrency`
executions at a time in threads; every execution is its own sandboxed process tree, so the
actor's threads only wait on pipes and a fraction of a CPU per actor is enough to reserve.

    pool = SandboxPool(num_actors=2)                # after ray.init()
    pool.run("print(1)\\n2+3")                      # ExecResult(status="ok", stdout="1\\n", value="5")
    pool.map(["1+1", "while True: pass"])           # in order; a hostile one costs only its own thread
    engine = Engine(model, tool_use=ToolUse(run=pool.tool(), ...))   # tool calls run on the pool
    pool.check_humaneval(problems)                  # verdicts model code cannot forge

Notable:
- `map`/`check_humaneval` keep at most `max_concurrency` calls in flight per actor and give the
  next call to the least busy actor, so a slow (hostile) execution holds one thread, not a queue;
- `ready()` returns, per actor, its node and the protections its Sandbox measured there (a node
  without bubblewrap shows up as "MISSING: ..."), so callers can log or refuse them;
- the pool pickles as its actor handles: pass it to rollout actors and they share it;
- model code can only hurt its own execution (see nanochat/sandbox.py): a fork bomb, a timeout or
  a 4 GB allocation come back as that call's status, and the actor keeps serving.

Tests: `python -m pytest tests/test_sandbox_pool.py -q` (the cluster tests start a local Ray).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import ray

from nanochat.errors import ConfigError
from nanochat.evals.humaneval_check import CheckResult, check_completion
from nanochat.sandbox import ExecResult, Sandbox, SandboxLimits, format_tool_output


class SandboxPoolError(RuntimeError):
    """A sandbox actor failed or cannot be built; the message carries the actor's error."""


class SandboxActor:
    """One Sandbox in one Ray actor (wrapped by ray.remote in SandboxPool); thread-safe."""

    def __init__(self, limits: SandboxLimits | None) -> None:
        self.sandbox = Sandbox(limits)
        self._lock = threading.Lock()
        self.executions = 0

    def _count(self) -> None:
        with self._lock:
            self.executions += 1

    def describe(self) -> dict[str, Any]:
        """Where this actor runs, the protections active there, and how many calls it served."""
        caps = self.sandbox.capabilities
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "mode": caps.mode,
                "missing": list(caps.missing), "summary": caps.summary(), "executions": self.executions}

    def run(self, code: str, timeout_s: float | None) -> ExecResult:
        self._count()
        return self.sandbox.run(code, timeout_s=timeout_s)

    def check_humaneval(self, problem: dict[str, str], timeout_s: float | None) -> CheckResult:
        self._count()
        return check_completion(lambda program: self.sandbox.run(program, timeout_s=timeout_s),
                                problem["prompt"], problem["completion"], problem["test"],
                                problem["entry_point"])


class SandboxPool:
    """`num_actors` SandboxActors; close() (or a with-block) frees them."""

    def __init__(self, num_actors: int = 2, num_cpus: float = 0.25, max_concurrency: int = 4,
                 limits: SandboxLimits | None = None) -> None:
        """num_cpus: Ray CPUs each actor reserves (the sandboxed processes are not counted by Ray:
        size it for how much sandboxed work a node may take); max_concurrency: executions at once
        per actor; limits: per-execution limits (nanochat.sandbox.SandboxLimits)."""
        if num_actors < 1 or max_concurrency < 1 or num_cpus < 0:
            raise ConfigError(f"need num_actors >= 1, max_concurrency >= 1 and num_cpus >= 0, got "
                             f"{num_actors}, {max_concurrency} and {num_cpus}")
        if not ray.is_initialized():
            raise SandboxPoolError("Ray is not initialised: call ray.init() (or run as a Ray job) "
                                   "before SandboxPool")
        self.max_concurrency = max_concurrency
        remote = ray.remote(SandboxActor).options(
            num_cpus=num_cpus, max_concurrency=max_concurrency, scheduling_strategy="SPREAD")
        self.actors = [remote.remote(limits) for _ in range(num_actors)]
        self._next = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"actors": self.actors, "max_concurrency": self.max_concurrency}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.actors, self.max_concurrency = state["actors"], state["max_concurrency"]
        self._next, self._lock = 0, threading.Lock()

    def ready(self) -> list[dict[str, Any]]:
        """Wait until every actor has probed its sandbox; describe them (see SandboxActor.describe)."""
        return self._get([a.describe.remote() for a in self.actors], "starting the sandbox")

    def submit(self, code: str, timeout_s: float | None = None) -> ray.ObjectRef:
        """Start one execution on the next actor (round robin); returns the ObjectRef of its ExecResult."""
        if not self.actors:
            raise SandboxPoolError("the sandbox pool is closed")
        with self._lock:
            actor = self.actors[self._next % len(self.actors)]
            self._next += 1
        return actor.run.remote(code, timeout_s)

    def run(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Execute one piece of code (blocking this thread only); timeout_s None = the limits' own."""
        return self._get(self.submit(code, timeout_s), "running code")

    def tool(self, timeout_s: float | None = None, max_chars: int = 1000) -> Callable[[str], str]:
        """`ToolUse.run` for the Engine: code -> the text forced between <|output_start|> and
        <|output_end|>. The engine calls it from its tool threads, so decoding goes on meanwhile."""

        def run_tool(code: str) -> str:
            return format_tool_output(self.run(code, timeout_s), max_chars)

        return run_tool

    def map(self, codes: Sequence[str], timeout_s: float | None = None) -> list[ExecResult]:
        """Execute every code, spread over the actors; results in the order of `codes`."""
        return self._dispatch("run", [(code, timeout_s) for code in codes], "running code")

    def check_humaneval(self, problems: Sequence[dict[str, str]],
                        timeout_s: float | None = 10.0) -> list[CheckResult]:
        """Score completions: each problem is a dict with prompt, completion, test and entry_point
        (nanochat/evals/humaneval_check.py); results in order."""
        for i, p in enumerate(problems):
            missing = {"prompt", "completion", "test", "entry_point"} - set(p)
            if missing:
                raise ConfigError(f"problem {i} lacks {sorted(missing)}; "
                                  "give prompt, completion, test and entry_point")
        return self._dispatch("check_humaneval", [(dict(p), timeout_s) for p in problems],
                              "checking HumanEval")

    def close(self) -> None:
        """Kill the actors (running executions are torn down with them)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dispatch(self, method: str, calls: list[tuple[Any, ...]], what: str) -> list[Any]:
        """Each call on the least busy actor, at most max_concurrency in flight per actor."""
        if not self.actors:
            raise SandboxPoolError("the sandbox pool is closed")
        results: list[Any] = [None] * len(calls)
        load = [0] * len(self.actors)  # calls in flight per actor
        in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (call index, actor index)
        start = 0
        while start < len(calls) or in_flight:
            while start < len(calls) and min(load) < self.max_concurrency:
                a = load.index(min(load))
                ref = getattr(self.actors[a], method).remote(*calls[start])
                in_flight[ref] = (start, a)
                load[a] += 1
                start += 1
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                i, a = in_flight.pop(ref)
                load[a] -= 1
                results[i] = self._get(ref, what)
        return results

    @staticmethod
    def _get(refs: Any, what: str) -> Any:
        try:
            return ray.get(refs)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise SandboxPoolError(f"a sandbox actor failed while {what}: {e}") from e
