"""GRPO on a Ray cluster: rollout actors (model copy + KV-cache engine + sandboxed Python tool), a
learner actor group, and one driver loop with verified weight sync. Used by jobs/rl.py.

    run = RLRun(spec, storage, model_uri=".../sft/model", tokenizer_uri=None)   # after ray.init()
    run.start()            # sandbox pool, learners (load SFT or resume), rollout actors, first sync
    summary = run.run()    # the loop below; checkpoints, metrics.jsonl, Ray metrics
    run.export(meta)       # {run}/rl/model/ with the tokenizer, config.json last
    run.close()

One driver step (numbered as the Ray calls happen):
  1. prompts of the step (a seeded shuffle of the task, so a resume picks up the same ones) are cut
     into one contiguous chunk per rollout actor: `RolloutWorker.rollout` samples G completions per
     prompt with the engine (tool calls run on the SandboxPool) and scores them with the task;
  2. a rollout actor that dies is replaced (a fresh actor loads the learner's weights) and its chunk
     is re-issued; the step completes. Each sample records the weights version that made it;
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

Why an actor group and not TorchTrainer for the learner: the driver must call the learner between
rollouts and syncs every step (train, give weights, checksum, probe, broadcast), which is a method
call on an actor; a TorchTrainer runs its own loop and would need a side channel for each of these.
The learner ranks still form a torch.distributed group (gloo/NCCL) for the sharded optimizers.

Tests: `python -m pytest tests/test_rl_cluster.py` (local cluster); benchmark: benchmarks/rl_throughput.py.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs
import ray
import torch
import torch.distributed as torch_dist
from ray.util.metrics import Counter, Gauge

from cluster.eval_pool import localize
from cluster.sandbox_pool import SandboxPool
from cluster.storage import RunStorage
from nanochat import checkpoint as ckpt
from nanochat import rl
from nanochat.common import DistInfo, autocast_context, compute_dtype
from nanochat.engine import Engine, SamplingParams, ToolUse
from nanochat.errors import ConfigError
from nanochat.gpt import GPT, GPTConfig
from nanochat.tasks import GSM8K, Task, training_mixture
from nanochat.tasks.sources import hub_reachable
from nanochat.tokenizer import Tokenizer

STAGE = "rl"
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


class WeightSyncError(RuntimeError):
    """A rollout actor's weights differ from the learner's after a sync: the run must stop."""


@dataclass(frozen=True)
class RLSpec:
    """Plain settings of an RL run (jobs/rl.py fills them from RLConfig; see its field descriptions)."""

    num_steps: int
    task: str = "gsm8k"  # "gsm8k" (training_mixture("rl") / held-out GSM8K) or "toy" (nanochat/rl_toy.py)
    offline: bool | None = None
    examples_per_step: int = 16
    group_size: int = 16
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    max_seq_len: int | None = None  # engine context; None: the model's sequence_len
    device_batch_size: int = 8
    unembedding_lr: float = 0.004
    embedding_lr: float = 0.2
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    init_lr_frac: float = 0.05
    normalize_std: bool = False
    max_staleness: int = 0
    clip_eps: float = 0.2
    advantage_sign: float = 1.0
    num_rollout_actors: int = 2
    rollout_cpus: float = 0.5
    rollout_gpus: float = 0.0
    rollout_slots: int = 0  # engine KV-cache rows per actor; 0: 2 x group_size
    num_learners: int = 1
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    sandbox_actors: int = 1  # 0: no Python tool
    sandbox_cpus: float = 0.25
    weight_sync: Literal["auto", "object_store", "broadcast"] = "auto"
    probe_atol: float = 1e-3
    max_actor_restarts: int = 3
    eval_every: int = 0
    eval_examples: int = 16
    eval_samples: int = 4
    checkpoint_every: int = 0
    checkpoints_to_keep: int = 2
    seed: int = 42

    @property
    def sync_method(self) -> str:
        if self.weight_sync != "auto":
            return self.weight_sync
        return "broadcast" if self.learner_gpus > 0 and self.rollout_gpus > 0 else "object_store"

    def loss_config(self) -> rl.GRPOConfig:
        return rl.GRPOConfig(self.normalize_std, self.clip_eps if self.max_staleness > 0 else None,
                             self.advantage_sign)


def make_task(kind: str, split: Literal["train", "eval"], offline: bool | None) -> Task:
    """The RL training task or its held-out evaluation task (as nanochat.tasks.eval_tasks defines it)."""
    if kind == "toy":
        from nanochat.rl_toy import EndLetter

        return EndLetter(size=4096 if split == "train" else 256, split="train" if split == "train" else "heldout")
    if kind != "gsm8k":
        raise ConfigError(f"unknown RL task {kind!r}: use 'gsm8k' or 'toy'")
    offline = not hub_reachable() if offline is None else offline
    if split == "train":
        return training_mixture("rl", offline)
    return GSM8K("test", subset="heldout" if offline else "all", source="pack" if offline else "hub")


def _threads(cpus: float) -> int:
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n


def _device(gpus: float) -> str:
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _SyncGroup:
    """A torch process group outside the default one: rank 0 = learner rank 0, rank i = actor i - 1."""

    def __init__(self, host: str, port: int, rank: int, world: int, generation: int, device: str) -> None:
        store = torch_dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=120),
                                    wait_for_workers=False)
        prefixed = torch_dist.PrefixStore(f"sync/{generation}/", store)
        if device.startswith("cuda"):  # untested on GPUs here: written for NCCL clusters
            self.pg = torch_dist.ProcessGroupNCCL(prefixed, rank, world)
        else:
            self.pg = torch_dist.ProcessGroupGloo(prefixed, rank, world, datetime.timedelta(seconds=300))
        self.store = store

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Every tensor from rank 0 into the same-shaped tensors of the other ranks, in place."""
        opts = torch_dist.BroadcastOptions()
        opts.rootRank = 0
        for t in tensors:
            self.pg.broadcast([t], opts).wait()
        # the collective wrote the storage behind PyTorch's back: bump the version counters, which
        # is how caches keyed on them (the CPU prepacked weights of nanochat/gpt.py) see the change
        torch.autograd.graph.increment_version(tensors)


