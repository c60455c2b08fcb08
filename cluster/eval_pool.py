"""A pool of evaluation actors: each loads the model once, then evaluates whatever shards it is given.

Used by jobs/evaluate.py for CORE (and validation bpb and samples) and meant for the chat
evaluations too: the pool knows nothing about tasks. It is built from a `loader(device) -> state`
(e.g. `functools.partial(nanochat.evals.harness.load_eval_state, model_dir, tokenizer_dir)`) and runs
`fn(state, items) -> list[result]` functions, one result per item, in the actors:

    spec = plan_pool(num_actors=2, cpus_per_actor=1.0, resources=ray.cluster_resources())
    with EvalPool(loader, spec) as pool:
        results = pool.map(nanochat.evals.core.score_requests, requests)   # same order as requests

Notable:
- sizing (`plan_pool`): with GPUs in the cluster one GPU per actor (and no more actors than GPUs);
  without, CPUs per actor shrink to fit the cluster, fractions allowed: on a 2-core box two
  actors of 1 CPU, or four of 0.5 when four are asked for. torch threads = whole CPUs reserved
  (at least 1), set in the actor, since Ray's OMP_NUM_THREADS is not what torch uses everywhere;
- the actors are placed with Ray's SPREAD strategy: over several hosts where room allows;
- `map` cuts the items into contiguous chunks (several per actor) handed to whichever actor is
  free (ray.util.ActorPool) and puts the results back in item order; the results are those of
  one process because every item is scored on its own;
- `run_jobs` runs a whole evaluation's work as one queue (a `Jobs` list: bpb parts, CORE chunks,
  chat chunks, ... with estimated costs), the costliest first, each to the next free actor: no
  actor waits at a phase's end while another still has a backlog (before, the 25 s of validation
  bpb held one actor while the chunks queued behind it);
- a model or tokenizer that cannot be loaded is reported once, by `EvalPool.ready()`, with the
  actor's error, before any work is handed out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util import ActorPool

from cluster.artifacts import localize
from nanochat.errors import ConfigError
from nanochat.evals.harness import EvalState, load_eval_state, shard_items


class EvalPoolError(RuntimeError):
    """The pool cannot be built or an actor failed; the message carries the actor's error."""


@dataclass(frozen=True)
class Job:
    """One unit of an evaluation's work: fn(state, *args) in an actor."""

    label: str  # the work it belongs to ("CORE", "bpb", ...): progress lines, errors, timings
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    cost: float  # estimated actor-seconds (only the order and the progress estimate use it)
    items: int | None = None  # a chunk's item count: fn must return one result per item (checked)


