"""GRPO as the seed runs it, in pure tensors: advantages, the policy-gradient loss, one learner step,
pass@k, and the checks that prove a rollout worker holds the learner's weights.

The seed's "GRPO" is close to plain REINFORCE with a group baseline, and that is the default here:
- G samples per prompt, reward 1/0 from the task's answer check;
- advantage = reward - mean of its group (option: divided by the group's std);
- token-level normalisation: the loss is the sum over every trained token of all sequences of a
  step divided by the number of those tokens (one number for the whole step, all micro-batches
  and ranks). Trained tokens are the sampled ones: prompt tokens and tool output forced into the
  sequence (engine mask 0) are never trained;
- no KL term, no reference model, no ratio clipping.
Option for rollouts made by older weights (one-step-off-policy overlap): the PPO clipped ratio
min(r A, clip(r, 1 - eps, 1 + eps) A) with r = exp(logp - logp_behaviour), where the behaviour
log-probs are the ones the rollout worker's engine recorded while sampling. At r = 1 its gradient
is exactly the default's.

Weight-sync checks (`state_checksums`, `checksum_mismatches`, `probe_batch`, `logprob_gap`): an
exact checksum per tensor (BLAKE2b of its raw bytes: any changed bit shows, on any device, and
hashlib hashes large buffers without the GIL, so tensors are hashed on several threads), and
log-probs of a fixed probe batch through the same full forward pass on both sides, compared
within a tolerance.

Nothing here imports Ray. Tests: `python -m pytest tests/test_rl.py`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from nanochat.common import DistInfo, autocast_context


@dataclass(frozen=True)
class GRPOConfig:
    """How rewards become a loss (defaults: the seed)."""

    normalize_std: bool = False  # divide advantages by the group's reward std (population std)
    clip_eps: float | None = None  # None: plain policy gradient; else the PPO ratio clipped to 1 +- eps
    advantage_sign: float = 1.0  # -1 only for control runs: the policy must then unlearn the task

    def __post_init__(self) -> None:
        if self.clip_eps is not None and not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1) or None (no ratio), got {self.clip_eps}")
        if self.advantage_sign not in (1.0, -1.0):
            raise ValueError(f"advantage_sign must be 1 or -1, got {self.advantage_sign}")


@dataclass
class Sample:
    """One sampled completion of one prompt, as a rollout worker returns it."""

    prompt: list[int]  # prompt token ids (ends with <|assistant_start|>)
    tokens: list[int]  # generated ids, forced tool output included
    mask: list[int]  # 1 = sampled by the policy (trained), 0 = forced tool output (never trained)
    logprobs: list[float] | None  # behaviour log-prob of each generated token (engine, raw logits)
    reward: float
    version: int  # weights version that generated it


@dataclass
class TrainBatch:
    """Sequences of one step as tensors; row i is prompt + completion of one sample."""

    inputs: torch.Tensor  # (N, T) long, right-padded with 0
    targets: torch.Tensor  # (N, T) long, the next token where it is trained, else -1
    advantages: torch.Tensor  # (N,) float32
    behaviour: torch.Tensor  # (N, T) float32 behaviour log-probs at trained targets, else 0
    versions: torch.Tensor  # (N,) long, weights version of each row's rollout

    @property
    def num_tokens(self) -> int:
        """Trained tokens in the batch (the token-level normaliser)."""
        return int((self.targets >= 0).sum())

    def shard(self, rank: int, world_size: int) -> TrainBatch:
        """Rows rank, rank + world_size, ... (a rank may get none)."""
        rows = slice(rank, None, world_size)
        return TrainBatch(self.inputs[rows], self.targets[rows], self.advantages[rows],
                          self.behaviour[rows], self.versions[rows])


def group_advantages(rewards: torch.Tensor, normalize_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards (P, G): G samples of each of P prompts -> advantages (P, G) = reward - group mean,
    optionally / (group std + eps). A group whose samples all scored alike gets zeros."""
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(
            f"rewards must be (prompts, samples) with at least 2 samples per prompt, got shape "
            f"{tuple(rewards.shape)}: with one sample the advantage (reward - own mean) is always 0"
        )
    rewards = rewards.float()
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(dim=1, keepdim=True, correction=0) + eps)
    return adv