class _WeightsHolder:
    """What learner and rollout actors share: a model, its version, checksums, probe, sync group."""

    model: GPT
    version: int
    device: str
    sync_group: _SyncGroup | None = None

    def checksums(self) -> tuple[int, dict[str, rl.Checksum]]:
        return self.version, rl.state_checksums(self.model.state_dict())

    def probe(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, torch.Tensor]:
        return self.version, rl.probe_logprobs(self.model, inputs, targets)

    def join_sync_group(self, host: str, port: int, rank: int, world: int, generation: int) -> None:
        self.sync_group = _SyncGroup(host, port, rank, world, generation, self.device)

    def broadcast_weights(self, version: int) -> int:
        """Broadcast sync, the same call on every member: rank 0 (the learner) sends each tensor,
        the actors receive it in place and take `version`."""
        if self.sync_group is None:
            raise WeightSyncError("broadcast_weights before join_sync_group")
        with torch.no_grad():
            self.sync_group.broadcast(list(self.model.state_dict().values()))
        self.version = version
        return version


class RolloutWorker(_WeightsHolder):
    """A model copy with the engine (wrapped by ray.remote in RLRun); weights arrive by sync."""

    def __init__(self, model_config: dict[str, Any], tokenizer_uri: str, spec: RLSpec, tool: SandboxPool | None) -> None:
        self.threads = _threads(spec.rollout_cpus)
        self.device = _device(spec.rollout_gpus)
        with torch.device("meta"):
            self.model = GPT(GPTConfig(**model_config))
        self.model.to_empty(device=self.device)
        self.model.init_weights()  # rotary tables; the weights come with the first sync
        self.model.eval()
        self.version = -1  # no weights yet
        self.spec = spec
        self.tokenizer = Tokenizer.load(localize(tokenizer_uri))
        self.tasks = {split: make_task(spec.task, split, spec.offline) for split in ("train", "eval")}
        self.stops = tuple(self.tokenizer.encode_special(s) for s in STOP_TOKENS)
        tool_use = None
        if tool is not None:
            sp = self.tokenizer.encode_special
            tool_use = ToolUse(tool.tool(), self.tokenizer.encode, self.tokenizer.decode, sp("<|python_start|>"),
                               sp("<|python_end|>"), sp("<|output_start|>"), sp("<|output_end|>"))
        self.engine = Engine(self.model, max_batch_size=spec.rollout_slots or 2 * spec.group_size,
                             max_seq_len=spec.max_seq_len, tool_use=tool_use, dtype=compute_dtype(self.device))

    def load_weights(self, payload: dict[str, Any]) -> int:
        """Object-store sync: {"version", "state"} from the learner."""
        self.model.load_state_dict(payload["state"])
        self.version = int(payload["version"])
        self.engine.set_weights_version(self.version)  # the engine reuses nothing computed before
        return self.version

    def broadcast_weights(self, version: int) -> int:
        """As _WeightsHolder.broadcast_weights, and the engine's weights version follows."""
        self.engine.set_weights_version(super().broadcast_weights(version))
        return version

    def rollout(self, split: Literal["train", "eval"], items: list[int], seed: int, n: int) -> dict[str, Any]:
        """n samples of each task item (item i sampled with seed + its position), scored by the task."""
        if self.version < 0:
            raise WeightSyncError("rollout asked of an actor that never received weights")
        task = self.tasks[split]
        convs = [task.get(i) for i in items]
        prompts = [self.tokenizer.render_for_completion(c) for c in convs]
        params = SamplingParams(max_new_tokens=self.spec.max_new_tokens, temperature=self.spec.temperature,
                                top_k=self.spec.top_k, seed=seed, n=n, stop_token_ids=self.stops, logprobs=True)
        t0 = time.perf_counter()
        with autocast_context(self.device):
            gens = self.engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
        groups = []
        for p, (conv, prompt) in enumerate(zip(convs, prompts, strict=True)):
            group = []
            for g in gens[p * n : (p + 1) * n]:
                answer = g.tokens[:-1] if g.finish_reason == "stop" else g.tokens
                reward = task.reward(conv, self.tokenizer.decode(answer))
                group.append(rl.Sample(prompt, g.tokens, g.mask, g.logprobs, reward, self.version))
            groups.append(group)
        return {"groups": groups, "tokens": sum(len(g.tokens) for g in gens), "seconds": seconds,
                "version": self.version, "pid": os.getpid()}


