"""The core training loop (no Ray): gradient accumulation, schedules, clipping, sharded optimizer
steps, per-step metrics, periodic evaluation and checkpoint hooks; plus bits-per-byte evaluation.

Callers (the Ray Train worker in cluster/, the single-process baseline, benchmarks/gpu_check.py)
build the model and optimizers (GPT.setup_optimizers), give an iterator of THIS rank's
micro-batches, and receive metrics and checkpoint calls through callbacks:

    cfg = LoopConfig(num_steps=..., grad_accum_steps=grad_accum_steps(...))
    final = train_loop(model, optimizers, batches, cfg, dist, evaluate=..., on_metrics=...,
                       on_checkpoint=lambda steps_done: save(...))

Step numbering: `step` counts completed optimizer steps. train_loop(start_step=s) runs steps
s..stop_step-1; the schedule always spans cfg.num_steps, so a run cut at step k and resumed with
start_step=k (model and optimizer state restored, data iterator positioned) continues exactly.
Gradient clipping uses the exact global norm of the rank-averaged gradient, computed from each
rank's owned shards (one scalar all_reduce), so it matches a single-process run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from nanochat import compile_cache
from nanochat.common import DistInfo, autocast_context, training_dtype
from nanochat.muon import Muon
from nanochat.schedule import (
    FINAL_LR_FRAC,
    GRAD_CLIP,
    WARMDOWN_RATIO,
    WARMUP_RATIO,
    lr_multiplier,
    muon_momentum,
)
from nanochat.sharding import ShardedOptimizer

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, T) long, targets (B, T) long (-1 = ignore)


@dataclass
class LoopConfig:
    num_steps: int  # optimizer steps in the whole run (the schedule's horizon)
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each rank
    warmup_ratio: float = WARMUP_RATIO  # fraction of num_steps with linear lr warmup
    warmdown_ratio: float = WARMDOWN_RATIO  # fraction of num_steps at the end with linear lr decay
    final_lr_frac: float = FINAL_LR_FRAC  # lr multiplier reached at the end of the warmdown
    muon_momentum_warmup_steps: int = 300  # Muon momentum 0.85 -> 0.95 over these steps
    grad_clip: float = GRAD_CLIP  # max global gradient norm; <= 0 disables clipping
    eval_every: int = 0  # call evaluate every N steps (and at the end); <= 0: only at the end
    checkpoint_every: int = 0  # call on_checkpoint every N steps (and at the end); <= 0: only at the end
    log_every: int = 1  # call on_metrics every N steps (and at the end)
    peak_flops: float | None = None  # peak FLOP/s of ONE device for MFU (989e12: H100 bf16); None: no MFU
    compile: bool | None = None  # torch.compile the model's forward; None: `compile_pays_back` decides
    precision: str | None = None  # "auto", "float32", "bfloat16" (nanochat.common.training_dtype); None:
    # compute_dtype (bf16 autocast on CUDA, float32 on CPU)


# torch.compile on CPU pays for itself only over enough steps. Measured on this project's 2-core
# EPYC box with the tiny preset's model (depth 4, width 256, vocab 4,096, 8 x 256-token micro-batches,
# 2 threads) by `benchmarks/train_throughput.py --compile-cost` (an eager and a compiled copy trained
# side by side, steps alternating): with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR pointed at
# a fresh directory) the first compiled step took 39-59 s more than a median one, measured while four
# engineers loaded the 2 cores (a quiet machine compiles faster, so the rule errs toward eager; a
# warm cache took ~5 s); a compiled step then takes 28% less time than an eager one (paired
# median; the 2,500 vs 3,556 tok/s on a quiet machine: 30%); an eager step runs at ~75 GFLOP/s
# (the plain loop's 2,654 tok/s x 28.3 MFLOP per token on a quiet machine, README).
CPU_COMPILE_COLD_S = 40.0
CPU_COMPILE_WARM_S = 5.0  # the same graphs again, inductor's cache warm (nanochat/compile_cache.py)
CPU_COMPILE_SAVED_FRAC = 0.28
CPU_EAGER_FLOPS = 75e9


def compile_pays_back(device_type: str, steps: int, step_flops: float, *,
                      compile_s: float = CPU_COMPILE_COLD_S, saved_frac: float = CPU_COMPILE_SAVED_FRAC,
                      eager_flops: float = CPU_EAGER_FLOPS) -> bool:
    """Whether `torch.compile` should be on for a loop of `steps` optimizer steps of `step_flops`
    training FLOPs each (on one rank): always on CUDA (the seed's choice: minutes of compile next to
    hours of training), never on other devices (mps...: untested here), and on CPU when the time
    it saves, steps x (step_flops / eager_flops) x saved_frac seconds, exceeds its cost compile_s."""
    if device_type == "cuda":
        return True
    if device_type != "cpu" or steps <= 0 or step_flops <= 0:
        return False
    return steps * step_flops / eager_flops * saved_frac > compile_s


class _Forward:
    """model(x, y) for the loop, compiled or not: decided at the first micro-batch, whose shape gives
    the FLOPs of a step (cfg.compile, else `compile_pays_back`, with the warm compile cost when this
    machine's inductor cache already holds the graph: nanochat/compile_cache.py)."""

    def __init__(self, model: torch.nn.Module, cfg: LoopConfig, steps: int, device_type: str,
                 dtype: torch.dtype) -> None:
        self.model, self.cfg, self.steps, self.device_type, self.dtype = model, cfg, steps, device_type, dtype
        self.fn: Callable[..., torch.Tensor] | None = None
        self.compiled = False
        self.warm_cache = False  # the graph was compiled on this machine before
        self._record: str | None = None  # a signature to note in the ledger once its compile is done

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            sig = compile_cache.signature(self.model, x, self.dtype)
            self.warm_cache = compile_cache.was_compiled(sig)
            use = self.cfg.compile
            if use is None:
                per_token = self.model.estimate_flops() if hasattr(self.model, "estimate_flops") else 0
                cost = CPU_COMPILE_WARM_S if self.warm_cache else CPU_COMPILE_COLD_S
                use = compile_pays_back(self.device_type, self.steps,
                                        per_token * x.numel() * self.cfg.grad_accum_steps, compile_s=cost)
            self.compiled = bool(use)
            self.fn = torch.compile(self.model, dynamic=False) if use else self.model
            self._record = sig if use and not self.warm_cache else None
        with autocast_context(self.device_type, self.dtype):
            out = self.fn(x, y)
        if self._record is not None:  # the first compiled call has compiled (forward and backward graphs)
            compile_cache.record_compiled(self._record)
            self._record = None
        return out


def _set_hyperparams(optimizers: list[ShardedOptimizer], step: int, cfg: LoopConfig) -> float:
    """Apply the lr multiplier and Muon momentum for `step`; return the multiplier."""
    lrm = lr_multiplier(step, cfg.num_steps, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
    momentum = muon_momentum(step, cfg.muon_momentum_warmup_steps)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, Muon):
                group["momentum"] = momentum
    return lrm


def clip_grad_norm(optimizers: list[ShardedOptimizer], max_norm: float, dist: DistInfo) -> torch.Tensor:
    """Reduce gradients, scale them so the global norm is <= max_norm; return the norm before."""
    sq = sum(opt.owned_grad_sq_sum() for opt in optimizers)
    assert isinstance(sq, torch.Tensor)
    if dist.is_distributed:
        torch_dist.all_reduce(sq, op=torch_dist.ReduceOp.SUM)
    norm = sq.sqrt()
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for opt in optimizers:
        opt.scale_owned_grads(factor)
    return norm


def _micro_batches(
    forward: _Forward, batches: Iterator[Batch], cfg: LoopConfig, dist: DistInfo, step: int
) -> tuple[torch.Tensor, int, float]:
    """Forward/backward cfg.grad_accum_steps micro-batches; return (mean loss on this rank,
    tokens on this rank, seconds spent waiting for data)."""
    loss_sum = torch.zeros((), device=dist.device)
    tokens, wait = 0, 0.0
    for micro in range(cfg.grad_accum_steps):
        t0 = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            raise RuntimeError(
                f"the batch iterator ran out at step {step}, micro-batch {micro}: it must yield "
                f"grad_accum_steps ({cfg.grad_accum_steps}) micro-batches per step until the last step"
            ) from None
        wait += time.perf_counter() - t0
        x = x.to(dist.device, non_blocking=True)
        y = y.to(dist.device, non_blocking=True)
        loss = forward(x, y)  # under the loop's autocast
        loss_sum += loss.detach().float()
        (loss / cfg.grad_accum_steps).backward()
        tokens += x.numel()
    return loss_sum / cfg.grad_accum_steps, tokens, wait


def _global_mean(value: torch.Tensor, dist: DistInfo) -> float:
    if dist.is_distributed:
        value = value.clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        value /= dist.world_size
    return float(value)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train_loop(
    model: torch.nn.Module,
    optimizers: list[ShardedOptimizer],
    batches: Iterator[Batch],
    cfg: LoopConfig,
    dist: DistInfo,
    *,
    start_step: int = 0,
    stop_step: int | None = None,
    evaluate: Callable[[int], dict[str, Any]] | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train from `start_step` to `stop_step` (default cfg.num_steps); return the last metrics.

    `evaluate(step)` runs with gradients off at step 0 (fresh runs), every cfg.eval_every steps and
    at the end; its dict is merged into that step's metrics. `on_checkpoint(step)` is called after
    step `step` is complete (every cfg.checkpoint_every and at the end); `on_metrics` gets each
    logged step's dict; `after_step(step)` runs last in every step, on every rank (the cluster polls
    for spot preemption there). All ranks must call train_loop alike (collectives inside)."""
    stop = cfg.num_steps if stop_step is None else stop_step
    if not 0 <= start_step <= stop <= cfg.num_steps:
        raise ValueError(
            f"need 0 <= start_step ({start_step}) <= stop_step ({stop}) <= num_steps ({cfg.num_steps})"
        )
    dtype = training_dtype(cfg.precision, dist.device)
    forward = _Forward(model, cfg, stop - start_step, torch.device(dist.device).type, dtype)
    flops_per_token = model.estimate_flops() if hasattr(model, "estimate_flops") else None
    metrics: dict[str, Any] = {"step": start_step}
    if evaluate is not None and start_step == 0:
        metrics.update(_evaluate(evaluate, 0))
        if on_metrics is not None:
            on_metrics(dict(metrics))
    for step in range(start_step, stop):
        t0 = time.perf_counter()
        lrm = _set_hyperparams(optimizers, step, cfg)
        loss, tokens, wait = _micro_batches(forward, batches, cfg, dist, step)
        grad_norm = clip_grad_norm(optimizers, cfg.grad_clip, dist) if cfg.grad_clip > 0 else None
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if torch.device(dist.device).type == "cuda":
            torch.cuda.synchronize(dist.device)
        dt = time.perf_counter() - t0
        done = step + 1
        metrics = {"step": done}
        if _due(done, cfg.log_every, stop):
            metrics.update(_step_metrics(loss, grad_norm, lrm, tokens, wait, dt, cfg, dist, flops_per_token))
            metrics["compiled"] = forward.compiled
            metrics["compile_cache_warm"] = forward.warm_cache
            metrics["dtype"] = str(dtype).removeprefix("torch.")
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"training loss is {metrics['loss']} at step {done}: lower the lrs")
        if evaluate is not None and _due(done, cfg.eval_every, cfg.num_steps):
            metrics.update(_evaluate(evaluate, done))
        if on_metrics is not None and len(metrics) > 1:
            on_metrics(dict(metrics))
        if on_checkpoint is not None and _due(done, cfg.checkpoint_every, stop):
            on_checkpoint(done)
        if after_step is not None:
            after_step(done)
    return metrics


def _evaluate(evaluate: Callable[[int], dict[str, Any]], step: int) -> dict[str, Any]:
    with torch.no_grad():
        return dict(evaluate(step))


def _step_metrics(
    loss: torch.Tensor,
    grad_norm: torch.Tensor | None,
    lrm: float,
    tokens: int,
    wait: float,
    dt: float,
    cfg: LoopConfig,
    dist: DistInfo,
    flops_per_token: int | None,
) -> dict[str, Any]:
    """Per-step numbers: loss averaged over ranks, global tokens/s, MFU (%), data-wait share."""
    global_tokens = tokens * dist.world_size  # every rank feeds the same micro-batch shapes
    tokens_per_sec = global_tokens / dt
    mfu = None
    if cfg.peak_flops and flops_per_token:
        mfu = 100.0 * flops_per_token * tokens_per_sec / (cfg.peak_flops * dist.world_size)
    return {
        "loss": _global_mean(loss, dist),
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "lr_multiplier": lrm,
        "tokens_per_sec": tokens_per_sec,
        "mfu_percent": mfu,
        "data_wait_frac": wait / dt,
        "step_time_s": dt,
    }


def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    token_bytes: torch.Tensor,
    dist: DistInfo,
    *,
    steps: int | None = None,
) -> float:
    """Bits per byte over `steps` batches (or until exhausted; every rank must run as many).

    token_bytes (V,) long: UTF-8 bytes of each token id, 0 for special tokens, which are left
    out. bpb = sum of nats over counted target tokens / (ln 2 x their bytes), summed over ranks."""
    nats, nbytes = bpb_sums(model, batches, token_bytes, dist, steps=steps)
    return bpb_from_sums(nats, nbytes)


def bpb_from_sums(nats: float, nbytes: int) -> float:
    """Bits per byte of summed nats over summed bytes (inf for no bytes)."""
    return float("inf") if nbytes == 0 else nats / (math.log(2) * nbytes)


@torch.no_grad()
def bpb_sums(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    token_bytes: torch.Tensor,
    dist: DistInfo,
    *,
    steps: int | None = None,
) -> tuple[float, int]:
    """(nats, bytes) summed over the counted target tokens of `steps` batches and over ranks: what
    `evaluate_bpb` divides; parts of one stream evaluated apart add up (nanochat/evals/harness.py)."""
    token_bytes = token_bytes.to(dist.device)
    total_nats = torch.zeros((), dtype=torch.float64, device=dist.device)
    total_bytes = torch.zeros((), dtype=torch.long, device=dist.device)
    for i, (x, y) in enumerate(batches):
        if steps is not None and i >= steps:
            break
        x, y = x.to(dist.device), y.to(dist.device)
        with autocast_context(dist.device):
            nats = model(x, y, loss_reduction="none").reshape(-1)  # (B*T,) nats, 0 where y == -1
        y = y.reshape(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)  # (B*T,)
        total_nats += (nats.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_distributed:
        torch_dist.all_reduce(total_nats, op=torch_dist.ReduceOp.SUM)
        torch_dist.all_reduce(total_bytes, op=torch_dist.ReduceOp.SUM)
    return float(total_nats), int(total_bytes)
