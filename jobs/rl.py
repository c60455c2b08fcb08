"""Stage `rl`: GRPO from the SFT model on the cluster (rollout actors + learner + verified sync)
into {run}/rl/.

    python -m jobs.rl --preset micro --run R [--storage S] [--set group_size=8 ...] [--force]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python -m jobs.rl --preset tiny --run demo

Reads the exported SFT model `{run}/sft/model/` (or `model_dir=`) with the tokenizer beside it (else
`{run}/tokenizer/`). Writes checkpoints `{run}/rl/checkpoint_NNNNNNN/` (runs from before this name
kept them in `{run}/rl/checkpoints/step_N/`; those still resume), `{run}/rl/metrics.jsonl` (reward,
pass@k, rollout tokens/s, sync and check times, staleness), the exported model `{run}/rl/model/`
and `meta.json` last. Relaunching an incomplete run resumes from its latest
checkpoint; a complete run is skipped unless --force (which starts over).

Refused before any work, with a message that says what to change: a group size of 1 (every
advantage would be zero), a missing SFT model, and more rollout actors / learners than the
cluster can ever place (cluster/resources.py, counting the autoscaler's node types if known).
The algorithm and its defaults are the seed's (nanochat/rl.py); the cluster side is cluster/rl.py.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import ray
from pydantic import Field, model_validator

from cluster.artifacts import clear_stage, find_model
from cluster.resources import ClusterDescription, Demand, check_placeable, describe_cluster
from cluster.rl import STAGE, RLRun
from cluster.specs import RLSpec
from cluster.storage import RunStorage
from jobs.config import OptimizerSettings, load_stage_config, stage_argparser
from nanochat.errors import entrypoint
from nanochat.tasks import rl_task
from nanochat.tasks.sources import hub_reachable


class RLConfig(OptimizerSettings):
    """The `rl:` section of a preset (defaults: the seed's chat_rl)."""

    model_dir: str | None = Field(None, description="exported model to start from (dir or URI); default "
                                                    "{run}/sft/model")
    task: Literal["gsm8k", "toy"] = Field(
        "gsm8k", description="gsm8k: the seed's GSM8K RL (offline: the contaminated demo half of its test "
                             "set); toy: end-letter task of nanochat/tasks/end_letter.py")
    offline: bool | None = Field(None, description="GSM8K from the embedded pack (true) or the hub (false); "
                                                   "null: the hub when reachable")
    num_epochs: int = Field(1, ge=1,
                            description="passes over the training prompts (used when num_steps <= 0)")
    num_steps: int = Field(-1, description="RL steps if > 0, else num_epochs x prompts / examples_per_step")
    examples_per_step: int = Field(16, ge=1, description="prompts per step")
    group_size: int = Field(16, description="samples per prompt (G); advantages are relative to the group")
    max_new_tokens: int = Field(256, ge=1, description="tokens generated per sample, tool output included")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of rollouts and pass@k samples")
    top_k: int = Field(50, ge=0, description="sample from the k most likely tokens (0: all)")
    max_seq_len: int | None = Field(None, ge=2, description="engine context (prompt + completion); "
                                                           "null: the model's training sequence length; "
                                                           "prompts that do not fit are skipped")
    device_batch_size: int = Field(8, ge=1, description="sequences per learner forward/backward")
    init_lr_frac: float = Field(0.05, gt=0,
                                description="every lr is multiplied by this, then decays linearly to 0")
    normalize_std: bool = Field(False,
                                description="divide advantages by the group's reward std (the seed: no)")
    max_staleness: int = Field(0, ge=0, le=1, description="0: on-policy; 1: one-step-off-policy overlap "
                                                          "(actors sample step t+1 while the learner trains "
                                                          "step t)")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip used when max_staleness = 1")
    num_rollout_actors: int = Field(2, ge=1,
                                    description="rollout actors, each with a model copy and the engine")
    rollout_cpus: float = Field(1.0, gt=0, description="CPUs per rollout actor (fractions allowed); "
                                                       "torch threads = whole CPUs (>= 1)")
    rollout_gpus: float | None = Field(None, ge=0, description="GPUs per rollout actor; null: 1 when the "
                                                               "cluster has GPUs, else 0")
    rollout_slots: int = Field(0, ge=0, description="engine KV-cache rows per actor; 0: 2 x group_size")
    rollout_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each rollout actor also requires, to keep "
                                          "them on hosts of one kind: e.g. {rollout_host: 1} where "
                                          "cluster.yaml's rollout node type declares resources: "
                                          "{rollout_host: 4} (or `ray start --resources`); {}: any node")
    num_learners: int = Field(1, ge=1,
                              description="learner ranks (torch.distributed group, sharded optimizers)")
    learner_cpus: float = Field(1.0, gt=0, description="CPUs per learner rank")
    learner_gpus: float | None = Field(None, ge=0, description="GPUs per learner rank; null: 1 when the "
                                                               "cluster has GPUs, else 0")
    learner_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each learner rank also requires (as "
                                          "rollout_resources), e.g. {learner_host: 1}; {}: any node")
    sandbox_actors: int = Field(1, ge=0, description="sandbox actors running the model's Python tool calls "
                                                     "(0: no tool)")
    sandbox_cpus: float = Field(0.25, ge=0, description="CPUs reserved per sandbox actor")
    weight_sync: Literal["auto", "object_store", "broadcast"] = Field(
        "auto", description="auto: broadcast (NCCL) when learner and actors have GPUs, else the object store")
    probe_atol: float = Field(1e-3, gt=0, description="largest allowed gap of probe log-probs between "
                                                      "learner and an actor after a sync")
    max_actor_restarts: int = Field(3, ge=0,
                                    description="rollout actors that may die and be replaced in one run")
    replace_wait_s: float = Field(
        60.0, ge=0, description="seconds a dead rollout actor's replacement may take to be placed and "
                                "started; past it the step completes on the remaining actors and the "
                                "replacement joins at a later weight sync once Ray places it")
    eval_every: int = Field(60, description="steps between pass@k evaluations on held-out problems "
                                            "(<= 0: never)")
    eval_examples: int = Field(400, ge=1, description="held-out problems per evaluation")
    eval_samples: int = Field(8, ge=1,
                              description="samples per held-out problem: pass@1..pass@k with k = this")
    checkpoint_every: int = Field(60, description="steps between checkpoints (<= 0: the end only)")
    checkpoints_to_keep: int = Field(2, ge=1, description="most recent checkpoints kept")
    seed: int = Field(42, description="seed of the prompt order and of the sampling")

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.group_size < 2:
            raise ValueError(f"group_size {self.group_size}: the advantage is the reward minus its group's "
                             "mean, so with one sample per prompt every advantage is 0 and nothing is "
                             "learned; use group_size >= 2 (the seed uses 16)")
        if self.rollout_slots and self.rollout_slots < self.group_size:
            raise ValueError(f"rollout_slots {self.rollout_slots} < group_size {self.group_size}: a group is "
                             "sampled in one batch; raise rollout_slots or set it to 0")
        for name, res in (("rollout_resources", self.rollout_resources),
                          ("learner_resources", self.learner_resources)):
            for key, amount in res.items():
                if key in ("CPU", "GPU", "memory", "object_store_memory") or key.startswith("node:"):
                    raise ValueError(f"{name} names {key!r}, which Ray manages itself: use rollout_cpus / "
                                     "rollout_gpus / learner_cpus / learner_gpus, and keep custom resources "
                                     "(e.g. rollout_host) here")
                if not amount > 0:
                    raise ValueError(f"{name}: {key} = {amount}; a required resource amount must be > 0")
        return self

    def to_spec(self, cluster_gpus: float) -> RLSpec:
        """The run's spec, its "auto" values resolved: num_steps from the task's size when not set, offline
        GSM8K when the hub is unreachable (probed once here, not in every actor), a GPU per learner and
        rollout actor when the cluster has GPUs."""
        num_steps = self.num_steps
        if num_steps <= 0:
            prompts = len(rl_task(self.task, "train", self.offline))
            num_steps = max(1, self.num_epochs * prompts // self.examples_per_step)
        offline = (not hub_reachable()) if self.task == "gsm8k" and self.offline is None else self.offline
        gpu = 1.0 if cluster_gpus >= 1 else 0.0
        return RLSpec(
            num_steps=num_steps, task=self.task, offline=offline, examples_per_step=self.examples_per_step,
            group_size=self.group_size, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_k=self.top_k, max_seq_len=self.max_seq_len, device_batch_size=self.device_batch_size,
            lrs=self.learning_rates(), init_lr_frac=self.init_lr_frac, normalize_std=self.normalize_std,
            max_staleness=self.max_staleness, clip_eps=self.clip_eps, advantage_sign=1.0,
            num_rollout_actors=self.num_rollout_actors, rollout_cpus=self.rollout_cpus,
            rollout_gpus=gpu if self.rollout_gpus is None else self.rollout_gpus,
            rollout_slots=self.rollout_slots, rollout_resources=dict(self.rollout_resources),
            num_learners=self.num_learners, learner_cpus=self.learner_cpus,
            learner_gpus=gpu if self.learner_gpus is None else self.learner_gpus,
            learner_resources=dict(self.learner_resources),
            sandbox_actors=self.sandbox_actors, sandbox_cpus=self.sandbox_cpus, weight_sync=self.weight_sync,
            probe_atol=self.probe_atol, max_actor_restarts=self.max_actor_restarts,
            replace_wait_s=self.replace_wait_s,
            eval_every=self.eval_every, eval_examples=self.eval_examples, eval_samples=self.eval_samples,
            checkpoint_every=self.checkpoint_every, checkpoints_to_keep=self.checkpoints_to_keep,
            seed=self.seed)


def cluster_description() -> ClusterDescription:
    """The live nodes of the connected cluster (ray.nodes()) plus the autoscaler's node types, if known."""
    desc = describe_cluster(None)
    desc.nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = {k: float(v) for k, v in node["Resources"].items()
               if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        head = "node:__internal_head__" in node["Resources"]
        desc.nodes.append((("head " if head else "") + node.get("NodeManagerAddress", "?"), res))
        desc.live_workers += 0 if head else 1
    desc.source = "live nodes from ray.nodes()" + (f"; {desc.source}" if desc.node_types else "")
    return desc


def demand(spec: RLSpec) -> Demand:
    """Every actor the stage starts, as resource bundles."""
    def bundle(cpus: float, gpus: float, custom: dict[str, float] | None = None) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **(custom or {})}

    bundles = [bundle(spec.learner_cpus, spec.learner_gpus, spec.learner_resources)] * spec.num_learners
    rollout = bundle(spec.rollout_cpus, spec.rollout_gpus, spec.rollout_resources)
    bundles += [rollout] * spec.num_rollout_actors
    bundles += [bundle(spec.sandbox_cpus, 0.0)] * spec.sandbox_actors
    return Demand(STAGE, tuple(bundles))


def model_inputs(storage: RunStorage, cfg: RLConfig) -> tuple[str, str]:
    """(model URI, tokenizer URI): the run's SFT model or `model_dir`; errors name the stage to run first."""
    ref = find_model(storage, "sft", cfg.model_dir)
    return ref.model, ref.tokenizer


def run_rl(cfg: RLConfig, storage: RunStorage, config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Check the inputs and the cluster, train, export, write meta.json (last)."""
    model_uri, tokenizer_uri = model_inputs(storage, cfg)  # 1. a missing SFT model fails before Ray starts
    if not ray.is_initialized():
        ray.init()
    spec = cfg.to_spec(ray.cluster_resources().get("GPU", 0.0))
    check_placeable(demand(spec), cluster_description())  # 2. before any actor exists
    if force:
        clear_stage(storage, STAGE)
    print(f"rl {storage.run}: {spec.num_steps} steps of {spec.examples_per_step} prompts x "
          f"{spec.group_size} samples on {spec.num_rollout_actors} rollout actors and "
          f"{spec.num_learners} learner(s); sync {spec.sync_method}; from {model_uri}", flush=True)
    with storage.writer(STAGE, config, in_place=True) as writer:
        with RLRun(spec, storage, model_uri=model_uri, tokenizer_uri=tokenizer_uri) as run:  # 3. actors
            with writer.phase("start", "start-up"):
                run.start()
            with writer.phase("train"):
                summary = run.run()  # 4. the loop
            with writer.phase("export", "writing"):
                model = run.export({"stage": STAGE, "step": summary["final_step"], **summary})
        writer.metrics.update(summary)
        writer.extra.update({"model": model, "init_model": model_uri, "tokenizer": tokenizer_uri,
                             "num_steps": spec.num_steps, "sync": spec.sync_method,
                             "task": {"train": rl_task(spec.task, "train", spec.offline).describe(),
                                      "eval": rl_task(spec.task, "eval", spec.offline).describe()}})
        return writer.commit()


@entrypoint
def main(argv: list[str] | None = None) -> int:
    args = stage_argparser("rl", __doc__.split("\n\n")[0]).parse_args(argv)
    cfg = load_stage_config(RLConfig, "rl", args.preset, args.overrides)
    storage = RunStorage(args.run, args.storage)
    if storage.is_complete(STAGE) and not args.force:
        print(f"rl of run {args.run} is complete ({storage.stage_uri(STAGE)}); --force to redo it")
        return 0
    meta = run_rl(cfg, storage, {"preset": args.preset, **cfg.model_dump()}, force=args.force)
    m = meta["metrics"]
    print(f"rl done: step {m['final_step']}, reward {m.get('reward_mean_first', 0):.3f} -> "
          f"{m.get('reward_mean_last', 0):.3f}, pass@1 {m.get('pass_at_1', float('nan')):.3f}, "
          f"model at {meta['model']}")
    if "eval_reward_change" in m:
        print(f"rl held-out reward ({m['eval_prompts']} prompts): {m['eval_reward_first']:.3f} -> "
              f"{m['eval_reward_last']:.3f}, change {m['eval_reward_change']:+.3f} +- "
              f"{m['eval_reward_change_se']:.3f} (standard error)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