class LearnerWorker(_WeightsHolder):
    """One rank of the learner (wrapped by ray.remote in RLRun): model, sharded optimizers, checkpoints."""

    def __init__(self, rank: int, world: int, spec: RLSpec) -> None:
        self.rank, self.world, self.spec = rank, world, spec
        self.threads = _threads(spec.learner_cpus)
        self.device = _device(spec.learner_gpus)
        if self.device == "cuda":
            torch.cuda.set_device(0)
        self.version = 0
        self._store: torch_dist.TCPStore | None = None

    def address(self) -> tuple[str, int]:
        """An address and free port on this actor's node (rank 0 hosts the rendezvous)."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, model_uri: str, master: tuple[str, int]) -> dict[str, Any]:
        """Join the learner process group (world > 1) and load the starting model."""
        if self.world > 1:
            backend = "nccl" if self.device == "cuda" else "gloo"
            torch_dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
                                          world_size=self.world, timeout=datetime.timedelta(minutes=10))
        self.dist = DistInfo(self.rank, self.world, 0, self.device)
        self.model, _ = ckpt.load_model(localize(model_uri), self.device)
        self.model.train()
        s = self.spec
        self.optimizers = self.model.setup_optimizers(unembedding_lr=s.unembedding_lr, embedding_lr=s.embedding_lr,
                                                      matrix_lr=s.matrix_lr, weight_decay=s.weight_decay, dist=self.dist)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = group["initial_lr"] * s.init_lr_frac
        return {"model_config": asdict(self.model.config)}

    def restore(self, checkpoint_uri: str) -> dict[str, Any]:
        """Load weights and this rank's optimizer state (re-sharded) from an RL checkpoint."""
        state = ckpt.load_training_checkpoint(localize(checkpoint_uri), self.model, self.optimizers, self.dist)
        self.version = int(state.loop.get("version", state.step))
        return {"step": state.step, "version": self.version, "loop": state.loop}

    def train_step(self, batch: rl.TrainBatch, step: int) -> dict[str, float]:
        """One optimizer step on this rank's shard of the step's batch; the weights become version + 1."""
        t0 = time.perf_counter()
        stats = rl.policy_gradient_step(
            self.model, self.optimizers, batch.shard(self.rank, self.world), self.spec.loss_config(), self.dist,
            total_tokens=batch.num_tokens, micro_batch_size=self.spec.device_batch_size,
            lr_multiplier=rl.rl_lr_multiplier(step, self.spec.num_steps))
        self.version += 1
        return {**stats, "version": self.version, "seconds": time.perf_counter() - t0}

    def weights(self) -> dict[str, Any]:
        """{"version", "state"}: the weights as CPU tensors, for the object store."""
        return {"version": self.version, "state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def open_sync_store(self) -> tuple[str, int]:
        """Host the rendezvous store of the broadcast group (rank 0); returns its address."""
        if self._store is None:
            host, port = self.address()
            self._store = torch_dist.TCPStore(host, port, None, True, timeout=datetime.timedelta(seconds=120),
                                              wait_for_workers=False)
            self._store_addr = (host, port)
        return self._store_addr

    def save_checkpoint(self, dest_uri: str, step: int, loop: dict[str, Any]) -> None:
        """Write this rank's files of the checkpoint of `step` to dest_uri (state.json last, rank 0)."""
        with tempfile.TemporaryDirectory(prefix="nanochat-rl-ckpt-") as tmp:
            ckpt.save_training_checkpoint(tmp, self.model, self.optimizers, self.dist, step=step,
                                          data={"step": step}, loop={**loop, "version": self.version})
            _upload_dir(tmp, dest_uri, last=ckpt.STATE_FILE)

    def export(self, dest_uri: str, tokenizer_uri: str, meta: dict[str, Any]) -> None:
        """The final model with its tokenizer at dest_uri, config.json last."""
        with tempfile.TemporaryDirectory(prefix="nanochat-rl-model-") as tmp:
            ckpt.save_model(tmp, self.model, meta)
            shutil.copytree(localize(tokenizer_uri), Path(tmp) / ckpt.TOKENIZER_DIR)
            _upload_dir(tmp, dest_uri, last=ckpt.CONFIG_FILE)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri.removeprefix("file://")


def _upload_dir(local: str, dest_uri: str, last: str) -> None:
    """Copy a local directory's files to dest_uri, the file named `last` after all others."""
    fs, dest = _filesystem(dest_uri)
    fs.create_dir(dest, recursive=True)
    local_fs = pafs.LocalFileSystem()
    for entry in sorted(Path(local).iterdir(), key=lambda p: p.name == last):
        if entry.is_dir():
            fs.create_dir(f"{dest}/{entry.name}", recursive=True)
            pafs.copy_files(str(entry), f"{dest}/{entry.name}", source_filesystem=local_fs, destination_filesystem=fs)
        else:
            tmp = f"{dest}/.{entry.name}.tmp" if isinstance(fs, pafs.LocalFileSystem) else f"{dest}/{entry.name}"
            pafs.copy_files(str(entry), tmp, source_filesystem=local_fs, destination_filesystem=fs)
            if tmp != f"{dest}/{entry.name}":
                fs.move(tmp, f"{dest}/{entry.name}")


def latest_checkpoint(storage: RunStorage) -> tuple[int, str] | None:
    """(step, URI) of the newest complete RL checkpoint of the run, if any."""
    root = f"{storage.stage_path(STAGE)}/checkpoints"
    if not storage.exists(root):
        return None
    infos = storage.fs.get_file_info(pafs.FileSelector(root, recursive=False))
    for d in sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                     and i.base_name.startswith("step_")), reverse=True):
        path = f"{root}/{d}"
        if not storage.exists(f"{path}/{ckpt.STATE_FILE}"):
            continue
        with storage.fs.open_input_stream(f"{path}/{ckpt.STATE_FILE}") as f:
            state = json.loads(f.read().decode())
        files = [ckpt.MODEL_FILE] + [fn(r) for r in range(int(state["world_size"])) for fn in (ckpt.optim_file, ckpt.data_file)]
        if all(storage.exists(f"{path}/{name}") for name in files):
            return int(state["step"]), f"{storage.stage_uri(STAGE)}/checkpoints/{d}"
    return None


