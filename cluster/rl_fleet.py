"""The rollout actors of an RL run as a fleet that survives a lost host (cluster/rl.py's RLRun uses it).

A rollout actor dies with its host. The fleet then starts a replacement and waits at most
`replace_wait_s` for Ray to place it and run its constructor:
- placed in time: it takes the dead actor's place (RLRun loads the learner's weights into it and
  checks them before it gets any work);
- not placed (no node with room: the host was the only one with the actor's resources, or the
  cluster is full): the dead actor leaves the fleet and the run carries on with fewer actors; the
  replacement stays queued in Ray as a "recruit" (on an autoscaling cluster, that pending demand is
  what asks for a new node). RLRun re-sends the dead actor's work to the remaining actors.
At each weight sync, `admit()` moves the recruits Ray has placed since into the fleet, so they receive
the weights with everyone and are checked like everyone: the count comes back when capacity does.
Every death counts against `max_restarts`; with no actor left and no recruit placed in time the run
stops with an error that says what to look at.

The Ray calls are behind `ActorBackend` (RayBackend is the real one), so the logic is unit-tested
without a cluster (tests/test_rl_fleet.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class RolloutCapacityError(RuntimeError):
    """Every rollout actor is gone and no replacement could be placed: the step cannot complete."""


class ActorBackend(Protocol):
    """What the fleet needs of Ray: start an actor, see which have been placed and started, kill one."""

    def create(self) -> Any: ...

    def wait_placed(self, actors: list[Any], timeout_s: float) -> list[Any]: ...

    def kill(self, actor: Any) -> None: ...


class RayBackend:
    """Actors made by `make()` (a ray.remote class's `.remote(...)` with its options)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._ready: dict[Any, Any] = {}  # actor -> the ref of its __ray_ready__ call

    def create(self) -> Any:
        actor = self._make()
        self._ready[actor] = actor.__ray_ready__.remote()  # resolves once placed and constructed
        return actor

    def wait_placed(self, actors: list[Any], timeout_s: float) -> list[Any]:
        import ray

        refs = {self._ready[a]: a for a in actors if a in self._ready}
        if not refs:
            return [a for a in actors if a not in self._ready]  # started elsewhere: taken as placed
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=max(0.0, timeout_s))
        placed = []
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                continue  # its constructor failed or its node died while it started: not placed
            placed.append(refs[ref])
        return placed

    def kill(self, actor: Any) -> None:
        import ray

        self._ready.pop(actor, None)
        ray.kill(actor, no_restart=True)


class RolloutFleet:
    """The live rollout actors (`actors`, in slot order) and the queued replacements (`recruits`)."""

    def __init__(self, backend: ActorBackend, target: int, *, replace_wait_s: float, max_restarts: int,
                 restarts: int = 0, log: Callable[[str], None] = print) -> None:
        self.backend, self.target = backend, target
        self.replace_wait_s, self.max_restarts = replace_wait_s, max_restarts
        self.restarts = restarts
        self.log = log
        self.actors: list[Any] = []
        self.recruits: list[Any] = []
        self.dropped = 0  # actors lost for good so far (their replacement was not placed in time)
        self._dead: set[int] = set()  # id() of actors already handled (several calls fail per death)

    def start(self) -> list[Any]:
        """Create `target` actors (placement waits for Ray, as before: RLRun's first sync blocks on them)."""
        self.actors = [self.backend.create() for _ in range(self.target)]
        return self.actors

    def is_dead(self, actor: Any) -> bool:
        return id(actor) in self._dead

    def lost(self, actor: Any, why: str) -> Any | None:
        """`actor` died: its placed replacement (same slot; the caller loads and checks its weights), or
        None when none was placed within replace_wait_s (the actor leaves the fleet; the caller gives its
        work to the others). An actor already handled returns None. Raises RuntimeError past
        max_restarts, RolloutCapacityError when no actor is left."""
        if self.is_dead(actor) or actor not in self.actors:
            return None
        self._dead.add(id(actor))
        self.restarts += 1
        slot = self.actors.index(actor)
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"rollout actor {slot} failed: {why}; {self.restarts} replacements exceed "
                               f"max_actor_restarts = {self.max_restarts}: look at the actors' "
                               "logs (out of memory? a crashing node?) or raise the limit")
        self.log(f"rl: replacing rollout actor {slot}: {why}")
        self.backend.kill(actor)
        new = self.backend.create()
        if self.backend.wait_placed([new], self.replace_wait_s):
            self.actors[slot] = new
            return new
        del self.actors[slot]
        self.recruits.append(new)
        self.dropped += 1
        self.log(f"rl: no replacement for rollout actor {slot} placed within {self.replace_wait_s:g} s "
                 f"(replace_wait_s): carrying on with {len(self.actors)} of {self.target} actors; the "
                 "replacement stays queued and joins at a later weight sync once Ray places it")
        if not self.actors:
            raise RolloutCapacityError(
                f"every rollout actor is lost ({why}) and none of {len(self.recruits)} replacement(s) was "
                f"placed within replace_wait_s = {self.replace_wait_s:g} s: the cluster has no room for "
                "a rollout actor (its hosts are gone, or rollout_resources names a resource no live node "
                "has); bring the hosts back or lower rollout_cpus, then relaunch to resume from the last "
                "checkpoint")
        return None

    def admit(self) -> list[Any]:
        """Recruits that Ray has placed since (not waiting): appended to the fleet and returned, so the
        caller syncs them with the others. The fleet never grows past `target`."""
        if not self.recruits:
            return []
        placed = self.backend.wait_placed(list(self.recruits), 0.0)
        room = self.target - len(self.actors)
        joined = [a for a in self.recruits if a in placed][:room]
        self.recruits = [a for a in self.recruits if a not in joined]
        self.actors.extend(joined)
        if joined:
            self.log(f"rl: {len(joined)} queued rollout actor(s) placed: back to {len(self.actors)} of "
                     f"{self.target}")
        return joined

    def least_busy(self, load: dict[int, int]) -> Any:
        """The live actor with the fewest calls in flight (`load`: id(actor) -> calls), first slot on ties."""
        return min(self.actors, key=lambda a: load.get(id(a), 0))

    def close(self) -> None:
        """Kill every actor and recruit."""
        for actor in self.actors + self.recruits:
            self.backend.kill(actor)
        self.actors, self.recruits = [], []
