"""GRPO on a Ray cluster, the driver: it owns the rollout actors and the learner actor group
(cluster/rl_actors.py) and runs one loop with verified weight sync. Used by jobs/rl.py.

    run = RLRun(spec, storage, model_uri=".../sft/model", tokenizer_uri=None)   # after ray.init()
    run.start()            # sandbox pool, learners (load SFT or resume), rollout actors, first sync
    summary = run.run()    # the loop below; checkpoints, metrics.jsonl, Ray metrics
    run.export(meta)       # {run}/rl/model/ with the tokenizer, config.json last
    run.close()

One driver step (numbered as the Ray calls happen):
  1. prompts of the step (a seeded shuffle of the task, so a resume picks up the same ones) are cut
     into one contiguous chunk per rollout actor: `RolloutWorker.rollout` samples G completions per
     prompt with the engine (tool calls run on the SandboxPool) and scores them with the task;
  2. a rollout actor that dies (or its host) is replaced (a fresh actor loads the learner's weights
     and is checked) and its chunk is re-issued; the step completes. If Ray cannot place the
     replacement within `replace_wait_s` (the lost host was the only one with room), the step goes
     on with the remaining actors: the dead actor's chunk goes to the live actor with the least work,
     the broadcast group is rebuilt for the smaller set at the next sync and the checks cover the
     actors that are left; the replacement stays queued in Ray and joins at a later sync, once
     placed (cluster/rl_fleet.py). Each sample records the weights version that made it;
  3. the driver turns rewards into group advantages and one TrainBatch (nanochat/rl.py), puts it in
     the object store once, and every learner rank trains on its shard (`LearnerWorker.train_step`);
  4. weight sync: object store (learner rank 0 returns its CPU state_dict, every actor loads it) or
     broadcast (learner rank 0 and the actors form a torch process group: NCCL on GPUs, gloo on CPUs;
     the NCCL path is written but untested on GPUs here). The weights carry a version number;
  5. the sync is checked every time: the exact per-tensor checksums of every actor must equal the
     learner's, and the log-probs of a fixed probe batch through the same full forward pass must
     agree within `probe_atol`. Any mismatch raises WeightSyncError and stops the run;
  6. pass@k on held-out problems every `eval_every` steps, a checkpoint every `checkpoint_every`.
With `max_staleness = 1` (one-step-off-policy) the actors sample step t+1 while the learner trains
step t; such rollouts are one version old and the loss uses the clipped importance ratio against
the behaviour log-probs the engine recorded.

Placement: `rollout_resources` / `learner_resources` are custom Ray resources each actor also
requires (a node type declares them in cluster.yaml's `resources:`, or `ray start --resources`), so
rollout actors and learners can be kept on different kinds of hosts. Only rollout actors are
replaced; a lost learner host stops the run (relaunch resumes from the last checkpoint).

Why an actor group and not TorchTrainer for the learner: the driver must call the learner between
rollouts and syncs every step (train, give weights, checksum, probe, broadcast), which is a method
call on an actor; a TorchTrainer runs its own loop and would need a side channel for each of these.
The learner ranks still form a torch.distributed group (gloo/NCCL) for the sharded optimizers.

Tests: `python -m pytest tests/test_rl_cluster.py` (local cluster); benchmark: benchmarks/rl_throughput.py.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import ray

from cluster import artifacts
from cluster.artifacts import localize
from cluster.metrics import StageMetrics, rl_metrics
from cluster.rl_actors import LearnerWorker, RolloutWorker, WeightSyncError, loss_config
from cluster.rl_fleet import RayBackend, RolloutFleet
from cluster.sandbox_pool import SandboxPool
from cluster.specs import RLSpec
from cluster.storage import RunStorage
from nanochat import rl
from nanochat.errors import ConfigError
from nanochat.tasks import rl_task
from nanochat.tokenizer import Tokenizer

STAGE = "rl"


@dataclass
class _Pending:
    """Rollout calls in flight: ref -> (actor, task items, position of the first item, seed)."""

    split: Literal["train", "eval"]
    n: int
    calls: dict[Any, tuple[int, list[int], int, int]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Rollouts:
    """The gathered result of one round of rollout calls, groups in item order."""

    groups: list[list[rl.Sample]]
    tokens: int
    seconds: float  # generation time of the slowest chunk (actors work in parallel)
    wall_s: float  # driver's view: dispatch to the last result (with overlap: until gathered)


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of `parts` contiguous, near-equal chunks of range(n) (some may be empty)."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


class RLRun:
    """The driver: owns the actors, runs the loop, checks every sync, writes metrics and checkpoints."""

    def __init__(self, spec: RLSpec, storage: RunStorage, *, model_uri: str, tokenizer_uri: str,
                 ray_metrics: bool = True) -> None:
        self.spec, self.storage = spec, storage
        self.model_uri, self.tokenizer_uri = model_uri, tokenizer_uri
        self.ray_metrics = ray_metrics
        self.sandbox: SandboxPool | None = None
        self.learners: list[Any] = []
        self.fleet: RolloutFleet | None = None
        self.learner_version = self.actor_version = 0
        self.start_step = self.restarts = self.generation = 0
        self.regroup = False
        self.redispatched = 0  # rollout chunks sent to another live actor after a death
        self.history: list[dict[str, Any]] = []
        self.eval_rewards: list[list[float]] = []  # per evaluation: the mean reward of each held-out prompt

    # ---- setup ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Sandbox pool, learners (SFT weights or the latest checkpoint), rollout actors, first sync."""
        s = self.spec
        if s.sandbox_actors > 0:
            self.sandbox = SandboxPool(s.sandbox_actors, s.sandbox_cpus)
            self.sandbox.ready()
        learner = ray.remote(LearnerWorker).options(num_cpus=s.learner_cpus, num_gpus=s.learner_gpus,
                                                    resources=dict(s.learner_resources) or None)
        self.learners = [learner.remote(r, s.num_learners, s) for r in range(s.num_learners)]  # 1. learners
        master = ray.get(self.learners[0].address.remote())
        info = ray.get([w.setup.remote(self.model_uri, master) for w in self.learners])[0]
        self.model_config = info["model_config"]
        found = artifacts.latest_checkpoint(self.storage, STAGE)
        if found is not None:
            restored = ray.get([w.restore.remote(found.uri) for w in self.learners])[0]
            self.start_step, self.learner_version = restored["step"], restored["version"]
            self.restarts = int(restored["loop"].get("actor_restarts", 0))
            print(f"rl: resuming from step {self.start_step} (weights version {self.learner_version})",
                  flush=True)
        self._rollout_cls = ray.remote(RolloutWorker).options(num_cpus=s.rollout_cpus,
                                                              num_gpus=s.rollout_gpus,
                                                              resources=dict(s.rollout_resources) or None)
        self.fleet = RolloutFleet(RayBackend(self._new_actor), s.num_rollout_actors,
                                  replace_wait_s=s.replace_wait_s, max_restarts=s.max_actor_restarts,
                                  restarts=self.restarts, log=lambda m: print(m, flush=True))
        self.fleet.start()  # 2. rollout actors
        self._prepare_items()
        self.probe = rl.probe_batch(self.model_config["vocab_size"], rows=4,
                                    length=min(32, self.model_config["sequence_len"]))
        if s.sync_method == "broadcast":
            self.store_addr = ray.get(self.learners[0].open_sync_store.remote())
            self.regroup = True
        self.sync()  # 3. first sync + check

    def _new_actor(self) -> Any:
        return self._rollout_cls.remote(self.model_config, self.tokenizer_uri, self.spec, self.sandbox)

    @property
    def actors(self) -> list[Any]:
        """The live rollout actors, in slot order (fewer than num_rollout_actors after a lost host)."""
        return self.fleet.actors if self.fleet is not None else []

    def _prepare_items(self) -> None:
        """Items whose prompt fits the engine's context, for training and held-out evaluation."""
        tokenizer = Tokenizer.load(localize(self.tokenizer_uri))
        context = self.spec.max_seq_len or self.model_config["sequence_len"]
        self.items: dict[str, list[int]] = {}
        for split in ("train", "eval"):
            task = rl_task(self.spec.task, split, self.spec.offline)
            limit = len(task) if split == "train" else min(len(task), self.spec.eval_examples)
            fits = [i for i in range(len(task))
                    if len(tokenizer.render_for_completion(task.get(i))) < context]
            if not fits:
                raise ConfigError(f"no prompt of {task.describe()} fits the engine context of {context} "
                                 "tokens; raise max_seq_len")
            self.items[split] = fits[:limit]
            if len(fits) < len(task) and split == "train":
                print(f"rl: {len(task) - len(fits)} of {len(task)} prompts of {task.describe()} are longer "
                      f"than the context ({context} tokens) and are skipped", flush=True)

    def step_items(self, step: int) -> list[int]:
        """Task items of `step`: a seeded shuffle per epoch, so a resumed run draws the same prompts."""
        items, n = self.items["train"], self.spec.examples_per_step
        out = []
        for k in range(step * n, (step + 1) * n):
            epoch, pos = divmod(k, len(items))
            order = list(items)
            random.Random(self.spec.seed * 1_000_003 + epoch).shuffle(order)
            out.append(order[pos])
        return out

    # ---- rollouts --------------------------------------------------------------------------------

    def launch(self, split: Literal["train", "eval"], items: list[int], seed: int, n: int) -> _Pending:
        """One contiguous chunk of `items` per rollout actor; item at position p uses seed + p."""
        pending = _Pending(split, n)
        for actor, (a, b) in zip(self.actors, _chunks(len(items), len(self.actors)), strict=True):
            if b > a:
                ref = actor.rollout.remote(split, items[a:b], seed + a, n)
                pending.calls[ref] = (actor, items[a:b], a, seed + a)
        return pending

    def gather(self, pending: _Pending) -> _Rollouts:
        """Wait for every chunk; a chunk whose actor died goes to its replacement or, when none could be
        placed, to the live actor with the fewest chunks in flight (same items and seed: same samples)."""
        done: dict[int, dict[str, Any]] = {}
        while pending.calls:
            ready, _ = ray.wait(list(pending.calls), num_returns=1)
            actor, items, start, seed = pending.calls.pop(ready[0])
            try:
                done[start] = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                target = self._replace(actor, f"it died during rollouts ({type(e).__name__})")
                if target is None:
                    load: dict[int, int] = {}
                    for a, *_ in pending.calls.values():
                        load[id(a)] = load.get(id(a), 0) + 1
                    target = self.fleet.least_busy(load)
                    self.redispatched += 1
                    print(f"rl: the chunk of {len(items)} prompt(s) from position {start} goes to a "
                          "remaining rollout actor", flush=True)
                ref = target.rollout.remote(pending.split, items, seed, pending.n)
                pending.calls[ref] = (target, items, start, seed)
        outs = [done[k] for k in sorted(done)]
        return _Rollouts([g for o in outs for g in o["groups"]], sum(o["tokens"] for o in outs),
                         max(o["seconds"] for o in outs), time.perf_counter() - pending.started)

    def _launch_step(self, step: int, on_dispatch: Callable[[int, list[Any]], None] | None) -> _Pending:
        pending = self.launch("train", self.step_items(step), self.spec.seed * 7919 + step * 100_003,
                              self.spec.group_size)
        if on_dispatch is not None:
            on_dispatch(step, list(self.actors))
        return pending

    def _replace(self, actor: Any, why: str) -> Any | None:
        """`actor` died: a fresh one in its slot with the learner's current weights, checked like any
        sync, and returned; or None when none could be placed in time (the fleet carries on smaller)."""
        new = self.fleet.lost(actor, why)
        self.restarts = self.fleet.restarts
        self.regroup = self.spec.sync_method == "broadcast"
        if new is not None:
            ray.get(new.load_weights.remote(self.learners[0].weights.remote()))
            self.verify_sync([new])
        return new

    # ---- weight sync -----------------------------------------------------------------------------

    def sync(self) -> dict[str, float]:
        """Learner weights -> every rollout actor (object store or broadcast), then check them."""
        t0 = time.perf_counter()
        if self.fleet.admit():  # queued replacements placed since: synced and checked with the others
            self.regroup = self.spec.sync_method == "broadcast"
        if self.spec.sync_method == "object_store":
            payload = self.learners[0].weights.remote()
            refs = [(a, a.load_weights.remote(payload)) for a in self.actors]
            for actor, ref in refs:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._replace(actor, f"it died during the weight sync ({type(e).__name__})")
        else:
            if self.regroup:
                self._regroup()
            ray.get([m.broadcast_weights.remote(self.learner_version)
                     for m in [self.learners[0], *self.actors]])
        sync_s = time.perf_counter() - t0
        self.actor_version = self.learner_version
        return {"sync_s": sync_s, **self.verify_sync()}

    def _regroup(self) -> None:
        """(Re)build the broadcast group with the current actors (after a start or a replacement)."""
        self.generation += 1
        host, port = self.store_addr
        world = 1 + len(self.actors)
        ray.get([self.learners[0].join_sync_group.remote(host, port, 0, world, self.generation)]
                + [a.join_sync_group.remote(host, port, i + 1, world, self.generation)
                   for i, a in enumerate(self.actors)])
        self.regroup = False

    def verify_sync(self, actors: list[Any] | None = None) -> dict[str, float]:
        """Check rollout actors (default: every live one) against the learner: same version, identical
        per-tensor checksums, probe log-probs within probe_atol. Raises WeightSyncError naming the actor
        and tensors."""
        t0 = time.perf_counter()
        version, want = ray.get(self.learners[0].checksums.remote())
        _, reference = ray.get(self.learners[0].probe.remote(*self.probe))
        checked = list(self.actors) if actors is None else actors
        refs = [(a, a.checksums.remote(), a.probe.remote(*self.probe)) for a in checked]
        worst = 0.0
        for actor, *pair in refs:
            try:
                (got_version, got), (_, logp) = ray.get(pair)
            except ray.exceptions.RayActorError as e:
                # checks its successor, if one is placed
                self._replace(actor, f"it died during the sync check ({type(e).__name__})")
                continue
            slot = self.actors.index(actor) if actor in self.actors else "?"
            where = f"rollout actor {slot} (weights version {got_version}, learner version {version})"
            if got_version != version:
                raise WeightSyncError(f"weight sync check failed: {where} did not receive the learner's "
                                      "weights; the run stops rather than train on rollouts of another "
                                      "policy")
            problems = rl.checksum_mismatches(want, got)
            if problems:
                raise WeightSyncError(
                    f"weight sync check failed: {where} differs from the learner in {len(problems)} of "
                    f"{len(want)} tensors although it reports the same version: {'; '.join(problems[:3])}. "
                    "Its rollouts would train the learner on another policy, so the run stops. "
                    f"The sync path ({self.spec.sync_method}) delivered different bits: "
                    "check for dtype casts, partial loads or a tensor written after the sync")
            gap = rl.logprob_gap(reference, logp)
            if gap > self.spec.probe_atol:
                raise WeightSyncError(
                    f"weight sync check failed: {where} has identical checksums but its probe log-probs "
                    f"differ from the learner's by {gap:.3g} > probe_atol {self.spec.probe_atol}: "
                    "the two forward passes differ (device, dtype or code version); "
                    "fix that or raise probe_atol if the gap is expected")
            worst = max(worst, gap)
        return {"verify_s": time.perf_counter() - t0, "probe_gap": worst}

    # ---- learning, evaluation, checkpoints --------------------------------------------------------

    def learn(self, rollouts: _Rollouts, step: int) -> tuple[list[Any], dict[str, Any]]:
        """Start one learner step on the rollouts (returns the refs of every rank) and batch stats."""
        versions = [x.version for g in rollouts.groups for x in g]
        staleness = rl.check_staleness(self.learner_version, versions, self.spec.max_staleness)
        batch = rl.pack_batch(rollouts.groups, loss_config(self.spec))
        batch_ref = ray.put(batch)
        refs = [w.train_step.remote(batch_ref, step) for w in self.learners]
        rewards = [x.reward for g in rollouts.groups for x in g]
        flat = [g for g in rollouts.groups if len({x.reward for x in g}) == 1]
        return refs, {"reward_mean": sum(rewards) / len(rewards), "staleness": staleness,
                      "samples": len(rewards),
                      "trained_tokens": batch.num_tokens, "flat_groups": len(flat) / len(rollouts.groups),
                      "completion_len": rollouts.tokens / len(rewards)}

    def evaluate(self) -> dict[str, float]:
        """pass@k (k = 1..eval_samples) on the held-out items, sampled like the training rollouts."""
        n = self.spec.eval_samples
        out = self.gather(self.launch("eval", self.items["eval"], self.spec.seed + 7_777_777, n))
        correct = [sum(x.reward > 0 for x in g) for g in out.groups]
        rewards = [sum(x.reward for x in g) / len(g) for g in out.groups]  # per held-out prompt
        self.eval_rewards.append(rewards)
        return {**{f"pass_at_{k}": rl.pass_at_k(correct, n, k) for k in range(1, n + 1)},
                "eval_reward_mean": sum(rewards) / len(rewards), "eval_reward_se": rl.standard_error(rewards)}

    def checkpoint(self, step: int) -> str:
        """Every learner rank writes its files; rank 0 last, its state.json last of all."""
        dest = f"{self.storage.stage_uri(STAGE)}/{artifacts.checkpoint_name(step)}"
        loop = {"actor_restarts": self.restarts}
        ray.get([w.save_checkpoint.remote(dest, step, loop) for w in self.learners[1:]])
        ray.get(self.learners[0].save_checkpoint.remote(dest, step, loop))
        for old in artifacts.checkpoints(self.storage, STAGE)[: -self.spec.checkpoints_to_keep]:
            artifacts.delete_dir(old)
        return dest

    # ---- the loop --------------------------------------------------------------------------------

    def run(self, on_dispatch: Callable[[int, list[Any]], None] | None = None) -> dict[str, Any]:
        """Steps start_step..num_steps-1; on_dispatch(step, actors) is called once a step's rollouts
        are in flight (tests use it to kill an actor mid-step). Returns a summary."""
        s = self.spec
        log = self.storage.metrics(STAGE)
        gauges = rl_metrics(self.storage.run) if self.ray_metrics else None
        step = self.start_step
        if s.eval_every > 0 and step == 0:
            self._record(log, gauges, {"step": 0, "version": self.learner_version, **self.evaluate()})
        rollouts = self.gather(self._launch_step(step, on_dispatch)) if step < s.num_steps else None
        while rollouts is not None:
            t0 = time.perf_counter()
            train_refs, record = self.learn(rollouts, step)  # 4. learner step ...
            upcoming = None
            if s.max_staleness > 0 and step + 1 < s.num_steps:  # ... while the actors sample the next one
                upcoming = self._launch_step(step + 1, on_dispatch)
            ranks = ray.get(train_refs)
            self.learner_version = ranks[0]["version"]
            following = self.gather(upcoming) if upcoming is not None else None
            record.update(self.sync())  # 5. sync + check
            step += 1
            record.update({
                "step": step, "version": self.learner_version, "loss": sum(r["loss"] for r in ranks),
                "lr_multiplier": rl.rl_lr_multiplier(step - 1, s.num_steps),
                "rollout_tokens": rollouts.tokens, "rollout_s": rollouts.seconds,
                "rollout_wall_s": rollouts.wall_s,
                "rollout_tokens_per_s": rollouts.tokens / max(rollouts.seconds, 1e-9),
                "learner_s": max(r["seconds"] for r in ranks), "actor_restarts": self.restarts,
                "rollout_actors": len(self.actors), "chunks_redispatched": self.redispatched})
            if sum(r.get("tokens", 0) for r in ranks) and s.max_staleness > 0:
                record["clip_frac"] = (sum(r.get("clipped_tokens", 0) for r in ranks)
                                       / sum(r["tokens"] for r in ranks))
            if s.eval_every > 0 and (step % s.eval_every == 0 or step == s.num_steps):
                record.update(self.evaluate())  # 6.
            if s.checkpoint_every > 0 and (step % s.checkpoint_every == 0 or step == s.num_steps):
                record["checkpoint"] = self.checkpoint(step)
            record["step_s"] = time.perf_counter() - t0
            self._record(log, gauges, record)
            if step >= s.num_steps:
                rollouts = None
            else:
                rollouts = (following if following is not None
                            else self.gather(self._launch_step(step, on_dispatch)))
        return self.summary()

    def _record(self, log: Any, gauges: StageMetrics | None, record: dict[str, Any]) -> None:
        record["time"] = time.time()
        log.append(record)
        log.flush()
        self.history.append(record)
        if gauges is not None:
            k = self.spec.eval_samples
            gauges.record({**record, "pass_at_k": record.get(f"pass_at_{k}")},
                          count=record.get("rollout_tokens") or 0)
        parts = [f"rl step {record['step']:>5}/{self.spec.num_steps}"]
        if "reward_mean" in record:
            parts += [f"reward {record['reward_mean']:.3f}", f"loss {record['loss']:+.4f}",
                      f"{record['rollout_tokens_per_s']:,.0f} tok/s", f"sync {record['sync_s']:.3f}s",
                      f"check {record['verify_s']:.3f}s", f"staleness {record['staleness']}"]
        if "pass_at_1" in record:
            parts.append(f"pass@1 {record['pass_at_1']:.3f}")
        print(" | ".join(parts), flush=True)

    def summary(self) -> dict[str, Any]:
        steps = [r for r in self.history if "reward_mean" in r]
        evals = [r for r in self.history if "pass_at_1" in r]
        out: dict[str, Any] = {"final_step": steps[-1]["step"] if steps else self.start_step,
                               "version": self.learner_version, "actor_restarts": self.restarts,
                               "rollout_actors_lost": self.fleet.dropped if self.fleet is not None else 0}
        if steps:
            out.update(reward_mean_first=steps[0]["reward_mean"], reward_mean_last=steps[-1]["reward_mean"],
                       rollout_tokens_per_s=sum(r["rollout_tokens_per_s"] for r in steps) / len(steps),
                       sync_s=sum(r["sync_s"] for r in steps) / len(steps),
                       verify_s=sum(r["verify_s"] for r in steps) / len(steps))
        if evals:
            out.update({k: v for k, v in evals[-1].items() if k.startswith("pass_at_")})
            out.update(eval_reward_first=evals[0]["eval_reward_mean"],
                       eval_reward_last=evals[-1]["eval_reward_mean"],
                       eval_prompts=len(self.eval_rewards[-1]) if self.eval_rewards else 0)
        # same prompts first and last: the paired change and its standard error
        if len(self.eval_rewards) >= 2:
            first, last = self.eval_rewards[0], self.eval_rewards[-1]
            diffs = [b - a for a, b in zip(first, last, strict=True)]
            se = rl.standard_error(diffs)
            out.update(eval_reward_change=sum(diffs) / len(diffs), eval_reward_change_se=se)
        return out

    def export(self, meta: dict[str, Any]) -> str:
        """The final weights and the tokenizer at {run}/rl/model/ (config.json last)."""
        dest = f"{self.storage.stage_uri(STAGE)}/model"
        ray.get(self.learners[0].export.remote(dest, self.tokenizer_uri, meta))
        return dest

    def close(self) -> None:
        """Kill every actor this run started."""
        if self.fleet is not None:
            self.fleet.close()
        for actor in self.learners:
            ray.kill(actor)
        self.learners = []
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    def __enter__(self) -> RLRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