class RLMetrics:
    """Ray Gauges of the last step (ray_nanochat_rl_*{run=...}) and a Counter of rollout tokens."""

    GAUGES = {"step": "RL steps completed", "reward_mean": "mean reward of the step's rollouts",
              "pass_at_1": "pass@1 on held-out problems at the last evaluation",
              "pass_at_k": "pass@k (k = eval_samples) on held-out problems at the last evaluation",
              "rollout_tokens_per_s": "generated tokens per second over all rollout actors",
              "sync_s": "seconds of the weight sync", "verify_s": "seconds of the sync check",
              "staleness": "largest version gap between learner and a trained rollout",
              "actor_restarts": "rollout actors replaced so far"}

    def __init__(self, run: str) -> None:
        self.gauges = {}
        for key, text in self.GAUGES.items():
            self.gauges[key] = Gauge(f"nanochat_rl_{key}", description=text, tag_keys=("run",))
            self.gauges[key].set_default_tags({"run": run})
        self.tokens = Counter("nanochat_rl_rollout_tokens_total", description="tokens generated by rollouts",
                              tag_keys=("run",))
        self.tokens.set_default_tags({"run": run})

    def record(self, metrics: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            if isinstance(metrics.get(key), int | float):
                gauge.set(float(metrics[key]))
        if metrics.get("rollout_tokens"):
            self.tokens.inc(float(metrics["rollout_tokens"]))


@dataclass
class _Pending:
    """Rollout calls in flight: ref -> (actor slot, task items, position of the first item, seed)."""

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
        self.actors: list[Any] = []
        self.learner_version = self.actor_version = 0
        self.start_step = self.restarts = self.generation = 0
        self.regroup = False
        self.history: list[dict[str, Any]] = []
        self.eval_rewards: list[list[float]] = []  # per evaluation: the mean reward of each held-out prompt

    # ---- setup ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Sandbox pool, learners (SFT weights or the latest checkpoint), rollout actors, first sync."""
        s = self.spec
        if s.sandbox_actors > 0:
            self.sandbox = SandboxPool(s.sandbox_actors, s.sandbox_cpus)
            self.sandbox.ready()
        learner = ray.remote(LearnerWorker).options(num_cpus=s.learner_cpus, num_gpus=s.learner_gpus)
        self.learners = [learner.remote(r, s.num_learners, s) for r in range(s.num_learners)]  # 1. learners
        master = ray.get(self.learners[0].address.remote())
        info = ray.get([w.setup.remote(self.model_uri, master) for w in self.learners])[0]
        self.model_config = info["model_config"]
        found = latest_checkpoint(self.storage)
        if found is not None:
            restored = ray.get([w.restore.remote(found[1]) for w in self.learners])[0]
            self.start_step, self.learner_version = restored["step"], restored["version"]
            self.restarts = int(restored["loop"].get("actor_restarts", 0))
            print(f"rl: resuming from step {self.start_step} (weights version {self.learner_version})", flush=True)
        self._rollout_cls = ray.remote(RolloutWorker).options(num_cpus=s.rollout_cpus, num_gpus=s.rollout_gpus)
        self.actors = [self._new_actor() for _ in range(s.num_rollout_actors)]  # 2. rollout actors
        self._prepare_items()
        self.probe = rl.probe_batch(self.model_config["vocab_size"], rows=4,
                                    length=min(32, self.model_config["sequence_len"]))
        if s.sync_method == "broadcast":
            self.store_addr = ray.get(self.learners[0].open_sync_store.remote())
            self.regroup = True
        self.sync()  # 3. first sync + check

    def _new_actor(self) -> Any:
        return self._rollout_cls.remote(self.model_config, self.tokenizer_uri, self.spec, self.sandbox)

    def _prepare_items(self) -> None:
        """Items whose prompt fits the engine's context, for training and held-out evaluation."""
        tokenizer = Tokenizer.load(localize(self.tokenizer_uri))
        context = self.spec.max_seq_len or self.model_config["sequence_len"]
        self.items: dict[str, list[int]] = {}
        for split in ("train", "eval"):
            task = make_task(self.spec.task, split, self.spec.offline)
            limit = len(task) if split == "train" else min(len(task), self.spec.eval_examples)
            fits = [i for i in range(len(task)) if len(tokenizer.render_for_completion(task.get(i))) < context]
            if not fits:
                raise ConfigError(f"no prompt of {task.describe()} fits the engine context of {context} tokens; "
                                 "raise max_seq_len")
            self.items[split] = fits[:limit]
            if len(fits) < len(task) and split == "train":
                print(f"rl: {len(task) - len(fits)} of {len(task)} prompts of {task.describe()} are longer than "
                      f"the context ({context} tokens) and are skipped", flush=True)

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
        for slot, (a, b) in enumerate(_chunks(len(items), len(self.actors))):
            if b > a:
                ref = self.actors[slot].rollout.remote(split, items[a:b], seed + a, n)
                pending.calls[ref] = (slot, items[a:b], a, seed + a)
        return pending

    def gather(self, pending: _Pending) -> _Rollouts:
        """Wait for every chunk; a chunk whose actor died goes to its replacement."""
        done: dict[int, dict[str, Any]] = {}
        while pending.calls:
            ready, _ = ray.wait(list(pending.calls), num_returns=1)
            slot, items, start, seed = pending.calls.pop(ready[0])
            try:
                done[start] = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self._replace(slot, f"it died during rollouts ({type(e).__name__})")
                ref = self.actors[slot].rollout.remote(pending.split, items, seed, pending.n)
                pending.calls[ref] = (slot, items, start, seed)
        outs = [done[k] for k in sorted(done)]
        return _Rollouts([g for o in outs for g in o["groups"]], sum(o["tokens"] for o in outs),
                         max(o["seconds"] for o in outs), time.perf_counter() - pending.started)

    def _launch_step(self, step: int, on_dispatch: Callable[[int, list[Any]], None] | None) -> _Pending:
        pending = self.launch("train", self.step_items(step), self.spec.seed * 7919 + step * 100_003,
                              self.spec.group_size)
        if on_dispatch is not None:
            on_dispatch(step, list(self.actors))
        return pending

    def _replace(self, slot: int, why: str) -> None:
        """A fresh actor in `slot` with the learner's current weights, checked like any sync."""
        self.restarts += 1
        if self.restarts > self.spec.max_actor_restarts:
            raise RuntimeError(f"rollout actor {slot} failed: {why}; {self.restarts} replacements exceed "
                               f"max_actor_restarts = {self.spec.max_actor_restarts}: look at the actors' logs "
                               "(out of memory? a crashing node?) or raise the limit")
        print(f"rl: replacing rollout actor {slot}: {why}", flush=True)
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()
        ray.get(self.actors[slot].load_weights.remote(self.learners[0].weights.remote()))
        self.regroup = self.spec.sync_method == "broadcast"
        self.verify_sync([slot])

    # ---- weight sync -----------------------------------------------------------------------------

    def sync(self) -> dict[str, float]:
        """Learner weights -> every rollout actor (object store or broadcast), then check them."""
        t0 = time.perf_counter()
        if self.spec.sync_method == "object_store":
            payload = self.learners[0].weights.remote()
            refs = [a.load_weights.remote(payload) for a in self.actors]
            for slot, ref in enumerate(refs):
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._replace(slot, f"it died during the weight sync ({type(e).__name__})")
        else:
            if self.regroup:
                self._regroup()
            ray.get([m.broadcast_weights.remote(self.learner_version) for m in [self.learners[0], *self.actors]])
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

    def verify_sync(self, slots: list[int] | None = None) -> dict[str, float]:
        """Check rollout actors against the learner: same version, identical per-tensor checksums,
        probe log-probs within probe_atol. Raises WeightSyncError naming the actor and tensors."""
        t0 = time.perf_counter()
        version, want = ray.get(self.learners[0].checksums.remote())
        _, reference = ray.get(self.learners[0].probe.remote(*self.probe))
        slots = list(range(len(self.actors))) if slots is None else slots
        refs = {i: (self.actors[i].checksums.remote(), self.actors[i].probe.remote(*self.probe)) for i in slots}
        worst = 0.0
        for slot, pair in refs.items():
            try:
                (got_version, got), (_, logp) = ray.get(list(pair))
            except ray.exceptions.RayActorError as e:
                self._replace(slot, f"it died during the sync check ({type(e).__name__})")  # checks its successor
                continue
            where = f"rollout actor {slot} (weights version {got_version}, learner version {version})"
            if got_version != version:
                raise WeightSyncError(f"weight sync check failed: {where} did not receive the learner's weights; "
                                      "the run stops rather than train on rollouts of another policy")
            problems = rl.checksum_mismatches(want, got)
            if problems:
                raise WeightSyncError(
                    f"weight sync check failed: {where} differs from the learner in {len(problems)} of "
                    f"{len(want)} tensors although it reports the same version: {'; '.join(problems[:3])}. "
                    f"Its rollouts would train the learner on another policy, so the run stops. The sync path "
                    f"({self.spec.sync_method}) delivered different bits: check for dtype casts, partial loads "
                    "or a tensor written after the sync")
            gap = rl.logprob_gap(reference, logp)
            if gap > self.spec.probe_atol:
                raise WeightSyncError(
                    f"weight sync check failed: {where} has identical checksums but its probe log-probs differ "
                    f"from the learner's by {gap:.3g} > probe_atol {self.spec.probe_atol}: the two forward passes "
                    "differ (device, dtype or code version); fix that or raise probe_atol if the gap is expected")
            worst = max(worst, gap)
        return {"verify_s": time.perf_counter() - t0, "probe_gap": worst}

    # ---- learning, evaluation, checkpoints --------------------------------------------------------

    def learn(self, rollouts: _Rollouts, step: int) -> tuple[list[Any], dict[str, Any]]:
        """Start one learner step on the rollouts (returns the refs of every rank) and batch stats."""
        versions = [x.version for g in rollouts.groups for x in g]
        staleness = rl.check_staleness(self.learner_version, versions, self.spec.max_staleness)
        batch = rl.pack_batch(rollouts.groups, self.spec.loss_config())
        batch_ref = ray.put(batch)
        refs = [w.train_step.remote(batch_ref, step) for w in self.learners]
        rewards = [x.reward for g in rollouts.groups for x in g]
        flat = [g for g in rollouts.groups if len({x.reward for x in g}) == 1]
        return refs, {"reward_mean": sum(rewards) / len(rewards), "staleness": staleness, "samples": len(rewards),
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
        dest = f"{self.storage.stage_uri(STAGE)}/checkpoints/step_{step:06d}"
        loop = {"actor_restarts": self.restarts}
        ray.get([w.save_checkpoint.remote(dest, step, loop) for w in self.learners[1:]])
        ray.get(self.learners[0].save_checkpoint.remote(dest, step, loop))
        root = f"{self.storage.stage_path(STAGE)}/checkpoints"
        infos = self.storage.fs.get_file_info(pafs.FileSelector(root, recursive=False))
        names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("step_"))
        for old in names[: -self.spec.checkpoints_to_keep]:
            self.storage.fs.delete_dir(f"{root}/{old}")
        return dest

    # ---- the loop --------------------------------------------------------------------------------

    def run(self, on_dispatch: Callable[[int, list[Any]], None] | None = None) -> dict[str, Any]:
        """Steps start_step..num_steps-1; on_dispatch(step, actors) is called once a step's rollouts
        are in flight (tests use it to kill an actor mid-step). Returns a summary."""
        s = self.spec
        log = self.storage.metrics(STAGE)
        gauges = RLMetrics(self.storage.run) if self.ray_metrics else None
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
                "lr_multiplier": rl.rl_lr_multiplier(step - 1, s.num_steps), "rollout_tokens": rollouts.tokens,
                "rollout_s": rollouts.seconds, "rollout_wall_s": rollouts.wall_s, "rollout_tokens_per_s": rollouts.tokens / max(rollouts.seconds, 1e-9),
                "learner_s": max(r["seconds"] for r in ranks), "actor_restarts": self.restarts})
            if sum(r.get("tokens", 0) for r in ranks) and s.max_staleness > 0:
                record["clip_frac"] = sum(r.get("clipped_tokens", 0) for r in ranks) / sum(r["tokens"] for r in ranks)
            if s.eval_every > 0 and (step % s.eval_every == 0 or step == s.num_steps):
                record.update(self.evaluate())  # 6.
            if s.checkpoint_every > 0 and (step % s.checkpoint_every == 0 or step == s.num_steps):
                record["checkpoint"] = self.checkpoint(step)
            record["step_s"] = time.perf_counter() - t0
            self._record(log, gauges, record)
            if step >= s.num_steps:
                rollouts = None
            else:
                rollouts = following if following is not None else self.gather(self._launch_step(step, on_dispatch))
        return self.summary()

    def _record(self, log: Any, gauges: RLMetrics | None, record: dict[str, Any]) -> None:
        record["time"] = time.time()
        log.append(record)
        log.flush()
        self.history.append(record)
        if gauges is not None:
            k = self.spec.eval_samples
            gauges.record({**record, "pass_at_k": record.get(f"pass_at_{k}")})
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
                               "version": self.learner_version, "actor_restarts": self.restarts}
        if steps:
            out.update(reward_mean_first=steps[0]["reward_mean"], reward_mean_last=steps[-1]["reward_mean"],
                       rollout_tokens_per_s=sum(r["rollout_tokens_per_s"] for r in steps) / len(steps),
                       sync_s=sum(r["sync_s"] for r in steps) / len(steps),
                       verify_s=sum(r["verify_s"] for r in steps) / len(steps))
        if evals:
            out.update({k: v for k, v in evals[-1].items() if k.startswith("pass_at_")})
            out.update(eval_reward_first=evals[0]["eval_reward_mean"], eval_reward_last=evals[-1]["eval_reward_mean"],
                       eval_prompts=len(self.eval_rewards[-1]) if self.eval_rewards else 0)
        if len(self.eval_rewards) >= 2:  # same prompts first and last: the paired change and its standard error
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
        for actor in self.actors + self.learners:
            ray.kill(actor)
        self.actors, self.learners = [], []
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    def __enter__(self) -> RLRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