class Jobs:
    """A list of jobs built piece by piece; `add_chunks` returns a handle whose results `gather`
    gives back in item order once `EvalPool.run_jobs` has run the list."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def add(self, label: str, fn: Callable[..., Any], args: tuple[Any, ...], cost: float) -> slice:
        self.jobs.append(Job(label, fn, args, cost))
        return slice(len(self.jobs) - 1, len(self.jobs))

    def add_chunks(self, label: str, fn: Callable[[Any, list[Any]], list[Any]], items: Sequence[Any],
                   chunks: int, cost_per_item: float) -> slice:
        """fn(state, chunk) over `chunks` contiguous chunks of items (fewer when there are fewer items)."""
        start = len(self.jobs)
        for chunk in shard_items(items, max(1, min(len(items), chunks))) if items else []:
            self.jobs.append(Job(label, fn, (chunk,), cost_per_item * len(chunk), items=len(chunk)))
        return slice(start, len(self.jobs))

    @staticmethod
    def gather(results: list[Any], handle: slice) -> list[Any]:
        """The concatenated per-item results of the chunks `handle` names."""
        return [r for out in results[handle] for r in out]


@dataclass(frozen=True)
class PoolSpec:
    """How many evaluation actors, and what each one reserves."""

    num_actors: int
    num_cpus: float  # Ray CPUs per actor (fractions allowed)
    num_gpus: float  # Ray GPUs per actor (0 on CPU clusters)
    threads: int  # torch intra-op threads per actor


def plan_pool(num_actors: int, cpus_per_actor: float, resources: dict[str, float],
              gpus_per_actor: float | None = None) -> PoolSpec:
    """Size the pool for a cluster whose totals are `resources` (ray.cluster_resources()).

    gpus_per_actor None: 1 when the cluster has GPUs, else 0. With GPUs, at most as many actors as
    GPUs fit. CPUs per actor are cut so all actors fit in the cluster's CPUs at once."""
    if num_actors < 1 or cpus_per_actor <= 0:
        raise ConfigError(f"need num_actors >= 1 and cpus_per_actor > 0, got {num_actors} and "
                          f"{cpus_per_actor}")
    total_cpus = float(resources.get("CPU", 0.0))
    total_gpus = float(resources.get("GPU", 0.0))
    if total_cpus <= 0:
        raise EvalPoolError(f"the Ray cluster reports no CPUs ({resources}); is it running?")
    gpus = (1.0 if total_gpus >= 1 else 0.0) if gpus_per_actor is None else gpus_per_actor
    if gpus > 0:
        if total_gpus < gpus:
            raise EvalPoolError(f"{gpus} GPU(s) per actor asked for, but the cluster has {total_gpus}")
        num_actors = min(num_actors, int(total_gpus // gpus))
    cpus = min(cpus_per_actor, total_cpus / num_actors)
    return PoolSpec(num_actors, cpus, gpus, max(1, int(cpus)))


def load_from_storage(model_uri: str, tokenizer_uri: str | None, device: str) -> EvalState:
    """Loader for an exported model: `functools.partial(load_from_storage, model_uri, tokenizer_uri)`;
    tokenizer_uri None: the tokenizer exported beside the weights."""
    return load_eval_state(localize(model_uri), localize(tokenizer_uri) if tokenizer_uri else None, device)


class EvalActor:
    """Holds one loaded state and runs evaluation functions on it (wrapped by ray.remote in EvalPool)."""

    def __init__(self, loader: Callable[[str], Any], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        # Ray sets CUDA_VISIBLE_DEVICES per actor
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        self.state = loader(self.device)
        self.load_seconds = time.perf_counter() - t0
        self.threads = threads

    def describe(self) -> dict[str, Any]:
        """Where this actor runs and how long loading took."""
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": self.device,
                "threads": self.threads, "load_seconds": round(self.load_seconds, 3)}

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(state, *args): a shard of items, or any single job (bpb, samples)."""
        return fn(self.state, *args)


class EvalPool:
    """`spec.num_actors` EvalActors over one loader; close() (or a with-block) frees them."""

    def __init__(self, loader: Callable[[str], Any], spec: PoolSpec) -> None:
        if not ray.is_initialized():
            raise EvalPoolError("Ray is not initialised: call ray.init() (or run as a Ray job) "
                                "before EvalPool")
        self.spec = spec
        # SPREAD: on several hosts the actors go to different ones where room allows (more hosts' cores
        # and memory for one evaluation; a lost host takes fewer actors with it); one node: no change
        remote = ray.remote(EvalActor).options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                                               scheduling_strategy="SPREAD")
        self.actors = [remote.remote(loader, spec.threads) for _ in range(spec.num_actors)]
        self._described: list[dict[str, Any]] | None = None

    def ready(self) -> list[dict[str, Any]]:
        """Wait until every actor has loaded its state; describe them. Raises EvalPoolError."""
        if self._described is None:
            self._described = self._get([a.describe.remote() for a in self.actors], "loading the model")
        return self._described

    def map(self, fn: Callable[[Any, list[Any]], list[Any]], items: Sequence[Any], chunks_per_actor: int = 4,
            label: str | None = None) -> list[Any]:
        """fn(state, chunk) over contiguous chunks of items on free actors; results in item order.
        With a `label`, a progress line (items done, elapsed, estimated remaining) per finished chunk."""
        self.ready()
        if not items:
            return []
        chunks = [c for c in shard_items(items, min(len(items), self.spec.num_actors * chunks_per_actor))
                  if c]
        pool = ActorPool(self.actors)
        outputs, done, t0 = [], 0, time.time()
        try:
            for out in pool.map(lambda actor, chunk: actor.run.remote(fn, chunk), chunks):
                outputs.append(out)
                done += len(out)
                if label:
                    took = time.time() - t0
                    eta = took * (len(items) - done) / max(done, 1)
                    print(f"[evaluate] {label}: {done}/{len(items)} ({100 * done / len(items):.0f}%) "
                          f"in {took:.0f}s, eta {eta:.0f}s", flush=True)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise EvalPoolError(f"an evaluation actor failed: {e}") from e
        results = [r for out in outputs for r in out]
        if len(results) != len(items):
            raise EvalPoolError(f"{fn.__name__} returned {len(results)} results for {len(items)} items")
        return results

    def run_jobs(self, jobs: Sequence[Job], progress: bool = True) -> tuple[list[Any], dict[str, float]]:
        """Run every job, the costliest first, each on the next free actor (one in flight per actor).
        Returns (results in the jobs' order, actor-seconds per label as the driver saw them). A
        progress line per finished job: jobs done per label, elapsed, remaining by estimated cost.
        On an error the caller closes the pool: its actors go, with the work they hold."""
        self.ready()
        order = sorted(range(len(jobs)), key=lambda i: (-jobs[i].cost, i))
        results: list[Any] = [None] * len(jobs)
        seconds: dict[str, float] = {}
        totals: dict[str, int] = {}
        for job in jobs:
            totals[job.label] = totals.get(job.label, 0) + 1
        done = dict.fromkeys(totals, 0)
        cost_all = max(sum(j.cost for j in jobs), 1e-9)
        cost_done = 0.0
        running: dict[ray.ObjectRef, tuple[int, int, float]] = {}  # ref -> (job, actor, its start)
        free, t0 = list(range(len(self.actors))), time.time()
        while order or running:
            while order and free:
                i, actor = order.pop(0), free.pop(0)
                running[self.actors[actor].run.remote(jobs[i].fn, *jobs[i].args)] = (i, actor, time.time())
            ready, _ = ray.wait(list(running), num_returns=1)
            i, actor, started = running.pop(ready[0])
            job = jobs[i]
            try:
                results[i] = ray.get(ready[0])
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                raise EvalPoolError(f"an evaluation actor failed on {job.label}: {e}") from e
            if job.items is not None and len(results[i]) != job.items:  # would shift later items' results
                name = getattr(job.fn, "__name__", job.fn)
                raise EvalPoolError(f"{job.label}: a chunk of {job.items} items gave {len(results[i])} "
                                    f"results ({name} must return one per item)")
            free.append(actor)
            seconds[job.label] = seconds.get(job.label, 0.0) + time.time() - started
            done[job.label] += 1
            cost_done += job.cost
            if progress:
                took = time.time() - t0
                eta = took * (cost_all - cost_done) / max(cost_done, 1e-9)
                parts = ", ".join(f"{label} {done[label]}/{n}" for label, n in totals.items())
                print(f"[evaluate] {parts}: {100 * cost_done / cost_all:.0f}% in {took:.0f}s, eta {eta:.0f}s",
                      flush=True)
        return results, {label: round(s, 3) for label, s in seconds.items()}

    def close(self) -> None:
        """Kill the actors (their reserved CPUs/GPUs return to the cluster)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> EvalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _get(refs: Any, what: str) -> Any:
        try:
            return ray.get(refs)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise EvalPoolError(f"an evaluation actor failed while {what}: {e}") from e