def pack_batch(groups: Sequence[Sequence[Sample]], cfg: GRPOConfig) -> TrainBatch:
    """Advantages per group, then every sample as one row: inputs = seq[:-1], targets = seq[1:]
    with -1 where the target is a prompt token or a forced tool-output token."""
    if not groups:
        raise ValueError("no rollouts to train on: pass at least one group of samples")
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got group sizes {sorted(sizes)}")
    rewards = torch.tensor([[s.reward for s in g] for g in groups], dtype=torch.float32)
    advantages = group_advantages(rewards, cfg.normalize_std).reshape(-1)
    samples = [s for g in groups for s in g]
    for s in samples:
        if not s.tokens or len(s.mask) != len(s.tokens):
            raise ValueError(f"a sample has {len(s.tokens)} tokens and {len(s.mask)} mask entries; both "
                             "must be equal and non-zero")
        if s.logprobs is not None and len(s.logprobs) != len(s.tokens):
            raise ValueError(f"a sample has {len(s.tokens)} tokens but {len(s.logprobs)} log-probs")
    width = max(len(s.prompt) + len(s.tokens) - 1 for s in samples)
    n = len(samples)
    inputs = torch.zeros(n, width, dtype=torch.long)
    targets = torch.full((n, width), -1, dtype=torch.long)
    behaviour = torch.zeros(n, width, dtype=torch.float32)
    for i, s in enumerate(samples):
        seq = torch.tensor(s.prompt + s.tokens, dtype=torch.long)
        inputs[i, : len(seq) - 1] = seq[:-1]
        first = len(s.prompt) - 1  # targets index of the first generated token
        gen = torch.tensor(s.tokens, dtype=torch.long)
        trained = torch.tensor(s.mask, dtype=torch.bool)
        targets[i, first : first + len(gen)] = torch.where(trained, gen, torch.full_like(gen, -1))
        if s.logprobs is not None:
            behaviour[i, first : first + len(gen)] = torch.tensor(s.logprobs) * trained
    versions = torch.tensor([s.version for s in samples], dtype=torch.long)
    return TrainBatch(inputs, targets, advantages, behaviour, versions)


def token_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob (N, T) float32 of each target under the model's full forward; 0 where target is -1."""
    return -model(inputs, targets=targets, loss_reduction="none").float()


