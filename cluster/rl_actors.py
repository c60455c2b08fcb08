"""The actors of the RL stage (cluster/rl.py's RLRun drives them): rollout workers and learner ranks,
and the weights both hold, with the checks and the broadcast group of the weight sync.

- `RolloutWorker`: a model copy and the KV-cache engine (nanochat/engine.py) with the sandboxed
  Python tool (cluster/sandbox_pool.py); samples G completions per prompt and scores them with the
  task; loads the learner's weights (object store) or receives them (broadcast group).
- `LearnerWorker`: one rank of the learner: the model, its sharded optimizers (a torch.distributed
  group of the learner ranks, gloo or NCCL), `train_step` on its shard of the batch, checkpoints
  (every rank its files, rank 0's state.json last; cluster/artifacts.py's upload) and the export.
- both (`_WeightsHolder`): a weights version, exact per-tensor checksums and the log-probs of a
  probe batch, so the driver can check that a sync left every actor with the learner's weights;
  `_SyncGroup` is the torch process group of learner rank 0 and the actors for the broadcast.
The classes are plain; RLRun wraps them with ray.remote and the resources of the spec.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import ray
import torch
import torch.distributed as torch_dist

from cluster import artifacts
from cluster.artifacts import localize
from cluster.sandbox_pool import SandboxPool
from cluster.specs import RLSpec
from nanochat import checkpoint as ckpt
from nanochat import rl
from nanochat.common import DistInfo, autocast_context, compute_dtype
from nanochat.engine import Engine, SamplingParams, ToolUse
from nanochat.gpt import GPT, GPTConfig
from nanochat.tasks import rl_task
from nanochat.tokenizer import Tokenizer

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


class WeightSyncError(RuntimeError):
    """A rollout actor's weights differ from the learner's after a sync: the run must stop."""


def loss_config(spec: RLSpec) -> rl.GRPOConfig:
    """The GRPO loss of a run: the clipped importance ratio only when rollouts may be one version old."""
    return rl.GRPOConfig(spec.normalize_std, spec.clip_eps if spec.max_staleness > 0 else None,
                         spec.advantage_sign)


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

    def __init__(self, model_config: dict[str, Any], tokenizer_uri: str, spec: RLSpec,
                 tool: SandboxPool | None) -> None:
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
        self.tasks = {split: rl_task(spec.task, split, spec.offline) for split in ("train", "eval")}
        self.stops = tuple(self.tokenizer.encode_special(s) for s in STOP_TOKENS)
        tool_use = None
        if tool is not None:
            sp = self.tokenizer.encode_special
            tool_use = ToolUse(tool.tool(), self.tokenizer.encode, self.tokenizer.decode,
                               sp("<|python_start|>"), sp("<|python_end|>"), sp("<|output_start|>"),
                               sp("<|output_end|>"))
        self.engine = Engine(self.model, max_batch_size=spec.rollout_slots or 2 * spec.group_size,
                             max_seq_len=spec.max_seq_len, tool_use=tool_use,
                             dtype=compute_dtype(self.device))

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
                                top_k=self.spec.top_k, seed=seed, n=n, stop_token_ids=self.stops,
                                logprobs=True)
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
            torch_dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}",
                                          rank=self.rank, world_size=self.world,
                                          timeout=datetime.timedelta(minutes=10))
        self.dist = DistInfo(self.rank, self.world, 0, self.device)
        self.model, _ = ckpt.load_model(localize(model_uri), self.device)
        self.model.train()
        s = self.spec
        self.optimizers = self.model.setup_optimizers(s.lrs, self.dist)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = group["initial_lr"] * s.init_lr_frac
        return {"model_config": asdict(self.model.config)}

    def restore(self, checkpoint_uri: str) -> dict[str, Any]:
        """Load weights and this rank's optimizer state (re-sharded) from an RL checkpoint."""
        state = ckpt.load_training_checkpoint(localize(checkpoint_uri), self.model, self.optimizers,
                                              self.dist)
        self.version = int(state.loop.get("version", state.step))
        return {"step": state.step, "version": self.version, "loop": state.loop}

    def train_step(self, batch: rl.TrainBatch, step: int) -> dict[str, float]:
        """One optimizer step on this rank's shard of the step's batch; the weights become version + 1."""
        t0 = time.perf_counter()
        stats = rl.policy_gradient_step(
            self.model, self.optimizers, batch.shard(self.rank, self.world), loss_config(self.spec),
            self.dist, total_tokens=batch.num_tokens, micro_batch_size=self.spec.device_batch_size,
            lr_multiplier=rl.rl_lr_multiplier(step, self.spec.num_steps))
        self.version += 1
        return {**stats, "version": self.version, "seconds": time.perf_counter() - t0}

    def weights(self) -> dict[str, Any]:
        """{"version", "state"}: the weights as CPU tensors, for the object store."""
        return {"version": self.version,
                "state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

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
            artifacts.upload_dir(tmp, dest_uri, last=(ckpt.STATE_FILE,))

    def export(self, dest_uri: str, tokenizer_uri: str, meta: dict[str, Any]) -> None:
        """The final model with its tokenizer at dest_uri, config.json last."""
        with tempfile.TemporaryDirectory(prefix="nanochat-rl-model-") as tmp:
            ckpt.save_model(tmp, self.model, meta)
            shutil.copytree(localize(tokenizer_uri), Path(tmp) / ckpt.TOKENIZER_DIR)
            artifacts.upload_dir(tmp, dest_uri, last=(ckpt.CONFIG_FILE,))