def policy_loss(
    logp: torch.Tensor, batch: TrainBatch, cfg: GRPOConfig, normaliser: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """-(sum over trained tokens of the objective) / normaliser, and statistics (sums, for averaging).

    logp (N, T): the policy's log-probs of batch.targets (token_logprobs). Objective per token:
    A * logp (plain), or min(r A, clip(r) A) with r = exp(logp - behaviour) when cfg.clip_eps is set."""
    valid = batch.targets >= 0  # (N, T)
    adv = (batch.advantages.to(logp.device) * cfg.advantage_sign)[:, None]  # (N, 1)
    stats: dict[str, float] = {}
    if cfg.clip_eps is None:
        objective = logp * adv
    else:
        ratio = torch.exp(logp - batch.behaviour.to(logp.device))  # 1 where not trained (both 0)
        clipped = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
        objective = torch.minimum(ratio * adv, clipped * adv)
        with torch.no_grad():
            stats["ratio_sum"] = float((ratio * valid).sum())
            stats["clipped_tokens"] = float(((ratio != clipped) & valid).sum())
    loss = -(objective * valid).sum() / normaliser
    with torch.no_grad():
        stats["logp_sum"] = float((logp * valid).sum())
        stats["tokens"] = float(valid.sum())
    return loss, stats


def rl_lr_multiplier(step: int, num_steps: int) -> float:
    """The seed's RL schedule: linear from 1 at step 0 down to 0 at num_steps."""
    return 1.0 - step / max(1, num_steps)


def policy_gradient_step(
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    batch: TrainBatch,
    cfg: GRPOConfig,
    dist: DistInfo,
    *,
    total_tokens: int,
    micro_batch_size: int,
    lr_multiplier: float = 1.0,
) -> dict[str, float]:
    """One optimizer step on this rank's `batch` (a shard of the step's batch).

    total_tokens: trained tokens of the whole step over all ranks. The sharded optimizers average
    gradients over ranks, so each rank divides by total_tokens / world_size: the result is the
    global token-level mean. Returns summed statistics of this rank (loss is its share)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"]) * lr_multiplier
    normaliser = max(1, total_tokens) / dist.world_size
    totals: dict[str, float] = {"loss": 0.0}
    device = torch.device(dist.device)
    for start in range(0, batch.inputs.size(0), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        part = TrainBatch(batch.inputs[rows].to(device), batch.targets[rows].to(device),
                          batch.advantages[rows], batch.behaviour[rows], batch.versions[rows])
        with autocast_context(device):
            logp = token_logprobs(model, part.inputs, part.targets)
        loss, stats = policy_loss(logp, part, cfg, normaliser)
        loss.backward()
        totals["loss"] += float(loss.detach())
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return totals


def pass_at_k(num_correct: Sequence[int], n: int, k: int) -> float:
    """Mean over problems of the unbiased pass@k estimate 1 - C(n - c, k) / C(n, k), from n samples
    of each problem of which c were right (Chen et al. 2021)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}")
    if not num_correct:
        raise ValueError("pass@k of no problems: give the number right of each problem")
    total = 0.0
    for c in num_correct:
        if not 0 <= c <= n:
            raise ValueError(f"{c} right out of {n} samples is impossible")
        total += 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
    return total / len(num_correct)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of `values` (sample standard deviation / sqrt(n)); 0 for n < 2."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def check_staleness(learner_version: int, rollout_versions: Sequence[int], max_staleness: int) -> int:
    """The largest gap between the learner's weights and those that made a rollout; raises when it
    exceeds `max_staleness` or a rollout claims weights newer than the learner's."""
    gaps = [learner_version - v for v in rollout_versions]
    if any(g < 0 for g in gaps):
        raise ValueError(f"rollouts of weights version {max(rollout_versions)} are newer than the learner's "
                         f"version {learner_version}: the version bookkeeping is broken")
    worst = max(gaps, default=0)
    if worst > max_staleness:
        raise ValueError(f"rollouts are {worst} versions behind the learner (version {learner_version}), "
                         f"more than the bound of {max_staleness}")
    return worst


# ----------------------------------------------------------------------------- weight checks

Checksum = tuple[str, tuple[int, ...], str]  # (dtype, shape, BLAKE2b hex digest of the raw bytes)


def tensor_checksum(t: torch.Tensor) -> str:
    """BLAKE2b (128-bit) hex digest of a tensor's raw bytes in row-major order: equal bits give
    equal digests on any device; any changed bit changes it. A GPU tensor is copied to the CPU."""
    flat = t.detach().contiguous().reshape(-1).cpu()
    return hashlib.blake2b(flat.view(torch.uint8).numpy().data, digest_size=16).hexdigest()


def state_checksums(state: Mapping[str, torch.Tensor], threads: int = 4) -> dict[str, Checksum]:
    """name -> (dtype, shape, digest) for every tensor of a state_dict, hashed on `threads` threads."""
    names = list(state)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        digests = list(pool.map(tensor_checksum, (state[n] for n in names)))
    return {n: (str(state[n].dtype), tuple(state[n].shape), d) for n, d in zip(names, digests, strict=True)}


def checksum_mismatches(expected: Mapping[str, Checksum], actual: Mapping[str, Checksum]) -> list[str]:
    """Human-readable differences between two state_checksums results (empty: identical)."""
    problems = [f"{name}: missing" for name in expected if name not in actual]
    problems += [f"{name}: unexpected tensor" for name in actual if name not in expected]
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or got == want:
            continue
        if got[:2] != want[:2]:
            problems.append(f"{name}: {got[0]} {list(got[1])} instead of {want[0]} {list(want[1])}")
        else:
            problems.append(f"{name}: different bits (checksum {got[2][:12]}, learner {want[2][:12]})")
    return problems


def probe_batch(vocab_size: int, rows: int = 4, length: int = 32,
                seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of seeded random token ids: (inputs, targets), each (rows, length) long."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab_size, (rows, length + 1), generator=gen)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


@torch.no_grad()
def probe_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probs (rows, length) float32 on the CPU of the probe batch: one full forward, no cache."""
    device = next(model.parameters()).device
    with autocast_context(device):
        return token_logprobs(model, inputs.to(device), targets.to(device)).cpu()


def logprob_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two log-prob tensors of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
